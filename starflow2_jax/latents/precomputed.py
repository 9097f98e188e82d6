"""A latent space known only by its shape: records carry the latents (`precompute-latents`).

What a run at scale trains on: the FAE ran once over the data, so a training step needs no
DINOv2 and no FAE weights — only the grid and the channel count. Everything shape-based works
(building the model, training, bits/dim, memory plans); encoding pixels or decoding latents
needs the FAE itself: set `config.latent.fae_workdir` for that (samples, evaluators).
"""

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class PrecomputedLatent:
  """The `space.LatentSpace` shape of continuous latents read from the records."""
  grid: tuple             # (gh, gw)
  token_dim: int          # D

  @property
  def num_tokens(self):
    return self.grid[0] * self.grid[1]

  def encode(self, images_bhwc):
    raise ValueError("this run reads precomputed latents and has no encoder: give "
                     "config.latent.fae_workdir (a trained FAE) to encode images")

  def decode(self, x_bnd):
    raise ValueError("this run reads precomputed latents and has no decoder: give "
                     "config.latent.fae_workdir (a trained FAE) to decode latents")

  def dequantize(self, rng, x):
    """A continuous latent is its own density sample."""
    del rng
    return x

  def likelihood_metrics(self, nll_nats_per_dim):
    """Bits per latent dimension."""
    return {"latent_bpd": nll_nats_per_dim / math.log(2)}
