"""The patch latent space (SPEC §5): non-overlapping p×p pixel patches, no parameters.

8-bit pixels k map to bin centres x = (k + ½)/128 − 1 in [−1, 1] (bins of width 2/256),
so `decode(encode(img)) == img` exactly and pixel bits/dim use the standard convention.
"""

import dataclasses

import einops
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class PatchLatent:
  image_size: tuple  # (H, W)
  channels: int
  patch_size: int

  def __post_init__(self):
    h, w = self.image_size
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(f"image size {self.image_size} is not divisible by patch size "
                       f"{self.patch_size}")

  @property
  def grid(self):
    return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

  @property
  def num_tokens(self):
    return self.grid[0] * self.grid[1]

  @property
  def token_dim(self):
    return self.patch_size ** 2 * self.channels

  def encode(self, images_bhwc):
    """uint8 [B, H, W, C] (or floats already on the 0..255 scale) -> x [B, N, D]."""
    x = (jnp.asarray(images_bhwc, jnp.float32) + 0.5) / 128.0 - 1.0
    p = self.patch_size
    return einops.rearrange(x, "b (gh p) (gw q) c -> b (gh gw) (p q c)", p=p, q=p)

  def decode(self, x_bnd):
    """x [B, N, D] -> uint8 images [B, H, W, C], rounding to the nearest bin."""
    p, (gh, gw) = self.patch_size, self.grid
    img = einops.rearrange(x_bnd, "b (gh gw) (p q c) -> b (gh p) (gw q) c", gh=gh, gw=gw, p=p, q=p)
    return jnp.clip(jnp.floor((img + 1.0) * 128.0), 0, 255).astype(jnp.uint8)
