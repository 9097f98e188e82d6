"""The Qwen2.5-VL language decoder: token embedding, pre-norm GQA layers with M-RoPE, LM head.

Inputs are embeddings, not ids, so image features (or STARFlow2's adapter outputs) can take
the place of token embeddings; positions are the 3-D (t, row, col) M-RoPE positions
[3, B, T] of `positions.rope_index`. The KV cache is the library's `KVCache` with
`num_kv_heads` heads per layer (`empty_cache`).
"""

import flax.linen as nn
import jax.numpy as jnp

from starflow2_jax.layers import attention
from starflow2_jax.layers import kv_cache as kv_cache_lib
from starflow2_jax.layers import remat
from starflow2_jax.layers import rotary
from starflow2_jax.layers import scan
from starflow2_jax.models.qwen2_5_vl import blocks


def empty_cache(config, batch, max_length, dtype, scan=False):
  """A zeroed KV cache of the decoder of `config` (a TextConfig) for `batch` rows of up to
  `max_length` tokens; `scan`: for a scanned decoder (layer axis first)."""
  return kv_cache_lib.KVCache.zeros(batch=batch, max_length=max_length,
                                    num_layers=config.num_layers, num_heads=config.num_kv_heads,
                                    head_dim=config.head_dim, dtype=dtype, stacked=scan)


class DecoderLayer(nn.Module):
  config: object            # config.TextConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_btd, angles_bth, valid_bt, layer_cache, cache_length, cache_valid_bs):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h_btd = blocks.RMSNorm(cfg.rms_norm_eps, name="input_norm", **kw)(x_btd)
    h_btd, layer_cache = attention.CausalSelfAttention(
        cfg.num_heads, cfg.head_dim, use_bias=True, num_kv_heads=cfg.num_kv_heads,
        name="attention", **kw)(h_btd, None, valid_bt, layer_cache, cache_length,
                                cache_valid_bs, angles_bth=angles_bth)
    x_btd = x_btd + remat.tag(h_btd, remat.ATTENTION_OUT)
    h_btd = blocks.RMSNorm(cfg.rms_norm_eps, name="post_attention_norm", **kw)(x_btd)
    h_btd = blocks.SwiGLU(cfg.intermediate_size, name="mlp", **kw)(h_btd)
    x_btd = x_btd + remat.tag(h_btd, remat.MLP_OUT)
    return nn.with_logical_constraint(x_btd, ("batch", "length", "embed")), layer_cache


class TextDecoder(nn.Module):
  """`embed(ids)`, `__call__(embeds, positions_3bt, valid, cache)` -> (final-norm hidden, cache),
  `logits(hidden)`. `remat` names the layers' rematerialisation policy (`layers/remat.py`);
  `scan` runs them with `nn.scan` (`layers/scan.py`: parameters under `layers`, stacked,
  instead of layer_0 … layer_{L-1}; caches from `empty_cache(…, scan=True)`)."""
  config: object            # config.TextConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  remat: bool | str = "none"
  scan: bool = False

  def setup(self):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embedding = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, name="embed_tokens", **kw,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                    ("vocab", "embed")))
    layer_cls = remat.remat_layer(DecoderLayer, self.remat, scanned=self.scan)
    self.layers = scan.build_stack(layer_cls, cfg.num_layers, self.scan, cfg, **kw)
    self.final_norm = blocks.RMSNorm(cfg.rms_norm_eps, name="final_norm", **kw)
    if not cfg.tie_word_embeddings:
      self.lm_head = self.param(
          "lm_head", nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                  ("embed", "vocab")),
          (cfg.hidden_size, cfg.vocab_size), self.param_dtype)

  def embed(self, ids_bt):
    return self.embedding(ids_bt)

  def logits(self, hidden_btd):
    """Logits in float32 (the LM head itself runs in the compute dtype)."""
    if self.config.tie_word_embeddings:
      logits = self.embedding.attend(hidden_btd.astype(self.dtype))
    else:
      logits = jnp.einsum("btd,dv->btv", hidden_btd.astype(self.dtype),
                          self.lm_head.astype(self.dtype))
    return logits.astype(jnp.float32)

  def __call__(self, embeds_btd, positions_3bt, valid_bt, cache=None):
    cfg = self.config
    x_btd = nn.with_logical_constraint(embeds_btd.astype(self.dtype), ("batch", "length", "embed"))
    # Qwen2.5-VL's own (chunked) layout: its weights were trained with it.
    angles_bth = rotary.mrope_angles(positions_3bt, cfg.head_dim, cfg.rope_theta,
                                     cfg.mrope_section, layout="chunked")
    x_btd, cache = scan.run_stack(self.layers, cfg.num_layers, x_btd, (angles_bth, valid_bt),
                                  2, cache, valid_bt)
    return self.final_norm(x_btd), cache
