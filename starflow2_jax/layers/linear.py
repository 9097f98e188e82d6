"""A Dense layer whose kernel and bias carry logical axis names."""

import flax.linen as nn
import jax.numpy as jnp


def dense(features, axes, name, dtype=jnp.float32, param_dtype=jnp.float32, zero=False):
  """nn.Dense with logically partitioned parameters; `axes` names the kernel's (in, out) axes
  and the bias takes the out axis. `zero=True` zero-initialises the kernel (heads and skips
  that must start as the identity or as nothing)."""
  init = nn.initializers.zeros if zero else nn.initializers.lecun_normal()
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(init, axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))
