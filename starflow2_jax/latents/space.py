"""The one interface every latent space offers (SPEC §5); the config's `latent.name` picks one.

Stages, the sampler, the CLI and the evaluators see images only through it:

    x = space.encode(images)    uint8 [B, H, W, C] -> float32 [B, N, D]
    images = space.decode(x)    float32 [B, N, D]  -> uint8 [B, H, W, C]

and through what the likelihood needs: `dequantize` (how a discrete datum becomes a density
sample: the patch latent spreads each pixel over its 8-bit bin, a continuous latent is used
as it is) and `likelihood_metrics` (which bits/dim the NLL means: pixel bits/dim where the
latent is the pixels themselves, bits per latent dimension otherwise).
"""

from typing import Protocol

import jax


class LatentSpace(Protocol):
  """What a latent space offers; `patch.PatchLatent` and `fae.FAELatent` implement it."""

  @property
  def grid(self) -> tuple:
    """(gh, gw): the latent grid of one image, N = gh · gw elements."""

  @property
  def num_tokens(self) -> int:
    """N, latent elements per image."""

  @property
  def token_dim(self) -> int:
    """D, values per latent element."""

  def encode(self, images_bhwc: jax.Array) -> jax.Array:
    """uint8 images [B, H, W, C] -> latents [B, N, D] (jittable)."""

  def decode(self, x_bnd: jax.Array) -> jax.Array:
    """Latents [B, N, D] -> uint8 images [B, H, W, C] (jittable)."""

  def dequantize(self, rng: jax.Array, x: jax.Array) -> jax.Array:
    """The density sample the flow's NLL is measured on."""

  def likelihood_metrics(self, nll_nats_per_dim: jax.Array) -> dict:
    """{name: bits/dim} for a per-dimension NLL in nats."""
