"""The Transformer feed-forward block (GELU MLP)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from starflow2_jax.layers import linear


class MLP(nn.Module):
  hidden: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_btd):
    width = x_btd.shape[-1]
    dense = functools.partial(linear.dense, dtype=self.dtype, param_dtype=self.param_dtype)
    h_btf = jax.nn.gelu(dense(self.hidden, ("embed", "mlp"), "wi")(x_btd))
    h_btf = nn.with_logical_constraint(h_btf, ("batch", "length", "mlp"))
    return dense(width, ("mlp", "embed"), "wo")(h_btf)
