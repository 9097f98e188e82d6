"""Layer stacks run by `nn.scan`: one layer's program, traced and compiled once, looped
`num_layers` times, so compile time and program size do not grow with depth.

A scanned stack keeps its parameters under one name, `layers`, each with a leading axis of
length `num_layers` (logical axis name "layers", replicated by the sharding rules); an
unrolled stack keeps them as `layer_0`, `layer_1`, …. Both compute the same function:
`stack_layers` / `unstack_layers` move parameters between the two layouts, so a converted
checkpoint (always unrolled, as the importers write it) loads into either.

The KV cache follows the parameters: an unrolled stack reads a tuple of per-layer
`LayerCache`s, a scanned one a single `LayerCache` whose arrays carry the layer axis first
(`kv_cache.KVCache.zeros(stacked=True)`); the scan slices one layer's cache per iteration.

The layer's signature must be `(x, *args) -> (x, layer_cache)`: x is the carry, the layer
cache (argument `cache_argnum` of `args`) is scanned over, every other argument is the same
for every layer (broadcast).
"""

import flax.linen as nn
import jax
import numpy as np

LAYER_AXIS = "layers"       # logical name of the stacked parameters' leading axis
STACK_NAME = "layers"       # the scanned stack's name in the parameter tree
UNROLLED_PREFIX = "layer_"  # an unrolled stack's layers: layer_0, layer_1, …


def scanned(layer_cls, num_layers, num_args, cache_argnum):
  """`layer_cls` looped over `num_layers` stacked copies of its parameters.

  The result is a module class called like one layer; its parameters get a leading
  "layers" axis (also in their logical partitioning), and its layer caches are sliced from
  (and stacked into) arrays with the layer axis first.
  """
  in_axes = tuple(0 if i == cache_argnum else nn.broadcast for i in range(num_args))
  return nn.scan(layer_cls, variable_axes={"params": 0, "intermediates": 0},
                 split_rngs={"params": True}, in_axes=in_axes, length=num_layers,
                 metadata_params={nn.PARTITION_NAME: LAYER_AXIS})


def _layer_keys(tree, num_layers):
  keys = [f"{UNROLLED_PREFIX}{i}" for i in range(num_layers)]
  missing = [k for k in keys if k not in tree]
  if missing:
    raise ValueError(f"an unrolled stack of {num_layers} layers needs {keys[0]}…{keys[-1]}; "
                     f"missing {missing} (keys: {sorted(tree)})")
  return keys


def stack_layers(tree, num_layers):
  """An unrolled stack's parameters (a dict holding layer_0 … layer_{L-1}, and anything
  else) in the scanned layout: the layers' arrays stacked along a new first axis under
  `layers`; other entries are kept."""
  if STACK_NAME in tree:
    raise ValueError(f"already scanned: the tree holds {STACK_NAME!r}")
  keys = _layer_keys(tree, num_layers)
  rest = {k: v for k, v in tree.items() if k not in keys}
  stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                         *[tree[k] for k in keys])
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


def build_stack(layer_cls, num_layers, scan, num_args, cache_argnum, *args, **kwargs):
  """The layers of a stack, built from `layer_cls(*args, **kwargs)`: one scanned module
  named `layers` when `scan`, else a list named layer_0 … layer_{L-1}. Call inside a
  module's `setup` or compact method; run with `run_stack`."""
  if scan:
    return scanned(layer_cls, num_layers, num_args, cache_argnum)(
        *args, name=STACK_NAME, **kwargs)
  return [layer_cls(*args, name=f"{UNROLLED_PREFIX}{i}", **kwargs) for i in range(num_layers)]


def run_stack(layers, x, args, cache_argnum, layer_caches):
  """x through the stack of `build_stack`; `args` are the layers' other arguments without
  the cache, which is inserted at `cache_argnum` (per-layer caches, a stacked cache, or
  None). Returns (x, the layers' new caches in the same form)."""
  def with_cache(layer_cache):
    return args[:cache_argnum] + (layer_cache,) + args[cache_argnum:]
  if not isinstance(layers, (list, tuple)):
    return layers(x, *with_cache(layer_caches))
  if layer_caches is None:
    layer_caches = (None,) * len(layers)
  new_caches = []
  for layer, layer_cache in zip(layers, layer_caches, strict=True):
    x, layer_cache = layer(x, *with_cache(layer_cache))
    new_caches.append(layer_cache)
  return x, tuple(new_caches)


def scanned_layout(tree):
  """A nested parameter dict with every unrolled stack in it (a dict holding layer_0,
  layer_1, …) stacked by `stack_layers`: an unrolled model's parameters for the same model
  scanned."""
  if not isinstance(tree, dict):
    return tree
  tree = {k: scanned_layout(v) for k, v in tree.items()}
  num_layers = 0
  while f"{UNROLLED_PREFIX}{num_layers}" in tree:
    num_layers += 1
  return stack_layers(tree, num_layers) if num_layers else tree


def unrolled_layout(tree):
  """The inverse of `scanned_layout`: every scanned stack in a nested dict unstacked."""
  if not isinstance(tree, dict):
    return tree
  tree = {k: unrolled_layout(v) for k, v in tree.items()}
  return unstack_layers(tree) if STACK_NAME in tree else tree
