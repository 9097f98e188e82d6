"""Embeddings of a continuous noise level (Fourier features of log t, then an MLP)."""

import flax.linen as nn
import jax
import jax.numpy as jnp


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
    dense = lambda name, axes: nn.Dense(
        self.width, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))
    hidden = jax.nn.silu(dense("hidden", (None, "mlp"))(features))
    return dense("out", ("mlp", "embed"))(hidden)
