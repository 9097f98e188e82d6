"""The deep–shallow stack (SPEC §3): round trip, log-det of the whole, identity at init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from starflow2_jax.flows import stack
from starflow2_jax.models import caption_flow
from tolerance import assert_float32_close

B = helpers.BATCH


@pytest.fixture(scope="module", name="flow")
def _flow():
  config = helpers.flow_config()
  model = stack.DeepShallowFlow(config)
  x, t = helpers.latents(), helpers.noise_levels(B)
  context, valid = helpers.context_inputs(B)
  params = helpers.random_params(model, x, t, context, valid, seed=5)
  forward = jax.jit(lambda x: model.apply({"params": params}, x, t, context, valid))
  return config, forward, params, x, t, context, valid


def _tolerance(config):
  """The policy's depth and reduction for the whole stack: every block's layers and head."""
  blocks = [stack.shallow_block(config, k) for k in range(config.num_shallow_blocks)]
  blocks.append(stack.deep_block(config))
  return dict(depth=sum(helpers.block_depth(b) for b in blocks),
              reduction=max(helpers.block_reduction(b) for b in blocks))


def test_deep_shallow_round_trip(flow):
  config, forward, params, x, t, context, valid = flow
  assert not bool(jnp.all(valid))                      # the context really has padding
  out = forward(x)
  x_back = jax.jit(lambda z: stack.invert(config, params, z, t, context, valid))(out.z_bnd)
  assert_float32_close(x_back, x, **_tolerance(config))
  # Non-trivial transforms in both halves of the stack.
  assert helpers.max_abs_diff(out.u_bnd, x) > 0.1
  assert helpers.max_abs_diff(out.z_bnd, out.u_bnd) > 0.1
  assert float(jnp.min(jnp.abs(out.log_det_shallow_b))) > 0.1
  assert float(jnp.min(jnp.abs(out.log_det_deep_b))) > 0.1


def test_deep_shallow_log_det_is_sum_of_blocks(flow):
  config, forward, params, x, t, context, valid = flow

  @jax.jit
  def by_blocks(x):
    h, total = x, 0.0
    for k in range(config.num_shallow_blocks):
      block_out = stack.shallow_block(config, k).apply({"params": params[f"shallow_{k}"]}, h, t)
      h, total = block_out.z_bnd, total + block_out.log_det_b
    return total, stack.deep_block(config).apply({"params": params["deep"]}, h, t, context, valid)

  out = forward(x)
  total, deep_out = by_blocks(x)
  tolerance = _tolerance(config)
  assert_float32_close(out.log_det_shallow_b, total, **tolerance)
  assert_float32_close(out.log_det_deep_b, deep_out.log_det_b, **tolerance)
  assert_float32_close(out.z_bnd, deep_out.z_bnd, **tolerance)


def _assert_exact_identity(out, x):
  assert helpers.bits(out.z_bnd) == helpers.bits(x)
  assert helpers.bits(out.u_bnd) == helpers.bits(x)
  np.testing.assert_array_equal(out.log_det_shallow_b, np.zeros(x.shape[0], np.float32))
  np.testing.assert_array_equal(out.log_det_deep_b, np.zeros(x.shape[0], np.float32))


def test_fresh_model_is_exactly_identity():
  """The real initialiser (default PRNG, as the trainer uses it) of a CaptionToImageFlow:
  the model, and the DeepShallowFlow inside it on its own, map x to itself bitwise."""
  flow_config = helpers.flow_config(context_dim=8)
  config = caption_flow.CaptionFlowConfig(flow_config, vocab_size=20, max_caption_len=4)
  model = caption_flow.CaptionToImageFlow(config)
  x, t = helpers.latents(seed=6), helpers.noise_levels(B)
  ids = jnp.array([[3, 4, 5, 0], [6, 0, 0, 0]], jnp.int32)
  params = helpers.init(model, x, t, ids, ids > 0)
  keep = jnp.array([True, False])
  out = jax.jit(lambda x: model.apply({"params": params}, x, t, ids, ids > 0, keep))(x)
  _assert_exact_identity(out, x)

  flow = stack.DeepShallowFlow(flow_config)
  context, valid = helpers.context_inputs(B, dim=8)
  out = jax.jit(lambda x: flow.apply({"params": params["flow"]}, x, t, context, valid))(x)
  _assert_exact_identity(out, x)
