"""The FAE's networks (`starflow2_jax/models/fae.py`): the paper preset's parameter counts,
the tiny preset's shapes and logical axis names, non-causal attention over the whole grid,
the feature decoder's axial RoPE, where the pixel decoder puts each token's patch, and the
Gaussian helpers (KL against numeric integration, the reparameterised draws' moments)."""

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starflow2_jax import sharding
from starflow2_jax.latents import patch as patch_latent
from starflow2_jax.models import fae
import helpers
from tolerance import assert_float32_close

TINY = fae.PRESETS["tiny"]
BATCH = 2


@pytest.fixture(scope="module")
def tiny():
  """(module, random parameters {"params": …}, features [B, N, F]) of the tiny preset."""
  model = fae.FAE(TINY)
  features = jax.random.normal(jax.random.key(1), (BATCH, TINY.num_tokens, TINY.feature_dim))
  params = {"params": helpers.random_params(model, features, seed=5)}
  return model, params, features


def test_paper_counts_within_one_percent_of_the_paper():
  counts = fae.param_counts(fae.PRESETS["paper"])
  paper = {"encoder": 38.17e6, "feature_decoder": 170.4e6, "pixel_decoder": 305.4e6}
  for name, expected in paper.items():
    assert abs(counts[name] / expected - 1) < 0.01, (name, counts[name], expected)
  assert counts["total"] == sum(counts[name] for name in paper)     # nothing outside them


def test_tiny_shapes_and_param_tree(tiny):
  """Shapes and dtypes by `jax.eval_shape` (the values are the other tests' business)."""
  model, params, features = tiny
  assert set(params["params"]) == {"encoder", "feature_decoder", "pixel_decoder"}
  n, d, f = TINY.num_tokens, TINY.latent_dim, TINY.feature_dim
  run = lambda method, x: jax.eval_shape(lambda v: model.apply(params, v, method=method), x)
  mean, logvar = run("encode", features)
  assert mean.shape == logvar.shape == (BATCH, n, d)
  assert run("decode_features", mean).shape == (BATCH, n, f)
  images = run("decode_pixels", features)
  assert images.shape == (BATCH, *TINY.image_size, TINY.channels) == (BATCH, 12, 16, 3)
  assert images.dtype == mean.dtype == jnp.float32


def test_every_parameter_has_logical_axes():
  """Every leaf of the tiny FAE's tree is logically partitioned, and the default rules map
  them onto a mesh (no axis name used twice in one parameter)."""
  boxed = jax.eval_shape(fae.FAE(TINY).init, jax.random.key(0),
                         jnp.zeros((1, TINY.num_tokens, TINY.feature_dim)))["params"]
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  leaves = jax.tree.leaves(boxed, is_leaf=is_box)
  assert len(leaves) > 30 and all(is_box(x) for x in leaves)
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
  shardings = sharding.logical_shardings(boxed, mesh, sharding.DEFAULT_RULES)
  assert len(jax.tree.leaves(shardings)) == len(leaves)


def test_config_from_dict():
  config = fae.FAEConfig.from_dict({"preset": "tiny", "latent_dim": 6, "grid": [2, 5]})
  assert (config.latent_dim, config.grid, config.feature_dim) == (6, (2, 5), 32)
  assert fae.FAEConfig.from_dict(
      {k: getattr(TINY, k) for k in TINY.__dataclass_fields__}) == TINY
  with pytest.raises(ValueError, match="unknown"):
    fae.FAEConfig.from_dict({"preset": "tiny", "latent_dims": 6})


@pytest.mark.parametrize("method, input_dim", [
    ("encode", TINY.feature_dim), ("decode_features", TINY.latent_dim),
    ("decode_pixels", TINY.feature_dim)])
def test_last_token_reaches_the_first(tiny, method, input_dim):
  """Perturbing the last token's input changes the first token's output, which a causal
  network would leave bitwise unchanged."""
  model, params, _ = tiny
  x = jax.random.normal(jax.random.key(2), (1, TINY.num_tokens, input_dim))
  # A random change: adding a constant would vanish in the encoder's LayerNorm.
  moved = x.at[:, -1].add(jax.random.normal(jax.random.key(7), (input_dim,)))
  first = lambda out: (out[0] if isinstance(out, tuple) else out)
  apply = jax.jit(lambda v: first(model.apply(params, v, method=method)))
  y, y_moved = apply(x), apply(moved)
  if method == "decode_pixels":        # the first token's output is the top-left patch
    p = TINY.pixel_patch
    y, y_moved = y[:, :p, :p], y_moved[:, :p, :p]
  else:
    y, y_moved = y[:, 0], y_moved[:, 0]
  assert np.max(np.abs(y - y_moved)) > 1e-3 * np.max(np.abs(y))


def test_feature_decoder_rotates_by_row_then_column():
  """The axial RoPE angles of token k: the first half turn with its row k // gw (equal
  exactly for tokens of one row), the second half with its column k % gw."""
  (gh, gw), head_dim = TINY.grid, TINY.feature_decoder_head_dim
  angles = np.asarray(fae.grid_angles(TINY.grid, head_dim, TINY.rope_theta))[0]
  assert angles.shape == (gh * gw, head_dim // 2)
  by_row, by_col = np.split(angles, 2, axis=-1)
  k = np.arange(gh * gw)
  same_row = (k[:, None] // gw) == (k[None, :] // gw)
  same_col = (k[:, None] % gw) == (k[None, :] % gw)
  np.testing.assert_array_equal((by_row[:, None] == by_row[None]).all(-1), same_row)
  np.testing.assert_array_equal((by_col[:, None] == by_col[None]).all(-1), same_col)
  np.testing.assert_array_equal(by_row[:, 0], k // gw)        # the first frequency is 1


def test_unpatchify_layout_by_hand():
  """Token k's patch lands at row k // gw, column k % gw; inside it, (row, column, channel)
  order — the patch latent's, so its tokens round-trip through `unpatchify`."""
  (gh, gw), p, c = TINY.grid, TINY.pixel_patch, TINY.channels
  k, i, j, ch = np.meshgrid(np.arange(gh * gw), np.arange(p), np.arange(p), np.arange(c),
                            indexing="ij")
  code = 1000 * k + 100 * i + 10 * j + ch                      # [N, p, p, C]
  images = np.asarray(fae.unpatchify(jnp.asarray(code.reshape(1, gh * gw, -1)), (gh, gw), p))
  rows, cols = np.meshgrid(np.arange(gh * p), np.arange(gw * p), indexing="ij")
  expected_k = (rows // p) * gw + cols // p
  for ch in range(c):
    np.testing.assert_array_equal(
        images[0, :, :, ch], 1000 * expected_k + 100 * (rows % p) + 10 * (cols % p) + ch)
  latent = patch_latent.PatchLatent((gh * p, gw * p), c, p)
  pixels = jax.random.randint(jax.random.key(3), (1, gh * p, gw * p, c), 0, 256)
  np.testing.assert_array_equal(fae.unpatchify(latent.encode(pixels), (gh, gw), p),
                                (pixels + 0.5) / 128.0 - 1.0)


def test_pixel_decoder_puts_token_k_at_its_grid_cell(tiny):
  """With the attention outputs zeroed the pixel decoder works token by token, so a change to
  token k's features moves exactly the pixels of grid cell (k // gw, k % gw) — all of them,
  and nothing else (bitwise)."""
  model, params, features = tiny
  flat = traverse_util.flatten_dict(params)
  flat = {key: (jnp.zeros_like(v) if "pixel_decoder" in key and key[-2] == "attention"
                and key[-1].startswith("out_") else v) for key, v in flat.items()}
  assert sum("out_kernel" in key and "pixel_decoder" in key for key in flat) == 2
  local = traverse_util.unflatten_dict(flat)
  decode = jax.jit(lambda f: model.apply(local, f, method="decode_pixels"))
  base = np.asarray(decode(features))
  (gh, gw), p = TINY.grid, TINY.pixel_patch
  for k in range(gh * gw):
    changed = np.asarray(decode(features.at[:, k].add(0.5))) != base      # [B, H, W, C]
    cell = np.zeros_like(changed)
    cell[:, (k // gw) * p:(k // gw + 1) * p, (k % gw) * p:(k % gw + 1) * p] = True
    np.testing.assert_array_equal(changed, cell, err_msg=f"token {k}")


def test_gaussian_kl_against_numeric_integration():
  """KL(q ‖ N(0, 1)) = ∫ q log(q / p) by the trapezoid rule over ±14 σ in float64 (for a
  Gaussian integrand the rule's error is far below float32 rounding)."""
  mean = np.array([0.0, 0.0, 1.5, -2.0, 0.3, 3.0])
  logvar = np.array([0.0, -2.0, 0.0, 1.0, -0.7, 2.0])
  numeric = []
  for m, lv in zip(mean, logvar):
    s = np.exp(0.5 * lv)
    x = np.linspace(m - 14 * s, m + 14 * s, 40_001)
    log_q = -0.5 * ((x - m) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi)
    log_p = -0.5 * x ** 2 - 0.5 * np.log(2 * np.pi)
    numeric.append(np.trapezoid(np.exp(log_q) * (log_q - log_p), x))
  kl = fae.gaussian_kl(jnp.asarray(mean), jnp.asarray(logvar))
  assert kl[0] == 0.0 and np.all(np.asarray(kl[1:]) > 0.05)
  assert_float32_close(kl, np.array(numeric), depth=1, reduction=4)


def test_reparameterise_moments():
  """Over n = 400 000 draws the sample mean lies within 5 standard errors (σ/√n) of `mean`
  and the sample variance within 5 of its own (σ²·√(2/n)) of e^logvar: a correct sampler
  fails one element's check with probability ≈ 6e-7 (the draws are seeded, so the test is
  deterministic), while e^logvar read as a standard deviation misses by hundreds of
  standard errors."""
  n = 400_000
  mean = jnp.array([0.0, 1.5, -2.0, 0.5])
  logvar = jnp.array([0.0, 1.0, -1.5, 2.0])
  draws = jax.vmap(lambda key: fae.reparameterise(key, mean, logvar))(
      jax.random.split(jax.random.key(4), n))
  draws = np.asarray(draws, np.float64)
  var = np.exp(np.asarray(logvar, np.float64))
  assert np.all(np.abs(draws.mean(0) - np.asarray(mean)) < 5 * np.sqrt(var / n))
  assert np.all(np.abs(draws.var(0, ddof=1) - var) < 5 * var * np.sqrt(2 / n))
  again = fae.reparameterise(jax.random.key(5), mean, logvar)
  assert not np.array_equal(again, fae.reparameterise(jax.random.key(6), mean, logvar))
