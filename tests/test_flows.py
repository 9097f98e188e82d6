"""Tests for the flow maths (SPEC §2–§4, §6): exact log-determinants, inverses, the identity
at initialisation, guidance, scale functions, Tweedie denoising, likelihoods, patch latents."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starflow2_jax.flows import affine
from starflow2_jax.flows import decode
from starflow2_jax.flows import denoise
from starflow2_jax.flows import guidance
from starflow2_jax.flows import likelihood
from starflow2_jax.flows import noise
from starflow2_jax.flows import stack
from starflow2_jax.latents import patch
from starflow2_jax.models import caption_flow

try:
  from tests import helpers
except ImportError:  # tests/ is on sys.path (pytest's rootdir-less "prepend" import mode)
  import helpers

B, N, D = 2, helpers.NUM_ELEMENTS, helpers.LATENT_DIM
GUIDANCE_WEIGHT = 1.5


def _x(batch=B, seed=0):
  return helpers.normal((batch, N, D), seed)


# ---------------------------------------------------------------------------------------
# Blocks: the three kinds the tests exercise, with random (non-identity) parameters.
# ---------------------------------------------------------------------------------------

BLOCK_KINDS = {
    # kind: (module factory, takes a context)
    "shallow": (lambda: helpers.shallow_block(reverse=False), False),
    "shallow_reverse": (lambda: helpers.shallow_block(reverse=True), False),
    "shallow_exp": (lambda: helpers.shallow_block(reverse=True, scale="exp"), False),
    "deep": (lambda: helpers.deep_block(), True),
}


def _block_and_inputs(kind, batch=B, seed=0):
  factory, conditioned = BLOCK_KINDS[kind]
  block = factory()
  x, t = _x(batch, seed), helpers.noise_levels(batch)
  context, valid = helpers.context_inputs(batch) if conditioned else (None, None)
  params = helpers.random_params(block, x, t, context, valid, seed=seed + 11)
  return block, params, x, t, context, valid


@pytest.mark.parametrize("kind", ["shallow", "shallow_reverse", "shallow_exp", "deep"])
def test_block_log_det_matches_jacobian(kind):
  block, params, x, t, context, valid = _block_and_inputs(kind, batch=1)

  def forward_flat(x_flat):
    return block.apply({"params": params}, x_flat.reshape(1, N, D), t, context, valid).z_bnd.ravel()

  @jax.jit
  def forward_and_jacobian(x):
    out = block.apply({"params": params}, x, t, context, valid)
    return out, jax.jacfwd(forward_flat)(x.ravel())

  out, jac = forward_and_jacobian(x)
  jac = np.asarray(jac, np.float64)
  sign, expected = np.linalg.slogdet(jac)
  got = float(out.log_det_b[0])
  assert sign != 0
  assert abs(got - expected) <= 1e-4 * max(1.0, abs(expected)), (got, expected)
  # Non-trivial: far from the identity (the scales 1/J_ii vary, the output moves).
  assert np.std(np.log(np.abs(np.diag(jac)))) > 0.1
  assert helpers.max_abs_diff(out.z_bnd, x) > 0.1

  # The Jacobian is block-triangular in scan order with diagonal diagonal blocks: z_j
  # depends on x_j (elementwise) and on the elements before it in the scan only.
  jac4 = jac.reshape(N, D, N, D)
  for i in range(N):
    for j in range(N):
      before = j < i if not block.reverse else j > i
      if i == j:
        off_diagonal = jac4[i, :, i, :] - np.diag(np.diag(jac4[i, :, i, :]))
        assert np.max(np.abs(off_diagonal)) <= 1e-7
      elif not before:
        assert np.max(np.abs(jac4[i, :, j, :])) <= 1e-7, (i, j)
  # ... and the dependence on earlier elements is really there.
  first, second = (0, 1) if not block.reverse else (N - 1, N - 2)
  assert np.max(np.abs(jac4[second, :, first, :])) > 1e-3


def test_padded_context_positions_do_not_change_the_flow():
  block, params, x, t, context, valid = _block_and_inputs("deep")
  junk = context + 5.0 * helpers.normal(context.shape, seed=7)
  context_junk = jnp.where(valid[..., None], context, junk)
  apply = jax.jit(lambda c: block.apply({"params": params}, x, t, c, valid))
  out, out_junk = apply(context), apply(context_junk)
  assert helpers.max_abs_diff(out_junk.z_bnd, out.z_bnd) <= 1e-6
  assert helpers.max_abs_diff(out_junk.log_det_b, out.log_det_b) <= 1e-5
  # The valid positions do matter.
  out_other = apply(context + 5.0 * helpers.normal(context.shape, seed=8))
  assert helpers.max_abs_diff(out_other.z_bnd, out.z_bnd) > 1e-2


# ---------------------------------------------------------------------------------------
# The deep–shallow stack: round trip.
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module", name="flow")
def _flow():
  config = helpers.flow_config()
  model = stack.DeepShallowFlow(config)
  x, t = _x(), helpers.noise_levels(B)
  context, valid = helpers.context_inputs(B)
  params = helpers.random_params(model, x, t, context, valid, seed=5)
  forward = jax.jit(lambda x: model.apply({"params": params}, x, t, context, valid))
  return config, forward, params, x, t, context, valid


def test_deep_shallow_round_trip(flow):
  config, forward, params, x, t, context, valid = flow
  assert not bool(jnp.all(valid))                      # the context really has padding
  out = forward(x)
  x_back = jax.jit(lambda z: stack.invert(config, params, z, t, context, valid))(out.z_bnd)
  assert helpers.max_abs_diff(x_back, x) <= 1e-5
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
  np.testing.assert_allclose(out.log_det_shallow_b, total, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out.log_det_deep_b, deep_out.log_det_b, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out.z_bnd, deep_out.z_bnd, atol=1e-6)


# ---------------------------------------------------------------------------------------
# KV-cached inverse vs the recomputing reference.
# ---------------------------------------------------------------------------------------

def _guidance_context(context, valid):
  """2B rows: the conditional context, then an 'unconditional' one (everything but the last,
  start-like position masked out)."""
  valid_u = jnp.zeros_like(valid).at[:, -1].set(True)
  return jnp.concatenate([context, context]), jnp.concatenate([valid, valid_u])


@pytest.fixture(scope="module", name="inverses")
def _inverses():
  """Per block kind: (block, params, t, context, valid, cached inverse, recomputing inverse);
  the inverses are jitted once per kind and guidance weight (static) and shared by tests."""
  out = {}
  for kind in ("shallow", "shallow_reverse", "deep"):
    block, params, _, t, context, valid = _block_and_inputs(kind)
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
  z = _x(seed=3)
  weight = GUIDANCE_WEIGHT if guided else None
  if guided:
    context, valid = _guidance_context(context, valid)
  x_cached, x_reference = cached(z, context, valid, weight), recompute(z, context, valid, weight)
  assert x_cached.shape == z.shape
  assert helpers.max_abs_diff(x_cached, x_reference) <= 1e-5
  if not guided:  # the unguided inverse really inverts the forward map
    z_back = jax.jit(block.apply)({"params": params}, x_reference, t, context, valid).z_bnd
    assert helpers.max_abs_diff(z_back, z) <= 1e-5


def test_guided_inverse_with_weight_zero_equals_unguided(inverses):
  block, params, t, context, valid, invert, _ = inverses["deep"]
  z = _x(seed=3)
  unguided = invert(z, context, valid, None)
  context2, valid2 = _guidance_context(context, valid)
  guided0 = invert(z, context2, valid2, 0.0)
  guided = invert(z, context2, valid2, GUIDANCE_WEIGHT)
  assert helpers.max_abs_diff(guided0, unguided) <= 1e-6
  assert helpers.max_abs_diff(guided, unguided) > 1e-2   # guidance does something
  with pytest.raises(ValueError, match="2B rows"):
    decode.invert_block(block, params, z, t, context, valid, GUIDANCE_WEIGHT)


# ---------------------------------------------------------------------------------------
# A fresh model is exactly the identity.
# ---------------------------------------------------------------------------------------

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
  x, t = _x(seed=6), helpers.noise_levels(B)
  ids = jnp.array([[3, 4, 5, 0], [6, 0, 0, 0]], jnp.int32)
  params = helpers.init(model, x, t, ids, ids > 0)
  keep = jnp.array([True, False])
  out = jax.jit(lambda x: model.apply({"params": params}, x, t, ids, ids > 0, keep))(x)
  _assert_exact_identity(out, x)

  flow = stack.DeepShallowFlow(flow_config)
  context, valid = helpers.context_inputs(B, dim=8)
  out = jax.jit(lambda x: flow.apply({"params": params["flow"]}, x, t, context, valid))(x)
  _assert_exact_identity(out, x)


# ---------------------------------------------------------------------------------------
# Guidance.
# ---------------------------------------------------------------------------------------

def _gaussian_args(seed, shape=(3, 4)):
  rng = np.random.default_rng(seed)
  mean_c, mean_u = rng.normal(size=shape), rng.normal(size=shape)
  log_s_c = rng.normal(scale=0.5, size=shape)
  return mean_c, log_s_c, mean_u, rng


def test_guidance_weight_zero_is_conditional_exactly():
  mean_c, log_s_c, mean_u, rng = _gaussian_args(0)
  log_s_u = rng.normal(scale=0.5, size=log_s_c.shape)      # either order of the scales
  args = [jnp.asarray(a, jnp.float32) for a in (mean_c, log_s_c, mean_u, log_s_u)]
  mean, log_s = guidance.guided_gaussian(*args, 0.0)
  assert helpers.bits(mean) == helpers.bits(args[0])
  assert helpers.bits(log_s) == helpers.bits(args[1])


def _log_normal(x, mean, log_s):
  return -0.5 * ((x - mean) / np.exp(log_s)) ** 2 - log_s - 0.5 * np.log(2 * np.pi)


@pytest.mark.parametrize("weight", [0.5, 2.0, 7.0])
def test_guidance_is_the_normalised_power_product(weight):
  mean_c, log_s_c, mean_u, rng = _gaussian_args(1)
  log_s_u = log_s_c + rng.uniform(0.0, 1.0, size=log_s_c.shape)   # s_c <= s_u
  log_s_u[0, 0] = log_s_c[0, 0]                                    # equal scales too
  mean, log_s = guidance.guided_gaussian(
      *[jnp.asarray(a, jnp.float32) for a in (mean_c, log_s_c, mean_u, log_s_u)], weight)
  mean, log_s = np.asarray(mean, np.float64), np.asarray(log_s, np.float64)

  # Log-densities at several points agree up to an x-independent constant.
  points = mean_c[None] + 3.0 * rng.normal(size=(9,) + mean_c.shape)
  target = (1 + weight) * _log_normal(points, mean_c, log_s_c) - weight * _log_normal(
      points, mean_u, log_s_u)
  diff = _log_normal(points, mean, log_s) - target
  np.testing.assert_allclose(diff - diff.mean(axis=0), 0.0, atol=2e-4)

  # Completing the square independently: precisions add, precision-weighted means add.
  prec = (1 + weight) * np.exp(-2 * log_s_c) - weight * np.exp(-2 * log_s_u)
  expected_mean = ((1 + weight) * mean_c * np.exp(-2 * log_s_c)
                   - weight * mean_u * np.exp(-2 * log_s_u)) / prec
  np.testing.assert_allclose(mean, expected_mean, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(log_s, -0.5 * np.log(prec), rtol=1e-5, atol=1e-5)


def test_guidance_clips_when_unconditional_is_narrower():
  """s_c > s_u: the product is not normalisable; r is clipped to 1 (SPEC §6), which keeps
  the conditional scale and extrapolates the mean."""
  mean_c, log_s_c, mean_u, _ = _gaussian_args(2)
  log_s_u = log_s_c - 0.3
  w = 2.0
  mean, log_s = guidance.guided_gaussian(
      *[jnp.asarray(a, jnp.float32) for a in (mean_c, log_s_c, mean_u, log_s_u)], w)
  np.testing.assert_allclose(log_s, log_s_c, atol=1e-6)
  np.testing.assert_allclose(mean, (1 + w) * mean_c - w * mean_u, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Scale functions.
# ---------------------------------------------------------------------------------------

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
  assert float(jnp.max(jnp.abs(log_s))) <= 4.0 + 1e-5                # soft-clipped
  z = affine.to_noise(u, mean, log_s)
  np.testing.assert_allclose(z, (u - mean) / jnp.exp(log_s), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(affine.from_noise(z, mean, log_s), u, rtol=1e-5, atol=1e-5)
  # Increasing in a, so the head can reach every scale in its range.
  order = np.argsort(np.asarray(a))
  assert np.all(np.diff(np.asarray(log_s)[order]) >= 0)


def test_unknown_scale_function_raises():
  with pytest.raises(ValueError, match="scale"):
    affine.log_scale(jnp.zeros(3), "sigmoid")
  block = helpers.shallow_block(scale="sigmoid")
  x, t = _x(batch=1), helpers.noise_levels(1)
  with pytest.raises(ValueError, match="scale"):
    jax.eval_shape(block.init, jax.random.key(0), x, t)


# ---------------------------------------------------------------------------------------
# Tweedie denoising on a Gaussian whose score is known in closed form.
# ---------------------------------------------------------------------------------------

DATA_VAR = 0.04


def _gaussian_problem(seed=0):
  rng = np.random.default_rng(seed)
  m = rng.normal(size=(3, 4, 2))
  x = m + rng.normal(size=m.shape)

  def log_prob(x_bnd, t_b):
    var = DATA_VAR + jnp.square(t_b)[:, None, None]
    return jnp.sum(-0.5 * jnp.square(x_bnd - m) / var - 0.5 * jnp.log(2 * jnp.pi * var),
                   axis=(1, 2))

  return m, x, log_prob


def _posterior_mean(x, m, sigma):
  return m + DATA_VAR / (DATA_VAR + sigma ** 2) * (x - m)


def test_noise_ladder():
  ladder = np.asarray(denoise.noise_ladder(0.5, 0.05, 4), np.float64)
  assert ladder.shape == (5,)
  np.testing.assert_allclose([ladder[0], ladder[-1]], [0.5, 0.05], rtol=1e-6)
  ratios = ladder[1:] / ladder[:-1]
  np.testing.assert_allclose(ratios, ratios[0], rtol=1e-5)
  assert np.all(ratios < 1)
  np.testing.assert_allclose(denoise.noise_ladder(0.5, 0.05, 0), [0.5])


def test_tweedie_zero_steps_is_posterior_mean():
  m, x, log_prob = _gaussian_problem()
  sigma = 0.5
  out = denoise.tweedie_denoise(log_prob, jnp.asarray(x, jnp.float32),
                                denoise.noise_ladder(sigma, 0.05, 0))
  np.testing.assert_allclose(out, _posterior_mean(x, m, sigma), rtol=1e-5, atol=1e-5)


def _euler_by_hand(x, m, sigmas):
  sigmas = np.asarray(sigmas, np.float64)
  for s, s_next in zip(sigmas[:-1], sigmas[1:]):
    x_hat = _posterior_mean(x, m, s)
    x = x - (x - x_hat) / s * (s - s_next)
  return _posterior_mean(x, m, sigmas[-1])


def test_tweedie_euler_steps_match_hand_recursion():
  m, x, log_prob = _gaussian_problem(1)
  sigmas = denoise.noise_ladder(0.5, 0.05, 4)
  out = np.asarray(denoise.tweedie_denoise(log_prob, jnp.asarray(x, jnp.float32), sigmas))
  np.testing.assert_allclose(out, _euler_by_hand(x, m, sigmas), rtol=1e-5, atol=1e-5)
  # Denoising moves every sample toward the data mean.
  assert np.all(np.abs(out - m) < np.abs(x - m))


def test_tweedie_converges_to_probability_flow_ode():
  """dx/dσ = σ (x − m)/(v + σ²) has the solution x(σ) − m ∝ sqrt(v + σ²); with many small
  steps the Euler ladder approaches it, with an error that shrinks with the step count."""
  m, x, log_prob = _gaussian_problem(2)
  t_max, t_min = 0.5, 0.05
  x_ode = m + (x - m) * np.sqrt((DATA_VAR + t_min ** 2) / (DATA_VAR + t_max ** 2))
  exact = _posterior_mean(x_ode, m, t_min)
  errors = []
  for steps in (8, 256):
    out = denoise.tweedie_denoise(log_prob, jnp.asarray(x, jnp.float32),
                                  denoise.noise_ladder(t_max, t_min, steps))
    errors.append(float(np.max(np.abs(np.asarray(out) - exact))))
  assert errors[1] < 0.1 * errors[0]
  assert errors[1] <= 2e-3 * float(np.max(np.abs(exact - m)))


# ---------------------------------------------------------------------------------------
# Likelihoods and bits per dimension.
# ---------------------------------------------------------------------------------------

def test_nll_of_standard_normal():
  z = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)
  nll = np.asarray(likelihood.nll_per_dim(jnp.asarray(z), jnp.zeros(3)))
  expected = np.mean(0.5 * z.astype(np.float64) ** 2 + 0.5 * np.log(2 * np.pi), axis=(1, 2))
  np.testing.assert_allclose(nll, expected, rtol=1e-6)
  # A log-det raises the likelihood by log_det / (N·D) nats per dimension.
  log_det = jnp.array([1.0, -2.0, 20.0])
  np.testing.assert_allclose(likelihood.nll_per_dim(jnp.asarray(z), log_det),
                             expected - np.asarray(log_det) / 20, rtol=1e-6)


def test_bits_per_dim_conventions():
  # Uniform on [−1, 1]: density 1/2 per dimension, i.e. ln 2 nats; that is 8 bits per 8-bit pixel.
  assert likelihood.pixel_bits_per_dim(math.log(2.0)) == pytest.approx(8.0, abs=1e-12)
  assert likelihood.latent_bits_per_dim(math.log(2.0)) == pytest.approx(1.0, abs=1e-12)
  # Standard normal at 0: ½ log 2π nats = that / ln 2 bits.
  assert likelihood.latent_bits_per_dim(likelihood.HALF_LOG_2PI) == pytest.approx(
      0.5 * math.log2(2 * math.pi), abs=1e-12)


def test_noise_helpers():
  t = noise.sample_noise_levels(jax.random.key(0), 256, 0.1, 0.3)
  assert float(t.min()) >= 0.1 and float(t.max()) <= 0.3
  np.testing.assert_allclose(jnp.mean(noise.loss_weights(t, "t")), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(noise.loss_weights(t, "uniform"), np.ones(256))
  x = jnp.zeros((256, 2, 3))
  eps = noise.add_noise(jax.random.key(1), x, t) / t[:, None, None]
  assert abs(float(jnp.std(eps)) - 1.0) < 0.1
  with pytest.raises(ValueError):
    noise.loss_weights(t, "sqrt")


# ---------------------------------------------------------------------------------------
# The patch latent.
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3])
def test_patch_latent_round_trip(channels):
  latent = patch.PatchLatent((8, 12), channels, 4)
  images = np.random.default_rng(channels).integers(0, 256, (2, 8, 12, channels), np.uint8)
  images[0, 0, 0] = 0
  images[0, 0, 1] = 255
  x = latent.encode(images)
  assert x.shape == (2, latent.num_tokens, latent.token_dim) == (2, 6, 16 * channels)
  assert x.dtype == jnp.float32
  assert float(x.min()) > -1.0 and float(x.max()) < 1.0
  decoded = np.asarray(latent.decode(x))
  assert decoded.dtype == np.uint8
  np.testing.assert_array_equal(decoded, images)
  # Token order is row-major over the patch grid; within a token, (row, column, channel).
  np.testing.assert_allclose(x[1, 4], (images[1, 4:8, 4:8].reshape(-1) + 0.5) / 128 - 1)
  # Decoding rounds to the nearest bin: values within half a bin come back to the same pixel.
  jitter = np.random.default_rng(9).uniform(-0.99 / 256, 0.99 / 256, size=x.shape)
  np.testing.assert_array_equal(latent.decode(x + jitter), images)


def test_patch_latent_rejects_indivisible_size():
  with pytest.raises(ValueError, match="divisible"):
    patch.PatchLatent((28, 30), 1, 4)
