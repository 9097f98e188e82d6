"""KV-cached text generation for Qwen2.5-VL: one prefill, then a jitted decode loop.

A batch of prompts is left-padded to one length, so every row's last prompt token sits in
the same slot and decoding appends one slot per step for all rows. The decode state keeps
`rope_delta` per row: the token appended after `n` real tokens has M-RoPE position
`n + rope_delta` on all three axes, exactly as transformers continues after an image.
The whole loop (`lax.while_loop`, stopping early when every row has hit a stop token) is
one compiled program per (batch, prompt length, sampling config).
"""

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import mrope_positions as positions_lib
from starflow2_jax.models.qwen2_5_vl import model as model_lib
from starflow2_jax.models.qwen2_5_vl import vision as vision_lib


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How tokens are chosen. `greedy` ignores temperature and top_p."""
  max_new_tokens: int = 32
  greedy: bool = True
  temperature: float = 1.0
  top_p: float = 1.0
  stop_token_ids: tuple = ()
  pad_token_id: int = 0


@flax.struct.dataclass
class PromptBatch:
  """Left-padded prompts and their images (host or device arrays).

  ids_bt / valid_bt: token ids and which slots are real; positions_3bt / rope_delta_b: from
  `positions.rope_index`; patches_np / grid: all images of the batch in order of appearance
  (None for text only).
  """
  ids_bt: jnp.ndarray
  valid_bt: jnp.ndarray
  positions_3bt: jnp.ndarray
  rope_delta_b: jnp.ndarray
  patches_np: jnp.ndarray | None = None
  grid: vision_lib.VisionGrid | None = None


@flax.struct.dataclass
class DecodeState:
  cache: object                     # KVCache
  last_token_b: jnp.ndarray
  rope_delta_b: jnp.ndarray
  done_b: jnp.ndarray
  tokens_bn: jnp.ndarray            # generated ids, pad after a row stops
  logits_bnv: jnp.ndarray | None    # each step's logits, when asked for (tests)
  step: jnp.ndarray
  rng: jnp.ndarray


def make_prompt_batch(sequences, config, images=()):
  """A `PromptBatch` from token-id lists (left-padded with the config's pad id).

  `images`: (patches [n, patch_dim], (t, h, w)) per image, in order of appearance across the
  batch (row by row), as `image_processing.preprocess` returns them.
  """
  length = max(len(s) for s in sequences)
  ids = np.full((len(sequences), length), config.pad_token_id, np.int32)
  valid = np.zeros(ids.shape, bool)
  for b, seq in enumerate(sequences):
    ids[b, length - len(seq):] = seq
    valid[b, length - len(seq):] = True
  grids = [tuple(grid) for _, grid in images]
  pos, delta = positions_lib.rope_index(ids, valid, grids or None, config.image_token_id,
                                        config.vision.spatial_merge_size)
  patches = grid = None
  if images:
    patches = np.concatenate([p for p, _ in images]).astype(np.float32)
    grid = vision_lib.grid_inputs(grids, config.vision)
  return PromptBatch(ids, valid, pos, delta, patches, grid)


def _top_p_filter(logits_bv, top_p):
  """Keeps the smallest set of tokens whose probability reaches top_p (at least one)."""
  sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
  probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
  mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
  keep_count_b = jnp.sum(mass_before_bv < top_p, axis=-1)
  threshold_b = jnp.take_along_axis(sorted_bv, keep_count_b[:, None] - 1, axis=-1)
  return jnp.where(logits_bv < threshold_b, -jnp.inf, logits_bv)


def choose_tokens(logits_bv, rng, sampling):
  """Greedy argmax, or a sample at `temperature` from the top-p nucleus."""
  if sampling.greedy:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  logits_bv = logits_bv / sampling.temperature
  if sampling.top_p < 1.0:
    logits_bv = _top_p_filter(logits_bv, sampling.top_p)
  return jax.random.categorical(rng, logits_bv, axis=-1).astype(jnp.int32)


def _advance(state, logits_bv, sampling):
  """Chooses this step's tokens, records them and marks rows that hit a stop token."""
  rng, step_rng = jax.random.split(state.rng)
  token_b = choose_tokens(logits_bv, step_rng, sampling)
  token_b = jnp.where(state.done_b, sampling.pad_token_id, token_b)
  stops = jnp.asarray(sampling.stop_token_ids or (-1,), jnp.int32)
  done_b = state.done_b | jnp.isin(token_b, stops)
  logits_bnv = state.logits_bnv
  if logits_bnv is not None:
    logits_bnv = logits_bnv.at[:, state.step].set(logits_bv)
  return state.replace(last_token_b=token_b, done_b=done_b, rng=rng, logits_bnv=logits_bnv,
                       tokens_bn=state.tokens_bn.at[:, state.step].set(token_b),
                       step=state.step + 1)


def prefill(model, params, prompt, sampling, rng, return_logits=False):
  """Runs the prompt into a fresh cache sized for the answer; picks the first new token."""
  batch, length = prompt.ids_bt.shape
  features = None
  if prompt.patches_np is not None:
    features = model.apply({"params": params}, prompt.patches_np, prompt.grid,
                           method="encode_images")
  embeds = model.apply({"params": params}, prompt.ids_bt, features, method="embed")
  cache = model_lib.empty_cache(model, batch, length + sampling.max_new_tokens)
  hidden, cache = model.apply({"params": params}, embeds, prompt.positions_3bt, prompt.valid_bt,
                              cache, method="decode")
  logits_bv = model.apply({"params": params}, hidden[:, -1:], method="logits")[:, 0]
  n, vocab = sampling.max_new_tokens, logits_bv.shape[-1]
  state = DecodeState(
      cache=cache, last_token_b=jnp.zeros((batch,), jnp.int32),
      rope_delta_b=jnp.asarray(prompt.rope_delta_b, jnp.int32),
      done_b=jnp.zeros((batch,), bool),
      tokens_bn=jnp.full((batch, n), sampling.pad_token_id, jnp.int32),
      logits_bnv=jnp.zeros((batch, n, vocab), jnp.float32) if return_logits else None,
      step=jnp.zeros((), jnp.int32), rng=rng)
  return _advance(state, logits_bv, sampling)


def decode_step(model, params, state, sampling):
  """Appends each row's last token to the cache and chooses the next one."""
  real_tokens_b = jnp.sum(state.cache.valid_bs, axis=-1).astype(jnp.int32)
  position_b = real_tokens_b + state.rope_delta_b
  positions_3b1 = jnp.broadcast_to(position_b[None, :, None], (3, position_b.shape[0], 1))
  embeds = model.apply({"params": params}, state.last_token_b[:, None], method="embed")
  valid_b1 = jnp.ones_like(state.last_token_b[:, None], bool)
  hidden, cache = model.apply({"params": params}, embeds, positions_3b1, valid_b1, state.cache,
                              method="decode")
  logits_bv = model.apply({"params": params}, hidden, method="logits")[:, 0]
  return _advance(state.replace(cache=cache), logits_bv, sampling)


@functools.partial(jax.jit, static_argnames=("model", "sampling", "return_logits"))
def _generate(model, params, prompt, sampling, rng, return_logits):
  state = prefill(model, params, prompt, sampling, rng, return_logits)
  keep_going = lambda s: (s.step < sampling.max_new_tokens) & ~jnp.all(s.done_b)
  return jax.lax.while_loop(keep_going, lambda s: decode_step(model, params, s, sampling), state)


@dataclasses.dataclass
class Generation:
  tokens: np.ndarray                # [B, max_new_tokens], pad after the stop token
  lengths: np.ndarray               # [B] tokens up to and including the stop token
  logits: np.ndarray | None         # [B, max_new_tokens, V] when return_logits


def generate(model, params, prompt, sampling=SamplingConfig(), rng=None, return_logits=False):
  """Generates up to `sampling.max_new_tokens` tokens for every row of `prompt`."""
  if sampling.max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {sampling.max_new_tokens}")
  rng = jax.random.key(0) if rng is None else rng
  state = _generate(model, params, prompt, sampling, rng, return_logits)
  tokens = np.asarray(state.tokens_bn)
  is_stop = np.isin(tokens, list(sampling.stop_token_ids))
  first_stop = np.where(is_stop.any(-1), is_stop.argmax(-1) + 1, int(state.step))
  logits = None if state.logits_bnv is None else np.asarray(state.logits_bnv)
  return Generation(tokens, first_stop, logits)
