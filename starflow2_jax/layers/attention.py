"""Causal multi-head self-attention with rotary positions and an optional KV cache.

One code path serves three uses: a full causal pass (training, likelihood), a prefill
that writes a prompt into a cache, and single-token decode steps. Masking is by cache
slot: a query at slot i sees keys at slots <= i that hold real tokens (`valid`), and
always itself, so a fully padded row never produces a NaN.

The same layer covers the Qwen2.5-VL variants: grouped-query attention (`num_kv_heads`),
precomputed rotary angles (M-RoPE, 2-D vision RoPE) and an explicit mask (the vision tower's
bidirectional window/segment mask). Non-causal layers (ViTs, the FAE) pass
`bidirectional_mask`, and may drop the rotary positions (`rope=False`) or the output
projection (`project_out=False`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from starflow2_jax.layers import rotary

Dtype = jnp.dtype


def causal_slot_mask(query_slots_t, key_slots_s, key_valid_bs):
  """Boolean [B, 1, T, S]: causal by slot, padding keys hidden, the diagonal always kept."""
  causal = key_slots_s[None, :] <= query_slots_t[:, None]
  is_self = key_slots_s[None, :] == query_slots_t[:, None]
  mask = causal[None] & (key_valid_bs[:, None, :] | is_self[None])
  return mask[:, None]


def bidirectional_mask(key_valid_bs):
  """Boolean [B, 1, 1, S]: every query sees every real key (non-causal attention)."""
  return key_valid_bs.astype(bool)[:, None, None, :]


class CausalSelfAttention(nn.Module):
  """Pre-projected causal attention; parameters carry logical axis names.

  Attributes:
    num_kv_heads: key/value heads for grouped-query attention (None: `num_heads`); query head
      n reads key/value head n // (num_heads // num_kv_heads), as in Hugging Face's repeat_kv.
    use_bias: biases on the query, key and value projections.
    out_bias: a bias on the output projection.
    rope: rotate queries and keys; False for tokens that carry learned absolute positions
      (a ViT's position table), which then need neither positions nor angles.
    project_out: False returns the heads concatenated, [B, T, num_heads · head_dim], without
      the output projection (for a layer that maps them on itself, as the FAE encoder does).
  """
  num_heads: int
  head_dim: int
  rope_theta: float = 10_000.0
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  num_kv_heads: int | None = None
  out_bias: bool = False
  rope: bool = True
  project_out: bool = True

  def _weight(self, name, shape, axes, init=nn.initializers.lecun_normal()):
    boxed = nn.with_logical_partitioning(init, axes)
    return self.param(name, boxed, shape, self.param_dtype).astype(self.dtype)

  def _project_in(self, name, x_btd, num_heads=None, heads_axis="heads"):
    width = x_btd.shape[-1]
    num_heads = num_heads or self.num_heads
    w_dnh = self._weight(f"{name}_kernel", (width, num_heads, self.head_dim),
                         ("embed", heads_axis, "head_dim"))
    y_btnh = jnp.einsum("btd,dnh->btnh", x_btd.astype(self.dtype), w_dnh)
    if self.use_bias:
      b_nh = self._weight(f"{name}_bias", (num_heads, self.head_dim), (heads_axis, "head_dim"),
                          nn.initializers.zeros)
      y_btnh = y_btnh + b_nh
    return y_btnh

  def _project_kv(self, name, x_btd):
    """Keys or values; with grouped-query attention their heads use the "kv_heads" axis."""
    if self.num_kv_heads is None or self.num_kv_heads == self.num_heads:
      return self._project_in(name, x_btd)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                       f"{self.num_kv_heads}")
    return self._project_in(name, x_btd, self.num_kv_heads, "kv_heads")

  @nn.compact
  def __call__(self, x_btd, positions_bt, valid_bt, layer_cache=None, cache_length=None,
               cache_valid_bs=None, *, angles_bth=None, mask_b1ts=None):
    """Returns (y [B, T, D], updated LayerCache or None).

    Without a cache, attends over `x` itself. With one, writes this call's keys and values
    at slots [cache_length, cache_length + T) and attends over the whole cache;
    `cache_valid_bs` must already mark this call's tokens.

    `angles_bth` (rotary angles [B, T, head_dim // 2]) replaces the 1-D angles of
    `positions_bt` (which may then be None); `mask_b1ts` (boolean, broadcastable to
    [B, 1, T, S]) replaces the causal slot mask.
    """
    q, k = self._project_in("query", x_btd), self._project_kv("key", x_btd)
    if self.rope:
      if angles_bth is None:
        angles_bth = rotary.rotary_angles(positions_bt, self.head_dim, self.rope_theta)
      q, k = rotary.apply_rotary(q, angles_bth), rotary.apply_rotary(k, angles_bth)
    v = self._project_kv("value", x_btd)
    num_queries = x_btd.shape[1]
    if layer_cache is None:
      keys, values, key_valid = k, v, valid_bt
      query_slots = key_slots = jnp.arange(num_queries)
    else:
      layer_cache, keys, values = layer_cache.append(k, v, cache_length)
      keys, values = keys.astype(self.dtype), values.astype(self.dtype)
      key_valid = cache_valid_bs
      query_slots = cache_length + jnp.arange(num_queries)
      key_slots = jnp.arange(keys.shape[1])
    if mask_b1ts is None:
      mask_b1ts = causal_slot_mask(query_slots, key_slots, key_valid)
    attended_btnh = jax.nn.dot_product_attention(q, keys, values, mask=mask_b1ts)
    if not self.project_out:
      return attended_btnh.reshape(*attended_btnh.shape[:2], -1), layer_cache
    w_nhd = self._weight("out_kernel", (self.num_heads, self.head_dim, x_btd.shape[-1]),
                         ("heads", "head_dim", "embed"))
    y_btd = jnp.einsum("btnh,nhd->btd", attended_btnh, w_nhd)
    if self.out_bias:
      y_btd = y_btd + self._weight("out_bias", (x_btd.shape[-1],), ("embed",),
                                   nn.initializers.zeros)
    return y_btd, layer_cache
