"""Classifier-free guidance for Gaussian next-element predictions (SPEC §6).

Sampling from p_c^{1+w} / p_u^{w}, with each step's prediction a diagonal Gaussian, gives
another Gaussian; where the unconditional scale is the smaller one the product would not
be normalisable, so the ratio is clipped at 1 (STARFlow's recipe):

  r  = min(s_c / s_u, 1)²
  s' = s_c / sqrt(1 + w − w·r)
  μ' = ((1 + w)·μ_c − w·r·μ_u) / (1 + w − w·r)
"""

import jax.numpy as jnp


def guided_gaussian(mean_c, log_s_c, mean_u, log_s_u, weight):
  """Returns (mean, log_s) of the guided prediction; weight 0 gives the conditional one."""
  r = jnp.square(jnp.minimum(jnp.exp(log_s_c - log_s_u), 1.0))
  denom = 1.0 + weight - weight * r
  mean = ((1.0 + weight) * mean_c - weight * r * mean_u) / denom
  return mean, log_s_c - 0.5 * jnp.log(denom)
