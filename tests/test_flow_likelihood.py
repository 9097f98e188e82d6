"""Exact likelihoods of a flow and their bits-per-dimension conventions (SPEC §4)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from starflow2_jax.flows import likelihood
from tolerance import assert_float32_close


def test_nll_of_standard_normal():
  z = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)
  num_dims = z.shape[1] * z.shape[2]
  tolerance = dict(depth=1, reduction=num_dims)      # one sum over the N·D dimensions
  nll = likelihood.nll_per_dim(jnp.asarray(z), jnp.zeros(3))
  expected = np.mean(0.5 * z.astype(np.float64) ** 2 + 0.5 * np.log(2 * np.pi), axis=(1, 2))
  assert_float32_close(nll, expected, **tolerance)
  # A log-det raises the likelihood by log_det / (N·D) nats per dimension.
  log_det = jnp.array([1.0, -2.0, 20.0])
  assert_float32_close(likelihood.nll_per_dim(jnp.asarray(z), log_det),
                       expected - np.asarray(log_det) / num_dims, **tolerance)


def test_bits_per_dim_conventions():
  # Uniform on [−1, 1]: density 1/2 per dimension, i.e. ln 2 nats; that is 8 bits per 8-bit pixel.
  assert likelihood.pixel_bits_per_dim(math.log(2.0)) == pytest.approx(8.0, abs=1e-12)
  assert likelihood.latent_bits_per_dim(math.log(2.0)) == pytest.approx(1.0, abs=1e-12)
  # Standard normal at 0: ½ log 2π nats = that / ln 2 bits.
  assert likelihood.latent_bits_per_dim(likelihood.HALF_LOG_2PI) == pytest.approx(
      0.5 * math.log2(2 * math.pi), abs=1e-12)
