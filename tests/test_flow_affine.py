"""Scale functions and the affine step of a flow block (SPEC §2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from starflow2_jax.flows import affine
from tolerance import assert_float32_close, float32_bound

# The affine maths is elementwise: one layer, no reduction.
ELEMENTWISE = dict(depth=1, reduction=1)
SOFT_CLIP = 4.0


def test_softplus_scale_is_one_at_zero():
  log_s = affine.log_scale(jnp.zeros((4,)), "softplus")
  np.testing.assert_array_equal(np.exp(np.asarray(log_s)), np.ones(4, np.float32))
  np.testing.assert_array_equal(affine.log_scale(jnp.zeros((4,)), "exp"), np.zeros(4))


@pytest.mark.parametrize("kind", ["softplus", "exp"])
def test_scale_functions_round_trip(kind):
  rng = np.random.default_rng(0)
  a = jnp.asarray(np.concatenate([rng.normal(scale=3.0, size=40), [-50.0, 50.0, 0.0]]),
                  jnp.float32)
  u = jnp.asarray(rng.normal(size=a.shape), jnp.float32)
  mean = jnp.asarray(rng.normal(size=a.shape), jnp.float32)
  log_s = affine.log_scale(a, kind)
  assert np.all(np.isfinite(np.asarray(log_s)))
  # Soft-clipped to |log s| <= 4 (up to the rounding of 4·tanh).
  assert float(jnp.max(jnp.abs(log_s))) <= SOFT_CLIP + float32_bound(SOFT_CLIP, **ELEMENTWISE)
  z = affine.to_noise(u, mean, log_s)
  u64, mean64, log_s64 = (np.asarray(v, np.float64) for v in (u, mean, log_s))
  assert_float32_close(z, (u64 - mean64) / np.exp(log_s64), **ELEMENTWISE)
  # Back through from_noise: two elementwise steps, rounding relative to |u|.
  assert_float32_close(affine.from_noise(z, mean, log_s), u, depth=2, reduction=1)
  # Increasing in a, so the head can reach every scale in its range.
  order = np.argsort(np.asarray(a))
  assert np.all(np.diff(np.asarray(log_s)[order]) >= 0)


def test_unknown_scale_function_raises():
  with pytest.raises(ValueError, match="scale"):
    affine.log_scale(jnp.zeros(3), "sigmoid")
  block = helpers.shallow_block(scale="sigmoid")
  x, t = helpers.latents(batch=1), helpers.noise_levels(1)
  with pytest.raises(ValueError, match="scale"):
    jax.eval_shape(block.init, jax.random.key(0), x, t)
