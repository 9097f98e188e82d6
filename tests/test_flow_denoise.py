"""Tweedie denoising (SPEC §4) on a Gaussian whose score is known in closed form."""

import jax.numpy as jnp
import numpy as np

from starflow2_jax.flows import denoise
from tolerance import assert_float32_close

DATA_VAR = 0.04


def _gaussian_problem(seed=0):
  rng = np.random.default_rng(seed)
  m = rng.normal(size=(3, 4, 2))
  x = m + rng.normal(size=m.shape)

  def log_prob(x_bnd, t_b):
    var = DATA_VAR + jnp.square(t_b)[:, None, None]
    return jnp.sum(-0.5 * jnp.square(x_bnd - m) / var - 0.5 * jnp.log(2 * jnp.pi * var),
                   axis=(1, 2))

  return m, x, log_prob


def _posterior_mean(x, m, sigma):
  return m + DATA_VAR / (DATA_VAR + sigma ** 2) * (x - m)


def test_noise_ladder():
  ladder = np.asarray(denoise.noise_ladder(0.5, 0.05, 4), np.float64)
  assert ladder.shape == (5,)
  np.testing.assert_allclose([ladder[0], ladder[-1]], [0.5, 0.05], rtol=1e-6)
  ratios = ladder[1:] / ladder[:-1]
  np.testing.assert_allclose(ratios, ratios[0], rtol=1e-5)
  assert np.all(ratios < 1)
  np.testing.assert_allclose(denoise.noise_ladder(0.5, 0.05, 0), [0.5])


def test_tweedie_zero_steps_is_posterior_mean():
  m, x, log_prob = _gaussian_problem()
  sigma = 0.5
  out = denoise.tweedie_denoise(log_prob, jnp.asarray(x, jnp.float32),
                                denoise.noise_ladder(sigma, 0.05, 0))
  # One Tweedie step, elementwise (the score of independent elements).
  assert_float32_close(out, _posterior_mean(x, m, sigma), depth=1, reduction=1)


def _euler_by_hand(x, m, sigmas):
  sigmas = np.asarray(sigmas, np.float64)
  for s, s_next in zip(sigmas[:-1], sigmas[1:]):
    x_hat = _posterior_mean(x, m, s)
    x = x - (x - x_hat) / s * (s - s_next)
  return _posterior_mean(x, m, sigmas[-1])


def test_tweedie_euler_steps_match_hand_recursion():
  m, x, log_prob = _gaussian_problem(1)
  steps = 4
  sigmas = denoise.noise_ladder(0.5, 0.05, steps)
  out = np.asarray(denoise.tweedie_denoise(log_prob, jnp.asarray(x, jnp.float32), sigmas))
  # `steps` Euler steps and a last Tweedie step, each elementwise.
  assert_float32_close(out, _euler_by_hand(x, m, sigmas), depth=steps + 1, reduction=1)
  # Denoising moves every sample toward the data mean.
  assert np.all(np.abs(out - m) < np.abs(x - m))


def test_tweedie_converges_to_probability_flow_ode():
  """dx/dσ = σ (x − m)/(v + σ²) has the solution x(σ) − m ∝ sqrt(v + σ²); with many small
  steps the Euler ladder approaches it, with an error that shrinks with the step count."""
  m, x, log_prob = _gaussian_problem(2)
  t_max, t_min = 0.5, 0.05
  x_ode = m + (x - m) * np.sqrt((DATA_VAR + t_min ** 2) / (DATA_VAR + t_max ** 2))
  exact = _posterior_mean(x_ode, m, t_min)
  errors = []
  for steps in (8, 256):
    out = denoise.tweedie_denoise(log_prob, jnp.asarray(x, jnp.float32),
                                  denoise.noise_ladder(t_max, t_min, steps))
    errors.append(float(np.max(np.abs(np.asarray(out) - exact))))
  assert errors[1] < 0.1 * errors[0]
  assert errors[1] <= 2e-3 * float(np.max(np.abs(exact - m)))
