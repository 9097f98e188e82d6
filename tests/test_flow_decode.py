"""Inverting flow blocks (SPEC §2, §6): the KV-cached loop against the recomputing reference,
and guided inversion."""

import jax
import jax.numpy as jnp
import pytest

import helpers
from starflow2_jax.flows import decode
from tolerance import assert_float32_close

GUIDANCE_WEIGHT = 1.5


def _guidance_context(context, valid):
  """2B rows: the conditional context, then an 'unconditional' one (everything but the last,
  start-like position masked out)."""
  valid_u = jnp.zeros_like(valid).at[:, -1].set(True)
  return jnp.concatenate([context, context]), jnp.concatenate([valid, valid_u])


def _tolerance(block):
  return dict(depth=helpers.block_depth(block), reduction=helpers.block_reduction(block))


@pytest.fixture(scope="module", name="inverses")
def _inverses():
  """Per block kind: (block, params, t, context, valid, cached inverse, recomputing inverse);
  the inverses are jitted once per kind and guidance weight (static) and shared by tests."""
  out = {}
  for kind in ("shallow", "shallow_reverse", "deep"):
    block, params, _, t, context, valid = helpers.block_and_inputs(kind)
    cached = jax.jit(lambda z, c, v, w, block=block, params=params, t=t: decode.invert_block(
        block, params, z, t, c, v, w), static_argnums=3)
    recompute = jax.jit(lambda z, c, v, w, block=block, params=params, t=t:
                        decode.invert_block_recompute(block, params, z, t, c, v, w),
                        static_argnums=3)
    out[kind] = (block, params, t, context, valid, cached, recompute)
  return out


@pytest.mark.parametrize("kind,guided", [("shallow", False), ("shallow_reverse", False),
                                         ("deep", False), ("deep", True)])
def test_cached_inverse_matches_recompute(inverses, kind, guided):
  block, params, t, context, valid, cached, recompute = inverses[kind]
  z = helpers.latents(seed=3)
  weight = GUIDANCE_WEIGHT if guided else None
  if guided:
    context, valid = _guidance_context(context, valid)
  x_cached, x_reference = cached(z, context, valid, weight), recompute(z, context, valid, weight)
  assert x_cached.shape == z.shape
  assert_float32_close(x_cached, x_reference, **_tolerance(block))
  if not guided:  # the unguided inverse really inverts the forward map
    z_back = jax.jit(block.apply)({"params": params}, x_reference, t, context, valid).z_bnd
    assert_float32_close(z_back, z, **_tolerance(block))


def test_guided_inverse_with_weight_zero_equals_unguided(inverses):
  block, params, t, context, valid, invert, _ = inverses["deep"]
  z = helpers.latents(seed=3)
  unguided = invert(z, context, valid, None)
  context2, valid2 = _guidance_context(context, valid)
  guided0 = invert(z, context2, valid2, 0.0)
  guided = invert(z, context2, valid2, GUIDANCE_WEIGHT)
  # 2B rows instead of B: other shapes, other rounding (tests/tolerance.py).
  assert_float32_close(guided0, unguided, **_tolerance(block))
  assert helpers.max_abs_diff(guided, unguided) > 1e-2   # guidance does something
  with pytest.raises(ValueError, match="2B rows"):
    decode.invert_block(block, params, z, t, context, valid, GUIDANCE_WEIGHT)
