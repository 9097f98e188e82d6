"""Rotary position embeddings (RoPE) over integer positions.

Positions are explicit inputs, never implied by array offsets, so the same layer serves
training (positions 0..T-1), KV-cached decoding (one position per step) and, later, the
3-D M-RoPE positions of Qwen2.5-VL (which only change how `positions` are built).
"""

import jax.numpy as jnp


def rotary_angles(positions_bt, head_dim, theta):
  """Angles [B, T, head_dim // 2] for integer positions [B, T]."""
  half = head_dim // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  return positions_bt.astype(jnp.float32)[..., None] * inv_freq


def apply_rotary(x_btnh, angles_bth):
  """Rotates the two halves of every head (the "rotate_half" convention), in float32."""
  x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
  cos = jnp.cos(angles_bth)[:, :, None, :]
  sin = jnp.sin(angles_bth)[:, :, None, :]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_btnh.dtype)
