"""Tests for the Transformer layers: KV-cached decoding, padding masks, rotary positions."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starflow2_jax.layers import attention
from starflow2_jax.layers import remat
from starflow2_jax.layers import rotary
from starflow2_jax.layers import transformer as transformer_lib

try:
  from tests import helpers
  from tests.tolerance import assert_float32_close
except ImportError:  # tests/ is on sys.path (pytest's rootdir-less "prepend" import mode)
  import helpers
  from tolerance import assert_float32_close

BATCH, LENGTH, PREFIX = 2, 7, 3


def _tolerance(config):
  """The policy's depth and reduction (tests/tolerance.py) for the Transformer's outputs."""
  return dict(depth=config.num_layers, reduction=int(config.mlp_ratio * config.width))


@pytest.fixture(scope="module", name="model")
def _model():
  """A tiny Transformer, its params, and jitted full / cached calls (compiled once)."""
  config = helpers.transformer_config(width=16, num_layers=2, num_heads=2)
  module = transformer_lib.Transformer(config)
  x = helpers.normal((BATCH, LENGTH, config.width), seed=0)
  positions = jnp.broadcast_to(jnp.arange(LENGTH), (BATCH, LENGTH))
  valid = jnp.ones((BATCH, LENGTH), bool)
  params = helpers.random_params(module, x, positions, valid, seed=1)
  full = jax.jit(lambda x, p, v: module.apply({"params": params}, x, p, v)[0])
  cached = jax.jit(lambda x, p, v, c: module.apply({"params": params}, x, p, v, c))
  return config, full, cached


def _inputs(width, seed=3):
  x = helpers.normal((BATCH, LENGTH, width), seed=seed)
  positions = jnp.broadcast_to(jnp.arange(LENGTH), (BATCH, LENGTH))
  valid = np.ones((BATCH, LENGTH), bool)
  valid[0, 1] = False         # a padded slot inside the prefix of row 0
  valid[1, 0] = False         # and at the very start of row 1
  return x, positions, jnp.asarray(valid)


def _decode(config, cached, x, positions, valid):
  """Prefill PREFIX tokens into a fresh cache, then decode the rest one token at a time."""
  cache = config.empty_cache(BATCH, LENGTH)
  y, cache = cached(x[:, :PREFIX], positions[:, :PREFIX], valid[:, :PREFIX], cache)
  outputs = [y]
  for i in range(PREFIX, LENGTH):
    y, cache = cached(x[:, i:i + 1], positions[:, i:i + 1], valid[:, i:i + 1], cache)
    outputs.append(y)
  assert int(cache.length) == LENGTH
  np.testing.assert_array_equal(cache.valid_bs, valid)
  return jnp.concatenate(outputs, axis=1)


def test_kv_cached_decode_matches_full_causal_pass(model):
  config, full, cached = model
  x, positions, valid = _inputs(config.width)
  expected = full(x, positions, valid)
  got = _decode(config, cached, x, positions, valid)
  assert got.shape == expected.shape == (BATCH, LENGTH, config.width)
  assert helpers.max_abs_diff(got, expected) <= 1e-5


def test_full_pass_is_causal(model):
  """Changing the token at position i changes no output before i."""
  config, full, _ = model
  x, positions, valid = _inputs(config.width)
  i = 4
  y = full(x, positions, valid)
  # (a random change: a uniform shift of all channels would be removed by the LayerNorms)
  y2 = full(x.at[:, i].add(helpers.normal((BATCH, config.width), seed=5)), positions, valid)
  np.testing.assert_array_equal(y2[:, :i], y[:, :i])
  assert helpers.max_abs_diff(y2[:, i:], y[:, i:]) > 1e-3


@pytest.mark.parametrize("use_cache", [False, True])
def test_padding_keys_do_not_influence_other_positions(model, use_cache):
  config, full, cached = model
  x, positions, valid = _inputs(config.width)
  junk = x + 10.0 * helpers.normal(x.shape, seed=9)
  x_junk = jnp.where(valid[..., None], x, junk)     # different content in the padded slots
  run = ((lambda x: _decode(config, cached, x, positions, valid)) if use_cache
         else (lambda x: full(x, positions, valid)))
  y, y_junk = run(x), run(x_junk)
  mask = np.asarray(valid)
  assert helpers.max_abs_diff(y_junk[mask], y[mask]) <= 1e-6
  # The padded positions themselves did change (they always see themselves): the inputs
  # really differ, so the check above is not vacuous.
  assert helpers.max_abs_diff(y_junk[~mask], y[~mask]) > 1e-2
  # ... and each one is what it sees: its own token after the real tokens before it.
  for b, i in zip(*np.nonzero(~mask)):
    seen = [j for j in range(i) if mask[b, j]] + [i]
    alone = full(x_junk[b:b + 1, seen], positions[b:b + 1, seen], jnp.ones((1, len(seen)), bool))
    assert_float32_close(y_junk[b, i], alone[0, -1], **_tolerance(config))


def test_padding_equals_dropping_the_padded_tokens(model):
  """A row with a padded slot gives, at its real positions, what the row without that slot
  gives (with the same positions): padding is invisible, not merely 'small'."""
  config, full, _ = model
  x, positions, _ = _inputs(config.width)
  valid = jnp.ones((BATCH, LENGTH), bool).at[:, 2].set(False)
  y = full(x, positions, valid)
  keep = np.array([i for i in range(LENGTH) if i != 2])
  y_dropped = full(x[:, keep], positions[:, keep], jnp.ones((BATCH, LENGTH - 1), bool))
  assert helpers.max_abs_diff(y[:, keep], y_dropped) <= 1e-5


def test_mask_always_keeps_the_diagonal_and_hides_padding():
  slots = jnp.arange(4)
  valid = jnp.array([[True, False, True, True]])
  mask = np.asarray(attention.causal_slot_mask(slots, slots, valid))[0, 0]
  expected = np.array([[1, 0, 0, 0],
                       [1, 1, 0, 0],   # slot 1 is padding but sees itself
                       [1, 0, 1, 0],
                       [1, 0, 1, 1]], bool)
  np.testing.assert_array_equal(mask, expected)


def test_fully_padded_row_attends_only_to_itself(model):
  """In a row with no valid slot every position sees only itself (no softmax over an empty
  set, no NaN): its output is that of its token alone, a sequence of length 1."""
  config, full, _ = model
  x, positions, _ = _inputs(config.width)
  y = full(x, positions, jnp.zeros((BATCH, LENGTH), bool))
  assert np.all(np.isfinite(np.asarray(y)))
  alone = full(x.reshape(BATCH * LENGTH, 1, config.width), positions.reshape(-1, 1),
               jnp.ones((BATCH * LENGTH, 1), bool))
  assert_float32_close(y, alone.reshape(y.shape), **_tolerance(config))
  # Not vacuous: with the row valid, positions see each other and the outputs move.
  y_valid = full(x, positions, jnp.ones((BATCH, LENGTH), bool))
  assert helpers.max_abs_diff(y_valid[:, 1:], y[:, 1:]) > 1e-2


def _rotate(vec_h, position, head_dim, theta=10_000.0):
  angles = rotary.rotary_angles(jnp.array([[position]]), head_dim, theta)
  return rotary.apply_rotary(vec_h[None, None, None, :], angles)[0, 0, 0]


def test_rotary_is_a_rotation():
  head_dim = 8
  x = helpers.normal((2, 5, 3, head_dim), seed=0)            # [B, T, heads, head_dim]
  positions = jnp.array([[0, 1, 2, 17, 101], [5, 4, 3, 2, 1]])
  y = rotary.apply_rotary(x, rotary.rotary_angles(positions, head_dim, 10_000.0))
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
  # Position 0 is the identity; other positions really rotate.
  np.testing.assert_allclose(y[0, 0], x[0, 0], atol=1e-7)
  assert helpers.max_abs_diff(y[0, 3], x[0, 3]) > 1e-2
  # Inverse rotation (negative positions) undoes it.
  back = rotary.apply_rotary(y, rotary.rotary_angles(-positions, head_dim, 10_000.0))
  np.testing.assert_allclose(back, x, atol=1e-5)


def test_rotary_scores_depend_only_on_relative_position():
  head_dim = 8
  q, k = helpers.normal((head_dim,), seed=1), helpers.normal((head_dim,), seed=2)
  score = lambda m, n: float(jnp.dot(_rotate(q, m, head_dim), _rotate(k, n, head_dim)))
  for delta in (0, 1, 3, 9):
    reference = score(delta, 0)
    for offset in (1, 7, 40):
      assert score(offset + delta, offset) == pytest.approx(reference, abs=1e-4)
  # ... and does depend on the difference (the test above is not vacuous).
  assert abs(score(3, 0) - score(0, 0)) > 1e-2


# ---- rematerialisation policies (layers/remat.py) -----------------------------------------

def _grads_and_jaxpr(remat):
  config = dataclasses.replace(helpers.transformer_config(width=16, num_layers=2, num_heads=2),
                               remat=remat)
  module = transformer_lib.Transformer(config)
  x, positions, valid = _inputs(config.width)
  params = helpers.random_params(transformer_lib.Transformer(
      dataclasses.replace(config, remat=False)), x, positions, valid, seed=1)
  loss = lambda p: jnp.sum(module.apply({"params": p}, x, positions, valid)[0] ** 2)
  return jax.grad(loss)(params), str(jax.make_jaxpr(loss)(params)), config


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "save_outs", True])
def test_remat_policies_change_memory_not_gradients(policy):
  """Every policy recomputes the same arithmetic, so gradients agree with keeping everything
  (within the float32 policy: XLA may fuse the recomputed ops differently); each layer is
  wrapped in one remat region (`remat2` in the forward program), none without a policy."""
  plain, plain_jaxpr, config = _grads_and_jaxpr("none")
  grads, jaxpr, _ = _grads_and_jaxpr(policy)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(plain)):
    assert_float32_close(got, want, **_tolerance(config))
  assert plain_jaxpr.count("remat2[") == 0
  assert jaxpr.count("remat2[") == config.num_layers
  assert jaxpr.count("attention_out") >= config.num_layers     # the tags the policy names


def test_remat_policy_names_are_checked():
  assert remat.policy_name(False) == "none" and remat.policy_name(True) == "full"
  with pytest.raises(ValueError, match="unknown remat policy 'some'"):
    remat.policy_name("some")
