"""The patch latent space (SPEC §5): non-overlapping p×p pixel patches, no parameters.

8-bit pixels k map to bin centres x = (k + ½)/128 − 1 in [−1, 1] (bins of width 2/256),
so `decode(encode(img)) == img` exactly and pixel bits/dim use the standard convention.
"""

import dataclasses

import einops
import jax
import jax.numpy as jnp

from starflow2_jax.flows import likelihood


def pixels_to_unit(images):
  """uint8 pixels k (or floats on the 0..255 scale) -> bin centres (k + ½)/128 − 1."""
  return (jnp.asarray(images, jnp.float32) + 0.5) / 128.0 - 1.0


def unit_to_pixels(x):
  """[−1, 1] values -> uint8 pixels, each to the 8-bit bin it falls in (inverts the above)."""
  return jnp.clip(jnp.floor((x + 1.0) * 128.0), 0, 255).astype(jnp.uint8)


def uniform_dequantize(rng, x):
  """Spreads each 8-bit bin centre uniformly over its bin (width 2/256)."""
  return x + jax.random.uniform(rng, x.shape, jnp.float32, -1 / 256, 1 / 256)


@dataclasses.dataclass(frozen=True)
class PatchLatent:
  """The `space.LatentSpace` of pixel patches."""

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
    x = pixels_to_unit(images_bhwc)
    p = self.patch_size
    return einops.rearrange(x, "b (gh p) (gw q) c -> b (gh gw) (p q c)", p=p, q=p)

  def decode(self, x_bnd):
    """x [B, N, D] -> uint8 images [B, H, W, C], rounding to the nearest bin."""
    p, (gh, gw) = self.patch_size, self.grid
    img = einops.rearrange(x_bnd, "b (gh gw) (p q c) -> b (gh p) (gw q) c", gh=gh, gw=gw, p=p, q=p)
    return unit_to_pixels(img)

  def dequantize(self, rng, x):
    return uniform_dequantize(rng, x)

  def likelihood_metrics(self, nll_nats_per_dim):
    """Pixel bits/dim: the flow's NLL is a bound on the 8-bit pixels' (TARFlow convention)."""
    return {"pixel_bpd": likelihood.pixel_bits_per_dim(nll_nats_per_dim)}
