"""Iterative Tweedie denoising with the flow's own score (SPEC §4, multi-noise sampling).

Samples come out of the flow at the largest noise level t1. Going down a ladder of levels
σ_0 = t1 > … > σ_K = t0, each step estimates the clean image by Tweedie's formula,
x̂ = x + σ² ∇ₓ log p(x | σ), and moves x toward it by one Euler step of the probability-flow
ODE; a last Tweedie step at t0 removes the remaining noise. With K = 0 this is the single
Tweedie step of plain TARFlow/STARFlow.
"""

import jax
import jax.numpy as jnp


def noise_ladder(t_max, t_min, num_steps):
  """Geometric levels from t_max down to t_min (num_steps + 1 values)."""
  if num_steps == 0:
    return jnp.array([t_max], jnp.float32)
  return jnp.exp(jnp.linspace(jnp.log(t_max), jnp.log(t_min), num_steps + 1)).astype(jnp.float32)


def tweedie_denoise(log_prob_fn, x_bnd, sigmas):
  """Denoises `x` (at noise level sigmas[0]) down the ladder.

  Args:
    log_prob_fn: (x [B, N, D], t [B]) -> log p(x | t) [B]; examples must be independent.
    x_bnd: samples at noise level sigmas[0].
    sigmas: decreasing noise levels, a static-length 1-D array.
  """
  batch = x_bnd.shape[0]
  score = jax.grad(lambda x, t: jnp.sum(log_prob_fn(x, t)))

  def tweedie(x, sigma):
    return x + sigma ** 2 * score(x, jnp.full((batch,), sigma))

  def euler_step(x, sigma_pair):
    sigma, sigma_next = sigma_pair
    x_hat = tweedie(x, sigma)
    return x - (x - x_hat) / sigma * (sigma - sigma_next), None

  x_bnd, _ = jax.lax.scan(euler_step, x_bnd, (sigmas[:-1], sigmas[1:]))
  return tweedie(x_bnd, sigmas[-1])
