"""Embeddings of a continuous noise level (Fourier features of log t, then an MLP)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from starflow2_jax.layers import linear


def fourier_features(x_b, num_frequencies, max_frequency=16.0):
  """[B] -> [B, 2F]: sin and cos of x at geometrically spaced frequencies."""
  freqs = jnp.exp(jnp.linspace(0.0, jnp.log(max_frequency), num_frequencies))
  angles = x_b.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class NoiseLevelEmbedding(nn.Module):
  """Maps a per-example noise level t [B] to a width-D vector via Fourier(log t) and an MLP."""
  width: int
  num_frequencies: int = 32
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, t_b):
    features = fourier_features(jnp.log(t_b), self.num_frequencies)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    hidden = jax.nn.silu(linear.dense(self.width, (None, "mlp"), "hidden", **kw)(features))
    return linear.dense(self.width, ("mlp", "embed"), "out", **kw)(hidden)
