"""The Pretzel model (SPEC §1): a frozen VLM stream and a TARFlow stream over one sequence.

Both streams read the same interleaved sequence under one causal mask, with the same
M-RoPE positions, and the output at position i predicts element i + 1:

  VLM:   e^V = TokEmbed(w) at text positions, Adapter(u, t) at visual ones;  h^V = VLM(e^V)
  flow:  e^F = P_c(h^V) at text positions, P_u(u) + W_v h^V at visual ones (+ MLP(log t));
         g = Deep(e^F);  (μ, log s) of the next visual element = Head_F(g)
         (Deep rotates by the same positions with its own M-RoPE layout, `flow.deep.rope_layout`:
         the VLM keeps Qwen's chunked split, the flow interleaves the axes — SPEC §1)
  text:  logits = LMHead(h^V + W_t g), LMHead being the VLM's own

Images pass through the visual-only shallow blocks first (x -> u); only u enters the shared
sequence. Parameter names, which the stages' trainable patterns select:
  vlm/…          the Qwen2.5-VL text decoder (frozen: its parameters' gradients are stopped)
  adapter/…      u -> VLM input embedding
  shallow_{k}/…  the shallow flow blocks
  flow/…         the deep stream, a `flows.block.AffineFlowBlock` reading the VLM's width:
                 P_c (context_proj), P_u (input_proj), the noise embedding, the deep
                 Transformer (backbone), Head_F (head)
  w_v, w_t       the zero-initialised vertical skips (present when `config.skips`)

With the skips, each pass sows (`self.sow`) the skip terms and the representations they join
into the "intermediates" collection, which Flax captures only when asked
(`apply(…, mutable=["intermediates"])`; `init` leaves it out), for `evaluation.skip_analysis`:
  visual_skip, visual_fused   W_v h^V and the deep stream's input e^F     [B, T, H_flow]
  text_skip, text_fused       W_t g and h^V + W_t g (what LMHead reads)   [B, T, H_vlm]
"""

import dataclasses
from typing import NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from starflow2_jax.flows import affine
from starflow2_jax.flows import likelihood
from starflow2_jax.flows import stack
from starflow2_jax.layers import kv_cache as kv_cache_lib
from starflow2_jax.layers import rotary
from starflow2_jax.models import adapter as adapter_lib
from starflow2_jax.models.qwen2_5_vl import config as qwen_config
from starflow2_jax.models.qwen2_5_vl import text as text_lib


@dataclasses.dataclass(frozen=True)
class PretzelConfig:
  """Attributes:
    vlm: the Qwen2.5-VL text decoder's numbers.
    flow: latent_dim D, the deep and shallow Transformers, the number of shallow blocks, the
      scale function and noise conditioning (`flow.context_dim` is ignored: P_c reads h^V,
      of the VLM's width).
    adapter_hidden: the adapter MLP's hidden width.
    skips: build W_v and W_t (stage 3); without them the model is that of stages 1–2.
    freeze_vlm: stop gradients into the VLM's parameters.
    vlm_dtype: the VLM's compute and parameter dtype ("bfloat16" halves a frozen VLM).
    vlm_remat, vlm_scan: the VLM layers' remat policy and whether they are scanned (the
      flow's Transformers say the same in `flow.deep` / `flow.shallow`).
  """
  vlm: qwen_config.TextConfig
  flow: stack.FlowConfig
  adapter_hidden: int
  skips: bool = True
  freeze_vlm: bool = True
  vlm_dtype: str = "float32"
  vlm_remat: bool | str = "none"      # the VLM layers' `layers/remat.py` policy
  vlm_scan: bool = False              # run the VLM's layers with `nn.scan` (layers/scan.py)

  def __post_init__(self):
    if self.flow.deep.rope_layout not in rotary.MROPE_LAYOUTS:
      raise ValueError("the deep Transformer reads the VLM's (t, row, col) positions: set "
                       f"flow.deep.rope_layout to one of {rotary.MROPE_LAYOUTS} "
                       f"(got {self.flow.deep.rope_layout!r}; SPEC §1 chooses 'interleaved')")


def with_flow_positions(deep, layout="interleaved"):
  """The deep Transformer's config reading (t, row, col) positions with M-RoPE `layout`
  ("chunked" uses Qwen2.5-VL's split for this head size, as the VLM stream does)."""
  section = rotary.qwen_mrope_section(deep.head_dim) if layout == "chunked" else None
  return dataclasses.replace(deep, rope_layout=layout, mrope_section=section)


class ImageTerms(NamedTuple):
  """Per image [B, M, …]: the flow's Gaussian end and its log-determinants (SPEC eq. 3.3)."""
  z_bmnd: jnp.ndarray
  u_bmnd: jnp.ndarray
  log_det_shallow_bm: jnp.ndarray
  log_det_deep_bm: jnp.ndarray

  def nll_per_dim(self):
    """−log p(x̃ | context) / (N·D) per image, in nats."""
    b, m, n, d = self.z_bmnd.shape
    nll = likelihood.nll_per_dim(self.z_bmnd.reshape(b * m, n, d),
                                 (self.log_det_shallow_bm + self.log_det_deep_bm).reshape(-1))
    return nll.reshape(b, m)


class Streams(NamedTuple):
  h_vlm_btc: jnp.ndarray     # h^V, the VLM's final-norm hidden states
  g_btw: jnp.ndarray         # g, the deep flow stream's output
  cache: object              # PretzelCache or None


class PretzelOutput(NamedTuple):
  logits_btv: jnp.ndarray | None
  images: ImageTerms


@flax.struct.dataclass
class PretzelCache:
  """One KV cache per stream; both advance together, one slot per sequence position."""
  vlm: kv_cache_lib.KVCache
  flow: kv_cache_lib.KVCache


def empty_cache(config, batch, max_length, dtype=jnp.float32):
  vlm = text_lib.empty_cache(config.vlm, batch, max_length, jnp.dtype(config.vlm_dtype),
                             scan=config.vlm_scan)
  return PretzelCache(vlm, config.flow.deep.empty_cache(batch, max_length, dtype))


def _stop_gradient(variables):
  return jax.tree.map(jax.lax.stop_gradient, variables)


# The VLM with every parameter read through stop_gradient: frozen, while gradients still
# flow through it to the adapter (stage 2 trains the adapter by the VLM's text loss).
# `variables=False`: it sees its parameters only (it has nothing else); with `init=True`, a
# mutable collection reaching it (e.g. "intermediates" captured by `apply`) would otherwise
# make map_variables re-initialise, and lose, the parameters.
FrozenTextDecoder = nn.map_variables(
    text_lib.TextDecoder, "params", trans_in_fn=_stop_gradient, init=True,
    variables=False, methods=["__call__", "embed", "logits"])


def place_elements(u_bmnd, image_positions_bmn, image_valid_bm, length):
  """Scatters image elements to their sequence positions: [B, T, D] (zeros elsewhere)."""
  b, m, n, d = u_bmnd.shape
  index_bk = jnp.where(image_valid_bm[:, :, None], image_positions_bmn, length).reshape(b, m * n)
  rows_bk = jnp.broadcast_to(jnp.arange(b)[:, None], index_bk.shape)
  u_btd = jnp.zeros((b, length, d), u_bmnd.dtype)
  return u_btd.at[rows_bk, index_bk].set(u_bmnd.reshape(b, m * n, d), mode="drop")


def elements_at(x_btd, positions_bmn):
  """[B, M, N, D]: x read at the given sequence positions (the inverse of `place_elements`)."""
  b, m, n = positions_bmn.shape
  x_bkd = jnp.take_along_axis(x_btd, positions_bmn.reshape(b, m * n)[..., None], axis=1)
  return x_bkd.reshape(b, m, n, x_btd.shape[-1])


def previous_valid_positions(valid_bt):
  """[B, T]: for each position, the last valid position before it (0 where there is none)."""
  index_bt = jnp.where(valid_bt, jnp.arange(valid_bt.shape[1]), 0)
  last_so_far_bt = jax.lax.cummax(index_bt, axis=1)
  return jnp.pad(last_so_far_bt[:, :-1], ((0, 0), (1, 0)))


def predictions_for_elements(x_btd, image_positions_bmn, valid_bt):
  """[B, M, N, D]: each element's prediction, read at the last valid position before it.

  In a contiguous sequence that is the position just before; where padding sits between a
  prompt and what was generated after it (a right-padded prompt in the sampler), the first
  element's prediction comes from its `<|vision_start|>`, not from the padding slot.
  """
  b, m, n = image_positions_bmn.shape
  sources_bk = jnp.take_along_axis(previous_valid_positions(valid_bt),
                                   image_positions_bmn.reshape(b, m * n), axis=1)
  return elements_at(x_btd, sources_bk.reshape(b, m, n))


class Pretzel(nn.Module):
  """Methods (`model.apply(variables, …, method=…)`):
    encode_images(x_bmnd, t_b)                    -> (u, Σ shallow log-dets [B, M])
    streams(ids, u_btd, is_visual, positions_3bt, valid, t_b, cache=None) -> Streams
    text_logits(h_vlm, g)                         -> float32 logits [B, T, V]
    gaussians(g)                                  -> (μ, log s) of each position's next element
    language_model(ids, positions_3bt, valid)     -> the VLM's own logits on text alone
    understanding_logits(…same as __call__…)      -> text logits without the flow stream
    __call__(ids, x_bmnd, image_positions_bmn, image_valid_bm, is_visual, positions_3bt,
             valid, t_b, with_logits=True)        -> PretzelOutput (training, likelihood)
  `dtype` is the flow side's compute dtype; the VLM's is `config.vlm_dtype`.
  """
  config: PretzelConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    vlm_dtype = jnp.dtype(cfg.vlm_dtype)
    decoder = FrozenTextDecoder if cfg.freeze_vlm else text_lib.TextDecoder
    self.vlm = decoder(cfg.vlm, dtype=vlm_dtype, param_dtype=vlm_dtype, remat=cfg.vlm_remat,
                       scan=cfg.vlm_scan)
    self.adapter = adapter_lib.Adapter(cfg.vlm.hidden_size, cfg.adapter_hidden, **kw)
    self.shallow = [stack.shallow_block(cfg.flow, k, **kw).clone(name=f"shallow_{k}")
                    for k in range(cfg.flow.num_shallow_blocks)]
    # The deep stream: the flow core's block, its context being h^V (P_c: H_vlm -> H_flow).
    deep = dataclasses.replace(cfg.flow, context_dim=cfg.vlm.hidden_size)
    self.flow = stack.deep_block(deep, **kw).clone(name="flow")
    if cfg.skips:
      skip = lambda features, axes: nn.Dense(
          features, use_bias=False, kernel_init=nn.with_logical_partitioning(
              nn.initializers.zeros, axes), **kw)
      self.w_v = skip(cfg.flow.deep.width, ("context", "embed"))    # H_vlm -> H_flow
      self.w_t = skip(cfg.vlm.hidden_size, ("embed", "context"))    # H_flow -> H_vlm

  def encode_images(self, x_bmnd, t_b=None):
    """x -> u through the shallow blocks, each image on its own; (u, log-dets [B, M])."""
    b, m, n, d = x_bmnd.shape
    t_k = None if t_b is None else jnp.repeat(t_b, m)
    u_knd, log_det_k = stack.run_shallow(self.shallow, x_bmnd.reshape(b * m, n, d), t_k)
    return u_knd.reshape(b, m, n, d), log_det_k.reshape(b, m)

  def vlm_stream(self, ids_bt, u_btd, is_visual_bt, positions_3bt, valid_bt, t_b, cache=None):
    """h^V: the VLM over token embeddings and Adapter(u, t) at visual positions."""
    token_btc = self.vlm.embed(ids_bt)
    visual_btc = self.adapter(u_btd, t_b).astype(token_btc.dtype)
    e_vlm_btc = jnp.where(is_visual_bt[..., None], visual_btc, token_btc)
    return self.vlm(e_vlm_btc, positions_3bt, valid_bt, cache)

  def streams(self, ids_bt, u_btd, is_visual_bt, positions_3bt, valid_bt, t_b, cache=None,
              isolate_flow=False):
    """Both streams over a chunk of the sequence; with a cache, the chunk is appended.
    `isolate_flow`: the VLM reads u behind `stop_gradient` (see `__call__`)."""
    vlm_u_btd = jax.lax.stop_gradient(u_btd) if isolate_flow else u_btd
    h_vlm_btc, vlm_cache = self.vlm_stream(ids_bt, vlm_u_btd, is_visual_bt, positions_3bt,
                                           valid_bt, t_b, None if cache is None else cache.vlm)
    skip_btw = self.w_v(h_vlm_btc) if self.config.skips else None
    e_flow_btw = self.flow.embed_sequence(h_vlm_btc, u_btd, is_visual_bt, t_b, skip_btw)
    if self.config.skips:
      self._sow_skip("visual", skip_btw, e_flow_btw)
    g_btw, flow_cache = self.flow.transform(e_flow_btw, positions_3bt, valid_bt,
                                            None if cache is None else cache.flow)
    new_cache = None if cache is None else PretzelCache(vlm_cache, flow_cache)
    return Streams(h_vlm_btc, g_btw, new_cache)

  def text_logits(self, h_vlm_btc, g_btw):
    """LMHead(h^V + W_t g), through the VLM's own head."""
    if self.config.skips:
      skip_btc = self.w_t(g_btw).astype(h_vlm_btc.dtype)
      h_vlm_btc = h_vlm_btc + skip_btc
      self._sow_skip("text", skip_btc, h_vlm_btc)
    return self.vlm.logits(h_vlm_btc)

  def _sow_skip(self, side, skip, fused):
    """Records a skip term and the sum it enters (a no-op unless "intermediates" is
    mutable, so training and sampling neither keep nor compute anything more)."""
    self.sow("intermediates", f"{side}_skip", skip)
    self.sow("intermediates", f"{side}_fused", fused)

  def gaussians(self, g_btw):
    return self.flow.head_gaussians(g_btw)

  def language_model(self, ids_bt, positions_3bt, valid_bt):
    """The VLM stream alone on text: its logits [B, T, V] (stage 0 pretrains it this way)."""
    h_btc, _ = self.vlm(self.vlm.embed(ids_bt), positions_3bt, valid_bt)
    return self.vlm.logits(h_btc)

  def understanding_logits(self, ids_bt, x_bmnd, image_positions_bmn, image_valid_bm,
                           is_visual_bt, positions_3bt, valid_bt, t_b):
    """Text logits without the flow stream: exact while there are no skips (stages 1–2),
    where the logits do not read g; half the work of a full pass for stage 2."""
    if self.config.skips:
      raise ValueError("with the vertical skips the text logits read the flow stream: use "
                       "__call__")
    u_bmnd, _ = self.encode_images(x_bmnd, t_b)
    u_btd = place_elements(u_bmnd, image_positions_bmn, image_valid_bm, ids_bt.shape[1])
    h_vlm_btc, _ = self.vlm_stream(ids_bt, u_btd, is_visual_bt, positions_3bt, valid_bt, t_b)
    return self.vlm.logits(h_vlm_btc)

  def __call__(self, ids_bt, x_bmnd, image_positions_bmn, image_valid_bm, is_visual_bt,
               positions_3bt, valid_bt, t_b, with_logits=True, isolate_flow=False):
    """One parallel pass over whole sequences: text logits and every image's flow terms.

    `isolate_flow` (a training choice; values are unchanged): the VLM stream reads u, and
    the text logits read g, behind `stop_gradient`, so no loss reaches the flow's parameters
    through the VLM stream — the flow is shaped by its own likelihood alone, while the
    adapter and W_t still learn to read it. Likelihoods and their gradients with respect to
    x (the denoiser's score) must not use it.
    """
    u_bmnd, log_det_shallow_bm = self.encode_images(x_bmnd, t_b)
    u_btd = place_elements(u_bmnd, image_positions_bmn, image_valid_bm, ids_bt.shape[1])
    s = self.streams(ids_bt, u_btd, is_visual_bt, positions_3bt, valid_bt, t_b,
                     isolate_flow=isolate_flow)
    mean_btd, log_s_btd = self.gaussians(s.g_btw)
    mean_bmnd = predictions_for_elements(mean_btd, image_positions_bmn, valid_bt)
    log_s_bmnd = predictions_for_elements(log_s_btd, image_positions_bmn, valid_bt)
    z_bmnd = affine.to_noise(u_bmnd, mean_bmnd, log_s_bmnd)
    terms = ImageTerms(z_bmnd, u_bmnd, log_det_shallow_bm, -jnp.sum(log_s_bmnd, axis=(2, 3)))
    g_for_text_btw = jax.lax.stop_gradient(s.g_btw) if isolate_flow else s.g_btw
    logits = self.text_logits(s.h_vlm_btc, g_for_text_btw) if with_logits else None
    return PretzelOutput(logits, terms)


def vlm_params_from_qwen(qwen_params):
  """The Pretzel's `vlm` subtree from a full Qwen2.5-VL parameter tree (its `text` part)."""
  if "text" not in qwen_params:
    raise ValueError(f"not a Qwen2.5-VL parameter tree: top-level keys {sorted(qwen_params)}")
  return qwen_params["text"]
