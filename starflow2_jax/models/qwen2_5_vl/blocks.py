"""The two building blocks Qwen2.5-VL adds to `layers/`: RMSNorm and the SwiGLU MLP.

Both text decoder and vision tower use them; parameters carry logical axis names.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


def dense_param(module, name, shape, axes, init=nn.initializers.lecun_normal()):
  """A logically partitioned parameter of `module`, cast to its compute dtype."""
  boxed = nn.with_logical_partitioning(init, axes)
  return module.param(name, boxed, shape, module.param_dtype).astype(module.dtype)


class RMSNorm(nn.Module):
  """x / rms(x) computed in float32, cast back to the input dtype, then scaled (as HF does)."""
  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_btd):
    x32 = x_btd.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
    scale_d = dense_param(self, "scale", (x_btd.shape[-1],), ("embed",), nn.initializers.ones)
    return scale_d * normed.astype(x_btd.dtype)


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)), optionally with biases (the vision tower has them)."""
  hidden: int
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _linear(self, name, x, features, axes):
    y = jnp.einsum("...d,df->...f", x, dense_param(self, f"{name}_kernel",
                                                   (x.shape[-1], features), axes))
    if self.use_bias:
      y = y + dense_param(self, f"{name}_bias", (features,), axes[1:], nn.initializers.zeros)
    return y

  @nn.compact
  def __call__(self, x_btd):
    x_btd = x_btd.astype(self.dtype)
    gate_btf = self._linear("gate", x_btd, self.hidden, ("embed", "mlp"))
    up_btf = self._linear("up", x_btd, self.hidden, ("embed", "mlp"))
    h_btf = jax.nn.silu(gate_btf) * up_btf
    return self._linear("down", h_btf, x_btd.shape[-1], ("mlp", "embed"))
