"""Exact log-likelihoods of a flow and their bits-per-dimension conventions (SPEC §4)."""

import math

import jax.numpy as jnp

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def nll_per_dim(z_bnd, log_det_b):
  """−log p(x) / (N·D) per example, in nats, for a standard Gaussian prior on z.

  `log_det_b` is the total log|det ∂z/∂x| of every block the data went through.
  """
  num_dims = z_bnd.shape[1] * z_bnd.shape[2]
  energy = 0.5 * jnp.sum(jnp.square(z_bnd.astype(jnp.float32)), axis=(1, 2))
  return (energy - log_det_b) / num_dims + HALF_LOG_2PI


def latent_bits_per_dim(nll_nats_per_dim):
  """Bits per latent dimension for a continuous density."""
  return nll_nats_per_dim / math.log(2)


def pixel_bits_per_dim(nll_nats_per_dim):
  """Bits per 8-bit pixel value for data scaled to [−1, 1] (bin width 2/256).

  Rescaling [−1, 1] to the 0..256 pixel scale divides densities by 128, so the NLL on the
  pixel scale (a bound on the discrete NLL under uniform dequantisation) is NLL + ln 128
  nats; this is the convention of the TARFlow papers.
  """
  return (nll_nats_per_dim + math.log(128.0)) / math.log(2)
