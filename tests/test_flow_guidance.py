"""Classifier-free guidance of Gaussian predictions (SPEC §6): p_c^{1+w} / p_u^w."""

import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from starflow2_jax.flows import guidance
from tolerance import assert_float32_close, float32_bound

# guided_gaussian is a chain of elementwise operations: one layer, no reduction.
ELEMENTWISE = dict(depth=1, reduction=1)


def _gaussian_args(seed, shape=(3, 4)):
  rng = np.random.default_rng(seed)
  mean_c, mean_u = rng.normal(size=shape), rng.normal(size=shape)
  log_s_c = rng.normal(scale=0.5, size=shape)
  return mean_c, log_s_c, mean_u, rng


def _guided(mean_c, log_s_c, mean_u, log_s_u, weight):
  """guided_gaussian on float32 copies of the arguments; float64 results."""
  mean, log_s = guidance.guided_gaussian(
      *[jnp.asarray(a, jnp.float32) for a in (mean_c, log_s_c, mean_u, log_s_u)], weight)
  return np.asarray(mean, np.float64), np.asarray(log_s, np.float64)


def test_guidance_weight_zero_is_conditional_exactly():
  mean_c, log_s_c, mean_u, rng = _gaussian_args(0)
  log_s_u = rng.normal(scale=0.5, size=log_s_c.shape)      # either order of the scales
  args = [jnp.asarray(a, jnp.float32) for a in (mean_c, log_s_c, mean_u, log_s_u)]
  mean, log_s = guidance.guided_gaussian(*args, 0.0)
  assert helpers.bits(mean) == helpers.bits(args[0])
  assert helpers.bits(log_s) == helpers.bits(args[1])


def _log_normal(x, mean, log_s):
  return -0.5 * ((x - mean) / np.exp(log_s)) ** 2 - log_s - 0.5 * np.log(2 * np.pi)


@pytest.mark.parametrize("weight", [0.5, 2.0, 7.0])
def test_guidance_is_the_normalised_power_product(weight):
  mean_c, log_s_c, mean_u, rng = _gaussian_args(1)
  log_s_u = log_s_c + rng.uniform(0.0, 1.0, size=log_s_c.shape)   # s_c <= s_u
  log_s_u[0, 0] = log_s_c[0, 0]                                    # equal scales too
  mean, log_s = _guided(mean_c, log_s_c, mean_u, log_s_u, weight)

  # Log-densities at several points agree up to an x-independent constant. The target is a
  # difference of two terms far larger than itself; float32 (mean, log_s) carry rounding
  # relative to those terms.
  points = mean_c[None] + 3.0 * rng.normal(size=(9,) + mean_c.shape)
  conditional = (1 + weight) * _log_normal(points, mean_c, log_s_c)
  unconditional = weight * _log_normal(points, mean_u, log_s_u)
  diff = _log_normal(points, mean, log_s) - (conditional - unconditional)
  terms = float(np.max(np.abs(conditional) + np.abs(unconditional)))
  assert np.max(np.abs(diff - diff.mean(axis=0))) <= float32_bound(terms, **ELEMENTWISE)

  # Completing the square independently: precisions add, precision-weighted means add.
  prec = (1 + weight) * np.exp(-2 * log_s_c) - weight * np.exp(-2 * log_s_u)
  expected_mean = ((1 + weight) * mean_c * np.exp(-2 * log_s_c)
                   - weight * mean_u * np.exp(-2 * log_s_u)) / prec
  assert_float32_close(mean, expected_mean, **ELEMENTWISE)
  assert_float32_close(log_s, -0.5 * np.log(prec), **ELEMENTWISE)


def test_guidance_clips_when_unconditional_is_narrower():
  """s_c > s_u: the product is not normalisable; r is clipped to 1 (SPEC §6), which keeps
  the conditional scale and extrapolates the mean."""
  mean_c, log_s_c, mean_u, _ = _gaussian_args(2)
  log_s_u = log_s_c - 0.3
  w = 2.0
  mean, log_s = _guided(mean_c, log_s_c, mean_u, log_s_u, w)
  assert_float32_close(log_s, log_s_c, **ELEMENTWISE)
  assert_float32_close(mean, (1 + w) * mean_c - w * mean_u, **ELEMENTWISE)
