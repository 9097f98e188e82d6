"""A preallocated key/value cache, as a plain pytree of arrays.

The cache is data, not module state: decode loops thread it through `lax.fori_loop` /
`lax.scan` and jit-compile one step. `valid` marks slots that hold a real (non-padding)
token, so padded prompts and padded captions are masked out of attention.
"""

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class LayerCache:
  """One layer's keys and values [B, S, N, H]; or, with `layer` set, the whole stack's
  [L, B, S, N, H] of a scanned stack seen from its layer `layer` (the scan carries the stack
  and writes each layer's new entries into it in place, instead of slicing it into
  per-iteration copies and stacking them again)."""
  keys_bsnh: jnp.ndarray
  values_bsnh: jnp.ndarray
  layer: jnp.ndarray | None = None

  def append(self, keys_btnh, values_btnh, start):
    """Writes this call's keys and values at slots [start, start + T); returns (the updated
    cache, this layer's keys and values [B, S, N, H] to attend over)."""
    def write(cache, new):
      new = new.astype(cache.dtype)
      if self.layer is None:
        return jax.lax.dynamic_update_slice(cache, new, (0, start, 0, 0))
      return jax.lax.dynamic_update_slice(cache, new[None], (self.layer, 0, start, 0, 0))
    keys, values = write(self.keys_bsnh, keys_btnh), write(self.values_bsnh, values_btnh)
    updated = LayerCache(keys, values, self.layer)
    if self.layer is not None:
      keys = jax.lax.dynamic_index_in_dim(keys, self.layer, keepdims=False)
      values = jax.lax.dynamic_index_in_dim(values, self.layer, keepdims=False)
    return updated, keys, values


@flax.struct.dataclass
class KVCache:
  """Caches for every layer plus the shared bookkeeping.

  Attributes:
    layers: one `LayerCache` per Transformer layer (a tuple), or, for a scanned layer stack
      (`layers/scan.py`), one `LayerCache` whose arrays hold every layer [L, B, S, N, H].
    valid_bs: which cache slots hold real tokens.
    length: how many slots are filled (the next write position), a scalar.
  """
  layers: tuple
  valid_bs: jnp.ndarray
  length: jnp.ndarray

  @classmethod
  def zeros(cls, *, batch, max_length, num_layers, num_heads, head_dim, dtype=jnp.float32,
            stacked=False):
    shape = (batch, max_length, num_heads, head_dim)
    if stacked:
      shape = (num_layers,) + shape
      layers = LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    else:
      layers = tuple(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                     for _ in range(num_layers))
    return cls(layers=layers, valid_bs=jnp.zeros((batch, max_length), bool),
               length=jnp.zeros((), jnp.int32))

  @property
  def max_length(self):
    return self.valid_bs.shape[1]

  def begin_write(self, valid_bt):
    """(layer caches, write position, validity with `valid_bt` written there): what a layer
    stack reads to append `valid_bt.shape[1]` tokens."""
    valid_bs = jax.lax.dynamic_update_slice(self.valid_bs, valid_bt, (0, self.length))
    return self.layers, self.length, valid_bs

  def written(self, layers, valid_bs, num_new):
    """The cache after a stack appended `num_new` tokens (`begin_write`'s counterpart)."""
    return KVCache(layers=layers, valid_bs=valid_bs, length=self.length + num_new)
