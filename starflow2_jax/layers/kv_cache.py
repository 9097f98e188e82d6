"""A preallocated key/value cache, as a plain pytree of arrays.

The cache is data, not module state: decode loops thread it through `lax.fori_loop` /
`lax.scan` and jit-compile one step. `valid` marks slots that hold a real (non-padding)
token, so padded prompts and padded captions are masked out of attention.
"""

import flax.struct
import jax.numpy as jnp


@flax.struct.dataclass
class LayerCache:
  keys_bsnh: jnp.ndarray
  values_bsnh: jnp.ndarray


@flax.struct.dataclass
class KVCache:
  """Caches for every layer plus the shared bookkeeping.

  Attributes:
    layers: one `LayerCache` per Transformer layer.
    valid_bs: which cache slots hold real tokens.
    length: how many slots are filled (the next write position), a scalar.
  """
  layers: tuple
  valid_bs: jnp.ndarray
  length: jnp.ndarray

  @classmethod
  def zeros(cls, *, batch, max_length, num_layers, num_heads, head_dim, dtype=jnp.float32):
    shape = (batch, max_length, num_heads, head_dim)
    layers = tuple(
        LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(num_layers))
    return cls(layers=layers, valid_bs=jnp.zeros((batch, max_length), bool),
               length=jnp.zeros((), jnp.int32))

  @property
  def max_length(self):
    return self.valid_bs.shape[1]
