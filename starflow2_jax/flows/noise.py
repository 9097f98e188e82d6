"""Multi-noise training (SPEC §4, from iTARFlow): per-example noise levels t ~ U[t0, t1]."""

import jax
import jax.numpy as jnp


def sample_noise_levels(rng, batch, t_min, t_max):
  return jax.random.uniform(rng, (batch,), jnp.float32, t_min, t_max)


def add_noise(rng, x_bnd, t_b):
  """x̃ = x + t·ε."""
  eps = jax.random.normal(rng, x_bnd.shape, jnp.float32)
  return x_bnd.astype(jnp.float32) + t_b[:, None, None] * eps


def loss_weights(t_b, kind, counted_b=None):
  """Per-example loss weights: "t" weights by the noise level, normalised to mean 1 over the
  examples the loss counts (`counted_b`, default all) so that it keeps the scale of a
  per-dimension NLL; "uniform" weights all alike."""
  if kind == "uniform":
    return jnp.ones_like(t_b)
  if kind == "t":
    counted_b = jnp.ones_like(t_b, bool) if counted_b is None else counted_b
    mean_t = jnp.sum(jnp.where(counted_b, t_b, 0.0)) / jnp.maximum(jnp.sum(counted_b), 1)
    return t_b / mean_t
  raise ValueError(f"unknown noise loss weighting {kind!r}; expected 'uniform' or 't'")
