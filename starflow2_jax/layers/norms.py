"""Normalisation layers with logically partitioned parameters, computed in float32."""

import flax.linen as nn
import jax.numpy as jnp


def layer_norm(name, dtype=jnp.float32, param_dtype=jnp.float32, epsilon=1e-6):
  """LayerNorm whose scale and bias shard along the model width ("embed")."""
  return nn.LayerNorm(
      epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))
