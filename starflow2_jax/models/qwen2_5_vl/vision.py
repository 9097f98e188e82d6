"""The Qwen2.5-VL vision tower: patch embedding, 2-D RoPE ViT with window attention, merger.

Hugging Face permutes tokens so that each attention window is contiguous; attention does
not care about order, so here every patch keeps its place and a *segment mask* (same
window, or same frame for the full-attention blocks) gives exactly the same result.
`grid_inputs` computes the per-patch rows, columns and segment ids on the host from the
images' (t, h, w) patch grids; the patches arrive in the image processor's block-major order
(2×2 merge groups contiguous), so the merger just groups consecutive rows.
"""

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from starflow2_jax.layers import attention
from starflow2_jax.layers import rotary
from starflow2_jax.models.qwen2_5_vl import blocks


@flax.struct.dataclass
class VisionGrid:
  """Per-patch metadata for N patches of one or more images (all int32 [N])."""
  rows_n: jnp.ndarray
  cols_n: jnp.ndarray
  frame_segment_n: jnp.ndarray       # one id per (image, frame): full attention
  window_segment_n: jnp.ndarray      # one id per (image, frame, window): window attention


def grid_inputs(grid_thw, config):
  """`VisionGrid` (numpy) for images with patch grids `grid_thw` [(t, h, w), ...]."""
  m, win = config.spatial_merge_size, config.window_merged
  rows, cols, frames, windows = [], [], [], []
  num_frames = num_windows = 0
  for t, h, w in np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3):
    if h % m or w % m:
      raise ValueError(f"image grid {(t, h, w)} is not a multiple of spatial_merge_size {m}")
    # Block-major patch order: (merged row, merged col, row in block, col in block).
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    r = r.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
    c = c.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
    windows_w = -(-(w // m) // win)
    window = (r // m // win) * windows_w + (c // m // win)
    windows_per_frame = -(-(h // m) // win) * windows_w
    for _ in range(t):
      rows.append(r)
      cols.append(c)
      frames.append(np.full(h * w, num_frames))
      windows.append(window + num_windows)
      num_frames += 1
      num_windows += windows_per_frame
  cat = lambda parts: np.concatenate(parts).astype(np.int32)
  return VisionGrid(cat(rows), cat(cols), cat(frames), cat(windows))


class VisionBlock(nn.Module):
  config: object            # config.VisionConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_1nd, angles_1nh, mask_11nn):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h_1nd = blocks.RMSNorm(cfg.rms_norm_eps, name="norm1", **kw)(x_1nd)
    h_1nd, _ = attention.CausalSelfAttention(
        cfg.num_heads, cfg.head_dim, use_bias=True, out_bias=True, name="attention", **kw)(
            h_1nd, None, None, angles_bth=angles_1nh, mask_b1ts=mask_11nn)
    x_1nd = x_1nd + h_1nd
    h_1nd = blocks.RMSNorm(cfg.rms_norm_eps, name="norm2", **kw)(x_1nd)
    return x_1nd + blocks.SwiGLU(cfg.intermediate_size, use_bias=True, name="mlp", **kw)(h_1nd)


class PatchMerger(nn.Module):
  """RMSNorm, then each 2×2 group of patches (4 consecutive rows) -> MLP -> LM width."""
  config: object
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_nd):
    cfg = self.config
    group = cfg.spatial_merge_size ** 2
    x_nd = blocks.RMSNorm(cfg.rms_norm_eps, name="norm", dtype=self.dtype,
                          param_dtype=self.param_dtype)(x_nd)
    x_mg = x_nd.reshape(-1, group * cfg.hidden_size)
    width = group * cfg.hidden_size
    w1 = blocks.dense_param(self, "hidden_kernel", (width, width), (None, "mlp"))
    b1 = blocks.dense_param(self, "hidden_bias", (width,), ("mlp",), nn.initializers.zeros)
    w2 = blocks.dense_param(self, "out_kernel", (width, cfg.out_hidden_size), ("mlp", "embed"))
    b2 = blocks.dense_param(self, "out_bias", (cfg.out_hidden_size,), ("embed",),
                            nn.initializers.zeros)
    h_mg = jax.nn.gelu(x_mg @ w1 + b1, approximate=False)
    return h_mg @ w2 + b2


class VisionTower(nn.Module):
  """patches [N, C·T·P·P] (processor layout) + `VisionGrid` -> image features [N / 4, H_lm]."""
  config: object            # config.VisionConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, patches_np, grid):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if patches_np.shape[-1] != cfg.patch_dim:
      raise ValueError(f"patches have {patches_np.shape[-1]} values each, the vision config "
                       f"expects {cfg.patch_dim} (channels × temporal × patch × patch)")
    w_pd = blocks.dense_param(self, "patch_embed", (cfg.patch_dim, cfg.hidden_size),
                              (None, "embed"))
    x_1nd = (patches_np.astype(self.dtype) @ w_pd)[None]
    angles_1nh = rotary.axial_angles(grid.rows_n[None], grid.cols_n[None], cfg.head_dim,
                                     cfg.rope_theta)
    same = lambda seg_n: (seg_n[:, None] == seg_n[None, :])[None, None]
    full_mask, window_mask = same(grid.frame_segment_n), same(grid.window_segment_n)
    for i in range(cfg.depth):
      mask = full_mask if i in cfg.fullatt_block_indexes else window_mask
      x_1nd = VisionBlock(cfg, name=f"block_{i}", **kw)(x_1nd, angles_1nh, mask)
    return PatchMerger(cfg, name="merger", **kw)(x_1nd[0])
