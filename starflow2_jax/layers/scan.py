"""Layer stacks run by `nn.scan`: one layer's program, traced and compiled once, looped
`num_layers` times, so compile time and program size do not grow with depth.

A scanned stack keeps its parameters under one name, `layers`, each with a leading axis of
length `num_layers` (logical axis name "layers", replicated by the sharding rules); an
unrolled stack keeps them as `layer_0`, `layer_1`, …. Both compute the same function:
`stack_layers` / `unstack_layers` move parameters between the two layouts, so a converted
checkpoint (always unrolled, as the importers write it) loads into either.

The KV cache follows the parameters: an unrolled stack reads a tuple of per-layer
`LayerCache`s, a scanned one a single `LayerCache` whose arrays carry the layer axis first
(`kv_cache.KVCache.zeros(stacked=True)`). The scan carries that stack and hands iteration i
a view of it at layer i (`LayerCache.layer`), which writes its new keys and values into the
stack in place: a decode step copies no cache (scanning over the cache as an input would
stack the iterations' outputs into a second, whole cache).

The layer's signature must be `(x, *args) -> (x, layer_cache)`, with `args` holding, from
`cache_argnum` on, the layer cache, the cache's write position and its validity (all None
without a cache); every other argument is the same for every layer.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from starflow2_jax.layers import kv_cache as kv_cache_lib

LAYER_AXIS = "layers"       # logical name of the stacked parameters' leading axis
STACK_NAME = "layers"       # the scanned stack's name in the parameter tree
UNROLLED_PREFIX = "layer_"  # an unrolled stack's layers: layer_0, layer_1, …


def _layer_keys(tree, num_layers):
  keys = [f"{UNROLLED_PREFIX}{i}" for i in range(num_layers)]
  missing = [k for k in keys if k not in tree]
  extra = [k for k in tree if k.startswith(UNROLLED_PREFIX) and k not in keys]
  if missing or extra:
    raise ValueError(f"an unrolled stack of {num_layers} layers holds {keys[0]}…{keys[-1]}; "
                     f"missing {missing}, beyond them {sorted(extra)} (keys: {sorted(tree)})")
  return keys


def _stack(*xs):
  """jnp.stack for JAX arrays (under jit too: stacked where they live, however sharded),
  np.stack for host arrays."""
  if any(isinstance(x, jax.Array) for x in xs):
    return jnp.stack(xs)
  return np.stack(xs)


def stack_layers(tree, num_layers):
  """An unrolled stack's parameters (a dict holding layer_0 … layer_{L-1}, and anything
  else) in the scanned layout: the layers' arrays stacked along a new first axis under
  `layers`; other entries are kept."""
  if STACK_NAME in tree:
    raise ValueError(f"already scanned: the tree holds {STACK_NAME!r}")
  keys = _layer_keys(tree, num_layers)
  rest = {k: v for k, v in tree.items() if k not in keys}
  stacked = jax.tree.map(_stack, *[tree[k] for k in keys])
  return dict(rest, **{STACK_NAME: stacked})


def unstack_layers(tree):
  """The inverse of `stack_layers`: `layers` split into layer_0 … layer_{L-1}."""
  if STACK_NAME not in tree:
    raise ValueError(f"not scanned: no {STACK_NAME!r} in keys {sorted(tree)}")
  stacked = tree[STACK_NAME]
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  rest = {k: v for k, v in tree.items() if k != STACK_NAME}
  for i in range(num_layers):
    rest[f"{UNROLLED_PREFIX}{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return rest


def build_stack(layer_cls, num_layers, scan, *args, **kwargs):
  """The layers of a stack, built from `layer_cls(*args, **kwargs)`: when `scan`, one
  layer named `layers` whose parameters `run_stack` stacks `num_layers` deep; else a list
  named layer_0 … layer_{L-1}. Call inside a module's `setup` or compact method."""
  if scan:
    return layer_cls(*args, name=STACK_NAME, **kwargs)
  return [layer_cls(*args, name=f"{UNROLLED_PREFIX}{i}", **kwargs) for i in range(num_layers)]


def run_stack(layers, num_layers, x, args, cache_argnum, cache, valid_bt):
  """x through the stack of `build_stack`, appending to `cache` (a `KVCache`, or None for
  a pass without one). Each layer is called as
  `layer(x, *args[:cache_argnum], layer_cache, cache_length, cache_valid, *args[cache_argnum:])`
  with its cache (per-layer or the scanned stack's view), the write position and the cache's
  validity with `valid_bt` written there. Returns (x, the extended cache or None)."""
  layer_caches = length = valid_bs = None
  if cache is not None:
    layer_caches, length, valid_bs = cache.begin_write(valid_bt)
  def with_cache(layer_cache):
    return args[:cache_argnum] + (layer_cache, length, valid_bs) + args[cache_argnum:]
  if isinstance(layers, nn.Module):
    x, layer_caches = _run_scanned(layers, num_layers, x, with_cache, layer_caches)
  else:
    x, layer_caches = _run_unrolled(layers, x, with_cache, layer_caches)
  if cache is not None:
    cache = cache.written(layer_caches, valid_bs, x.shape[1])
  return x, cache


def _run_unrolled(layers, x, with_cache, layer_caches):
  """The layers one after another, each with its own cache."""
  if layer_caches is None:
    layer_caches = (None,) * len(layers)
  new_caches = []
  for layer, layer_cache in zip(layers, layer_caches, strict=True):
    x, layer_cache = layer(x, *with_cache(layer_cache))
    new_caches.append(layer_cache)
  return x, tuple(new_caches)


def _run_scanned(layer, num_layers, x, with_cache, stacked_cache):
  """`layer` looped `num_layers` times by `nn.scan` over stacked parameters (leading axis
  "layers", also in their logical partitioning), carrying x and the stacked cache."""
  def body(layer, carry):
    x, cache, index = carry
    view = None if cache is None else kv_cache_lib.LayerCache(
        cache.keys_bsnh, cache.values_bsnh, layer=index)
    x, view = layer(x, *with_cache(view))
    cache = None if view is None else kv_cache_lib.LayerCache(view.keys_bsnh, view.values_bsnh)
    return (x, cache, index + 1), None
  scan = nn.scan(body, variable_axes={"params": 0, "intermediates": 0},
                 split_rngs={"params": True}, length=num_layers,
                 metadata_params={nn.PARTITION_NAME: LAYER_AXIS})
  (x, stacked_cache, _), _ = scan(layer, (x, stacked_cache, jnp.zeros((), jnp.int32)))
  return x, stacked_cache


def stack_paths(names):
  """(unrolled, scanned): the paths of the stacks among flat parameter names ("a/b/c"),
  those holding `layer_0/…` and those holding `layers/…`."""
  unrolled, scanned = set(), set()
  for name in names:
    parts = name.split("/")
    for i, part in enumerate(parts[:-1]):
      if part == f"{UNROLLED_PREFIX}0":
        unrolled.add("/".join(parts[:i]))
      elif part == STACK_NAME:
        scanned.add("/".join(parts[:i]))
  return unrolled, scanned


def scanned_layout(tree):
  """A nested parameter dict with every unrolled stack in it (a dict holding layer_0,
  layer_1, …) stacked by `stack_layers`: an unrolled model's parameters for the same model
  scanned."""
  if not isinstance(tree, dict):
    return tree
  tree = {k: scanned_layout(v) for k, v in tree.items()}
  indices = [k[len(UNROLLED_PREFIX):] for k in tree if k.startswith(UNROLLED_PREFIX)]
  indices = sorted(int(i) for i in indices if i.isdigit())
  return stack_layers(tree, len(indices)) if indices else tree


def unrolled_layout(tree):
  """The inverse of `scanned_layout`: every scanned stack in a nested dict unstacked."""
  if not isinstance(tree, dict):
    return tree
  tree = {k: unrolled_layout(v) for k, v in tree.items()}
  return unstack_layers(tree) if STACK_NAME in tree else tree
