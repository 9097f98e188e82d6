"""One affine flow block (SPEC §2): the exact log-determinant, triangular structure, padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from tolerance import float32_bound

N, D = helpers.NUM_ELEMENTS, helpers.LATENT_DIM


@pytest.mark.parametrize("kind", ["shallow", "shallow_reverse", "shallow_exp", "deep"])
def test_block_log_det_matches_jacobian(kind):
  block, params, x, t, context, valid = helpers.block_and_inputs(kind, batch=1)

  def forward_flat(x_flat):
    return block.apply({"params": params}, x_flat.reshape(1, N, D), t, context, valid).z_bnd.ravel()

  @jax.jit
  def forward_and_jacobian(x):
    out = block.apply({"params": params}, x, t, context, valid)
    return out, jax.jacfwd(forward_flat)(x.ravel())

  out, jac = forward_and_jacobian(x)
  jac = np.asarray(jac, np.float64)
  sign, expected = np.linalg.slogdet(jac)
  assert sign != 0
  # The log-det is a sum of N·D terms log|J_ii| that may cancel: its rounding is relative to
  # the terms' size, not to the (possibly small) sum.
  terms = float(np.sum(np.abs(np.log(np.abs(np.diag(jac))))))
  bound = float32_bound(terms, helpers.block_depth(block), helpers.block_reduction(block))
  got = float(out.log_det_b[0])
  assert abs(got - expected) <= bound, (got, expected, bound)
  # Non-trivial: far from the identity (the scales 1/J_ii vary, the output moves).
  assert np.std(np.log(np.abs(np.diag(jac)))) > 0.1
  assert helpers.max_abs_diff(out.z_bnd, x) > 0.1

  # The Jacobian is block-triangular in scan order with diagonal diagonal blocks: z_j
  # depends on x_j (elementwise) and on the elements before it in the scan only. Autodiff
  # of a dependence that is not there (masked attention, elementwise maps) is exactly zero.
  jac4 = jac.reshape(N, D, N, D)
  for i in range(N):
    for j in range(N):
      before = j < i if not block.reverse else j > i
      if i == j:
        off_diagonal = jac4[i, :, i, :] - np.diag(np.diag(jac4[i, :, i, :]))
        np.testing.assert_array_equal(off_diagonal, 0.0)
      elif not before:
        np.testing.assert_array_equal(jac4[i, :, j, :], 0.0, err_msg=str((i, j)))
  # ... and the dependence on earlier elements is really there.
  first, second = (0, 1) if not block.reverse else (N - 1, N - 2)
  assert np.max(np.abs(jac4[second, :, first, :])) > 1e-3


def test_padded_context_positions_do_not_change_the_flow():
  """Junk at padded context positions changes nothing, bitwise: a padded key gets exactly
  zero attention weight, so the same program sums the same numbers."""
  block, params, x, t, context, valid = helpers.block_and_inputs("deep")
  junk = context + 5.0 * helpers.normal(context.shape, seed=7)
  context_junk = jnp.where(valid[..., None], context, junk)
  apply = jax.jit(lambda c: block.apply({"params": params}, x, t, c, valid))
  out, out_junk = apply(context), apply(context_junk)
  assert helpers.bits(out_junk.z_bnd) == helpers.bits(out.z_bnd)
  assert helpers.bits(out_junk.log_det_b) == helpers.bits(out.log_det_b)
  # The valid positions do matter.
  out_other = apply(context + 5.0 * helpers.normal(context.shape, seed=8))
  assert helpers.max_abs_diff(out_other.z_bnd, out.z_bnd) > 1e-2
