"""Causal multi-head self-attention with rotary positions and an optional KV cache.

One code path serves three uses: a full causal pass (training, likelihood), a prefill
that writes a prompt into a cache, and single-token decode steps. Masking is by cache
slot: a query at slot i sees keys at slots <= i that hold real tokens (`valid`), and
always itself, so a fully padded row never produces a NaN.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from starflow2_jax.layers import kv_cache as kv_cache_lib
from starflow2_jax.layers import rotary

Dtype = jnp.dtype


def causal_slot_mask(query_slots_t, key_slots_s, key_valid_bs):
  """Boolean [B, 1, T, S]: causal by slot, padding keys hidden, the diagonal always kept."""
  causal = key_slots_s[None, :] <= query_slots_t[:, None]
  is_self = key_slots_s[None, :] == query_slots_t[:, None]
  mask = causal[None] & (key_valid_bs[:, None, :] | is_self[None])
  return mask[:, None]


class CausalSelfAttention(nn.Module):
  """Pre-projected causal attention; parameters carry logical axis names."""
  num_heads: int
  head_dim: int
  rope_theta: float = 10_000.0
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _weight(self, name, shape, axes, init=nn.initializers.lecun_normal()):
    boxed = nn.with_logical_partitioning(init, axes)
    return self.param(name, boxed, shape, self.param_dtype).astype(self.dtype)

  def _project_in(self, name, x_btd):
    width = x_btd.shape[-1]
    w_dnh = self._weight(f"{name}_kernel", (width, self.num_heads, self.head_dim),
                         ("embed", "heads", "head_dim"))
    y_btnh = jnp.einsum("btd,dnh->btnh", x_btd.astype(self.dtype), w_dnh)
    if self.use_bias:
      b_nh = self._weight(f"{name}_bias", (self.num_heads, self.head_dim), ("heads", "head_dim"),
                          nn.initializers.zeros)
      y_btnh = y_btnh + b_nh
    return y_btnh

  @nn.compact
  def __call__(self, x_btd, positions_bt, valid_bt, layer_cache=None, cache_length=None,
               cache_valid_bs=None):
    """Returns (y [B, T, D], updated LayerCache or None).

    Without a cache, attends over `x` itself. With one, writes this call's keys and values
    at slots [cache_length, cache_length + T) and attends over the whole cache;
    `cache_valid_bs` must already mark this call's tokens.
    """
    angles = rotary.rotary_angles(positions_bt, self.head_dim, self.rope_theta)
    q = rotary.apply_rotary(self._project_in("query", x_btd), angles)
    k = rotary.apply_rotary(self._project_in("key", x_btd), angles)
    v = self._project_in("value", x_btd)
    num_queries = x_btd.shape[1]
    if layer_cache is None:
      keys, values, key_valid = k, v, valid_bt
      query_slots = key_slots = jnp.arange(num_queries)
    else:
      start = (0, cache_length, 0, 0)
      keys = jax.lax.dynamic_update_slice(layer_cache.keys_bsnh, k.astype(
          layer_cache.keys_bsnh.dtype), start)
      values = jax.lax.dynamic_update_slice(layer_cache.values_bsnh, v.astype(
          layer_cache.values_bsnh.dtype), start)
      layer_cache = kv_cache_lib.LayerCache(keys, values)
      keys, values = keys.astype(self.dtype), values.astype(self.dtype)
      key_valid = cache_valid_bs
      query_slots = cache_length + jnp.arange(num_queries)
      key_slots = jnp.arange(keys.shape[1])
    mask = causal_slot_mask(query_slots, key_slots, key_valid)
    attended_btnh = jax.nn.dot_product_attention(q, keys, values, mask=mask)
    w_nhd = self._weight("out_kernel", (self.num_heads, self.head_dim, x_btd.shape[-1]),
                         ("heads", "head_dim", "embed"))
    y_btd = jnp.einsum("btnh,nhd->btd", attended_btnh, w_nhd)
    return y_btd, layer_cache
