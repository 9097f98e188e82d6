"""Multi-noise training (SPEC §4, from iTARFlow): per-example noise levels t ~ U[t0, t1]."""

import jax
import jax.numpy as jnp


def sample_noise_levels(rng, batch, t_min, t_max):
  return jax.random.uniform(rng, (batch,), jnp.float32, t_min, t_max)


def add_noise(rng, x_bnd, t_b):
  """x̃ = x + t·ε."""
  eps = jax.random.normal(rng, x_bnd.shape, jnp.float32)
  return x_bnd.astype(jnp.float32) + t_b[:, None, None] * eps


def loss_weights(t_b, kind):
  """Per-example loss weights: "t" weights by the noise level (normalised to mean 1 over the
  batch, so the loss keeps the scale of a per-dimension NLL); "uniform" weights all alike."""
  if kind == "uniform":
    return jnp.ones_like(t_b)
  if kind == "t":
    return t_b / jnp.mean(t_b)
  raise ValueError(f"unknown noise loss weighting {kind!r}; expected 'uniform' or 't'")
