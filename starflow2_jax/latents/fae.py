"""The FAE latent space (SPEC §5): frozen DINOv2 patch features, encoded by the FAE.

    images --DINOv2--> features [B, N, F] --FAE encoder--> latent x = posterior mean [B, N, D]
    x --feature decoder--> features --pixel decoder--> images

The latent is the encoder's posterior *mean* (deterministic, so latents precomputed once
equal those computed at every step), standardised per channel by `shift` and `scale` —
statistics of the FAE's training images, as latent diffusion scales its latents — so the
flow sees zero-mean, unit-scale data whatever β left the KL at
(`training.frozen.latent_statistics`). Pixels decoded on the [−1, 1] scale map back to
8-bit values with the patch latent's bins.

The latent holds its frozen parameters (`training.frozen` loads them from a converted
DINOv2 or a pretraining workdir, and an FAE workdir); calls inside a jitted step close
over them. At scale, precompute the latents once instead (`starflow2 precompute-latents`).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from starflow2_jax.latents import patch
from starflow2_jax.models import fae as fae_lib
from starflow2_jax.models.dinov2 import model as dinov2_lib


def dinov2_pixels(images_bhwc, image_size, mean, std):
  """uint8 images [B, H, W, C] -> DINOv2's input [B, S, S, 3]: scaled to [0, 1], grey
  repeated to RGB, resized (bicubic, antialiased) to S = `image_size` unless already there,
  normalised by the checkpoint's mean and std."""
  x = jnp.asarray(images_bhwc, jnp.float32) / 255.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[1:3] != (image_size, image_size):
    x = jax.image.resize(x, (x.shape[0], image_size, image_size, 3), "bicubic", antialias=True)
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class FrozenDinov2:
  """A DINOv2 with its parameters and its preprocessor's mean and std."""
  config: object             # models.dinov2.config.Dinov2Config
  params: object
  mean: tuple
  std: tuple

  @property
  def module(self):
    return dinov2_lib.Dinov2(self.config)

  def features(self, images_bhwc, params=None):
    """uint8 images -> patch features [B, N, F] (final norm; [CLS] and registers dropped).
    `params` replaces the frozen ones (e.g. a trained copy)."""
    pixels = dinov2_pixels(images_bhwc, self.config.image_size, self.mean, self.std)
    return self.features_of_pixels(pixels, params)

  def features_of_pixels(self, pixels_bhwc, params=None):
    return self.module.apply({"params": self.params if params is None else params},
                             pixels_bhwc, method=dinov2_lib.Dinov2.patch_features)


@dataclasses.dataclass(frozen=True, eq=False)
class FAELatent:
  """The `space.LatentSpace` of a trained FAE over frozen DINOv2 features."""
  dinov2: FrozenDinov2
  config: object             # models.fae.FAEConfig
  params: object             # the FAE's parameters {encoder, feature_decoder, pixel_decoder}
  shift: object = 0.0        # [D] per-channel mean of the posterior means (or 0)
  scale: object = 1.0        # [D] per-channel std (or 1)

  def __post_init__(self):
    grid = (self.dinov2.config.grid,) * 2
    if grid != self.config.grid or self.dinov2.config.hidden_size != self.config.feature_dim:
      raise ValueError(f"the FAE reads a {self.config.grid} grid of {self.config.feature_dim} "
                       f"features; the DINOv2 gives {grid} of {self.dinov2.config.hidden_size}")

  @property
  def module(self):
    return fae_lib.FAE(self.config)

  @property
  def grid(self):
    return self.config.grid

  @property
  def num_tokens(self):
    return self.config.num_tokens

  @property
  def token_dim(self):
    return self.config.latent_dim

  def posterior_mean(self, images_bhwc):
    """The encoder's posterior mean, before standardisation."""
    mean, _ = self.module.apply({"params": self.params}, self.dinov2.features(images_bhwc),
                                method="encode")
    return mean

  def encode(self, images_bhwc):
    return (self.posterior_mean(images_bhwc) - jnp.asarray(self.shift)) / jnp.asarray(self.scale)

  def decode_features(self, x_bnd):
    mean = x_bnd * jnp.asarray(self.scale) + jnp.asarray(self.shift)
    return self.module.apply({"params": self.params}, mean, method="decode_features")

  def decode(self, x_bnd):
    images = self.module.apply({"params": self.params}, self.decode_features(x_bnd),
                               method="decode_pixels")
    return patch.unit_to_pixels(images)

  def dequantize(self, rng, x):
    """A continuous latent is its own density sample."""
    del rng
    return x

  def likelihood_metrics(self, nll_nats_per_dim):
    """Bits per latent dimension (pixel bits/dim are not defined for a learned latent)."""
    return {"latent_bpd": nll_nats_per_dim / math.log(2)}
