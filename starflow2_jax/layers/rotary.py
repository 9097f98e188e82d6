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


MROPE_LAYOUTS = ("chunked", "interleaved")


def mrope_axis_of_frequency(half, layout, mrope_section=None):
  """Which position axis (0 = t, 1 = row, 2 = col) each of the `half` frequencies rotates by.

  "chunked" is Qwen2.5-VL's split: consecutive chunks of `mrope_section` sizes, highest
  frequencies to t, then row, then col — so col only gets the lowest frequencies. Keep it
  where weights were trained with it (the VLM stream). "interleaved" deals the frequencies
  round robin (t, row, col, t, row, col, …, as Qwen3-VL does), so every axis gets high and
  low ones; the flow stream, trained from scratch, uses it (SPEC §1).
  """
  if layout == "chunked":
    if mrope_section is None or sum(mrope_section) != half:
      raise ValueError(f"mrope_section {mrope_section} must sum to head_dim // 2 = {half} "
                       "for the chunked M-RoPE layout")
    return [i % 3 for i, size in enumerate(mrope_section) for _ in range(size)]
  if layout == "interleaved":
    return [i % 3 for i in range(half)]
  raise ValueError(f"unknown M-RoPE layout {layout!r}: use one of {MROPE_LAYOUTS}")


def qwen_mrope_section(head_dim):
  """Qwen2.5-VL's chunk sizes over (t, row, col) — a quarter, then halves of the rest
  ((16, 24, 24) at head_dim 128) — for another head size."""
  half = head_dim // 2
  t = half // 4
  row = (half - t + 1) // 2
  return (t, row, half - t - row)


def mrope_angles(positions_3bt, head_dim, theta, mrope_section=None, layout="chunked"):
  """Multimodal RoPE: angles [B, T, head_dim // 2] from (t, row, col) positions [3, B, T].

  The frequencies are those of `rotary_angles`; `layout` says which axis rotates each one
  (`mrope_axis_of_frequency`; Qwen2.5-VL's default is "chunked" with [16, 24, 24] at
  head_dim 128). For text tokens all three axes are equal, which reduces to plain 1-D RoPE
  in either layout.
  """
  half = head_dim // 2
  axis_of_freq = mrope_axis_of_frequency(half, layout, mrope_section)
  inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  positions_hbt = jnp.take(positions_3bt, jnp.asarray(axis_of_freq), axis=0)
  return jnp.moveaxis(positions_hbt.astype(jnp.float32), 0, -1) * inv_freq


def axial_angles(rows_bt, cols_bt, head_dim, theta):
  """2-D RoPE of the Qwen2.5-VL vision tower: the first half of the angles rotate by row,
  the second half by column, each with the frequencies of a head of size head_dim // 2."""
  return jnp.concatenate([rotary_angles(rows_bt, head_dim // 2, theta),
                          rotary_angles(cols_bt, head_dim // 2, theta)], axis=-1)
