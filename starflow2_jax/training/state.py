"""The train state, created abstract-first so that it is born sharded.

`jax.eval_shape` gives the state's shapes and logical axis names without allocating;
the shardings follow from the rules; then `init` is jit-compiled with those shardings as
outputs, so no device ever holds an unsharded copy (the paper preset needs that).
"""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from starflow2_jax import sharding


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  opt_state: Any


def _boxed_state_fn(init_params_fn, optimizer):
  def create(rng):
    params = init_params_fn(rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))
  return create


def abstract_state(init_params_fn, optimizer, mesh, rules):
  """(ShapeDtypeStructs of the unboxed state, with shardings; the shardings tree)."""
  boxed = jax.eval_shape(_boxed_state_fn(init_params_fn, optimizer), jax.random.key(0))
  shardings = sharding.logical_shardings(boxed, mesh, rules)
  shapes = sharding.strip_axis_names(boxed)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
  return abstract, shardings


def create_state(init_params_fn, optimizer, shardings, rng):
  """Initialises the state directly into its shardings."""
  create = _boxed_state_fn(init_params_fn, optimizer)
  return jax.jit(lambda r: nn.unbox(create(r)), out_shardings=shardings)(rng)
