"""`skip_analysis` (paper §5.4): the skips' contribution ratios and cosines over held-out records.

Claims: a fresh stage-3 model's skips contribute exactly nothing; with non-zero W_v, W_t the
evaluator's means equal a brute-force float64 recomputation from the model's pieces (h^V and g
from a separate `streams` pass, P_u, W_v, W_t and the noise embedding applied by hand), only
valid positions of the counted examples counting; the histograms are drawn where and as said;
a model without skips is refused.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from data_pipelines import records
from data_pipelines import writers
from helpers import random_params
from helpers import unboxed
from test_pretzel_stages import tiny_config
from tolerance import assert_float32_close
from tolerance import float32_bound
from starflow2_jax.evaluation import evaluators
from starflow2_jax.evaluation import skip_analysis
from starflow2_jax.training import pretzel_task

BATCH, NUM_EXAMPLES = 2, 3     # two batches, the second padded: one of its rows counts
# Rounding may differ between the evaluator's pass and the pieces' passes in every layer:
# VLM 1, adapter 1, shallow blocks 2, noise embedding 1, deep 1, the skip projections 1,
# the statistics 1; the widest float32 sum is the VLM's MLP (64).
DEPTH, REDUCTION = 8, 64


def image(seed):
  return np.random.default_rng(seed).integers(0, 256, (4, 4, 1), dtype=np.uint8)


def held_out_records():
  """Five records of different lengths (so the batches' valid counts differ)."""
  t, i = records.TextSegment, lambda s: records.ImageSegment.from_array(image(s))
  return [records.InterleavedRecord(segments) for segments in (
      [t("ab"), i(0), t("c"), i(1)], [t("hello"), i(2)], [i(3), t("xyz")],
      [t("q"), i(4), t("rs"), i(5)], [t("abcdef"), i(6)])]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(config, stage-3 task, fresh params, workdir, data dir) with the records written."""
  root = tmp_path_factory.mktemp("skip_analysis")
  config = tiny_config(3)
  config.data.test_split = "test"
  config.eval.update(batch_size=BATCH, num_examples=NUM_EXAMPLES)
  writers.write_records(held_out_records(), str(root / "data"), "test")
  task = pretzel_task.PretzelTask(config)
  return config, task, fresh_params(task), str(root / "work"), str(root / "data")


def fresh_params(task):
  """Random parameters (no slow compiled initialiser) with W_v, W_t from the model's own
  initialiser, as at the start of stage 3."""
  b = task.dummy_batch()
  params = random_params(task.model, b["ids"], task.encode_images(b["images"]),
                         b["image_positions"], b["image_valid"], b["is_visual"],
                         jnp.moveaxis(b["positions"], 1, 0), b["valid"], jnp.ones((1,)))
  h, g = (jnp.ones((1, 1, params[k]["kernel"].shape[0])) for k in ("w_v", "w_t"))
  skips = task.model.init(jax.random.key(0), h, g,
                          method=lambda m, h, g: (m.w_v(h), m.w_t(g)))["params"]
  return dict(params, **unboxed(skips))


def context_for(setup, params, step=0):
  config, task, _, workdir, data_dir = setup
  def no_held_out_metrics(**_):
    raise AssertionError("skip_analysis does not use the held-out metrics")
  return evaluators.EvalContext(config, task, params, step, workdir, data_dir,
                                no_held_out_metrics)


def with_random_skips(params, scale=0.3, seed=0):
  rng = np.random.default_rng(seed)
  return dict(params, **{k: {"kernel": jnp.asarray(scale * rng.normal(
      size=params[k]["kernel"].shape), jnp.float32)} for k in ("w_v", "w_t")})


@pytest.fixture(scope="module")
def trained(setup):
  """(params with random skips, the evaluator's result through the registry at step 7)."""
  params = with_random_skips(setup[2])
  entries = {"skips": {"type": "skip_analysis", "every": 0, "bins": 20}}
  return params, evaluators.run(entries, context_for(setup, params, step=7))["skips"]


# ---- the brute-force recomputation -------------------------------------------------------


def counted_batches(task):
  """The first NUM_EXAMPLES examples in BATCH-row batches, the last filled by repeating its
  first row (the evaluator's documented shape), with the counted rows."""
  examples = [task.example_transform()(r) for r in held_out_records()[:NUM_EXAMPLES]]
  for start in range(0, NUM_EXAMPLES, BATCH):
    chunk = examples[start:start + BATCH]
    real = np.arange(BATCH) < len(chunk)
    chunk = chunk + [chunk[0]] * (BATCH - len(chunk))
    yield {k: np.stack([e[k] for e in chunk]) for k in chunk[0]}, real


def noise_embedding(model, t_b):
  return model.flow.noise_embed(t_b)


@functools.cache
def applied(task, method):
  """`task.model.apply({"params": params}, *args, method=method)`, jitted (once)."""
  return jax.jit(lambda params, *args: task.model.apply({"params": params}, *args,
                                                        method=method))


def pieces(task, params, batch, rng):
  """float64 (visual skip, visual fused, text skip, text fused) [B, T, ·], each summand made
  by hand from h^V, g (a `streams` pass), u (the shallow blocks) and the parameters."""
  f64 = lambda a: np.asarray(a, np.float64)
  x = task.latent.dequantize(rng, task.batch_latents(batch))
  t = jnp.full((BATCH,), task.config.eval.noise_level, jnp.float32)
  u_bmnd, _ = applied(task, "encode_images")(params, x, t)
  u_btd = np.zeros(batch["ids"].shape + (u_bmnd.shape[-1],), np.float32)
  for b, m in zip(*np.nonzero(batch["image_valid"])):
    u_btd[b, batch["image_positions"][b, m]] = u_bmnd[b, m]
  s = applied(task, "streams")(params, batch["ids"], u_btd, batch["is_visual"],
                               jnp.moveaxis(batch["positions"], 1, 0), batch["valid"], t)
  noise_bw = applied(task, noise_embedding)(params, t)
  h, g = f64(s.h_vlm_btc), f64(s.g_btw)
  p_u = params["flow"]["input_proj"]
  own_v = f64(u_btd) @ f64(p_u["kernel"]) + f64(p_u["bias"]) + f64(noise_bw)[:, None]
  skip_v, skip_t = h @ f64(params["w_v"]["kernel"]), g @ f64(params["w_t"]["kernel"])
  return skip_v, own_v + skip_v, skip_t, h + skip_t


def cosine(a, b):
  return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def brute_force(task, params, context):
  """{`<side>_<quantity>_mean` and `<side>_positions`} recomputed in float64."""
  values = {}
  for i, (batch, real) in enumerate(counted_batches(task)):
    rng = jax.random.fold_in(context.rng("skip_analysis"), i)
    skip_v, fused_v, skip_t, fused_t = pieces(task, params, batch, rng)
    valid = batch["valid"] & real[:, None]
    for side, skip, fused, mask in (("visual", skip_v, fused_v, valid & batch["is_visual"]),
                                    ("text", skip_t, fused_t, valid & ~batch["is_visual"])):
      ratio = np.linalg.norm(skip, axis=-1) / np.linalg.norm(fused, axis=-1)
      for q, v in (("ratio", ratio), ("cosine", cosine(skip, fused - skip)),
                   ("cosine_fused", cosine(skip, fused))):
        values.setdefault(f"{side}_{q}_mean", []).append(v[mask])
  out = {k: float(np.mean(np.concatenate(v))) for k, v in values.items()}
  for side in ("visual", "text"):
    out[f"{side}_positions"] = sum(len(v) for v in values[f"{side}_ratio_mean"])
  return out


def expected_positions(task):
  """(visual, text) positions of the counted examples, from the records' own layout."""
  examples = [task.example_transform()(r) for r in held_out_records()[:NUM_EXAMPLES]]
  visual = sum(int(np.sum(e["valid"] & e["is_visual"])) for e in examples)
  return visual, sum(int(np.sum(e["valid"])) for e in examples) - visual


# ---- tests -------------------------------------------------------------------------------


def test_fresh_skips_contribute_exactly_nothing(setup):
  _, task, params, _, _ = setup
  np.testing.assert_array_equal(params["w_v"]["kernel"], 0.0)     # the model's own init
  result = skip_analysis.evaluate(context_for(setup, params))
  for side in ("visual", "text"):
    for q in ("ratio", "cosine", "cosine_fused"):
      assert result[f"{side}_{q}_mean"] == 0.0, (side, q, result)
  assert (result["visual_positions"], result["text_positions"]) == expected_positions(task)
  assert result["num_examples"] == NUM_EXAMPLES


def test_means_equal_brute_force_recomputation(setup, trained):
  _, task, _, _, _ = setup
  params, result = trained
  want = brute_force(task, params, context_for(setup, params))
  assert (want["visual_positions"], want["text_positions"]) == expected_positions(task)
  for side in ("visual", "text"):
    assert result[f"{side}_positions"] == want[f"{side}_positions"]
    # Ratios relative to their size; cosines, bounded by 1, are differences of terms of size 1.
    assert_float32_close(result[f"{side}_ratio_mean"], want[f"{side}_ratio_mean"],
                         depth=DEPTH, reduction=REDUCTION)
    for q in ("cosine", "cosine_fused"):
      error = abs(result[f"{side}_{q}_mean"] - want[f"{side}_{q}_mean"])
      assert error <= float32_bound(1.0, DEPTH, REDUCTION), (side, q, error)
  # Not trivially equal: the skips carry a real share, and the two cosines (against the other
  # summand, the paper's; against the fused sum) are told apart far beyond the tolerance.
  for side in ("visual", "text"):
    assert 0.05 < want[f"{side}_ratio_mean"] < 0.95, want
    gap = abs(want[f"{side}_cosine_mean"] - want[f"{side}_cosine_fused_mean"])
    assert gap > 1e3 * float32_bound(1.0, DEPTH, REDUCTION), want
  assert abs(want["visual_ratio_mean"] - want["text_ratio_mean"]) > 1e-3


def test_result_keys_and_histogram_files(setup, trained):
  _, result = trained
  histograms = {f"{s}_{q}_histogram" for s in ("visual", "text") for q in ("ratio", "cosine")}
  means = {f"{s}_{q}_mean" for s in ("visual", "text")
           for q in ("ratio", "cosine", "cosine_fused")}
  assert set(result) == histograms | means | {
      "visual_positions", "text_positions", "num_examples", "split", "noise_level"}
  out_dir = context_for(setup, None, step=7).output_dir("skips")   # the entry's name
  for key in histograms:
    assert result[key] == f"{out_dir}/test_{key.removesuffix('_histogram')}.png"
    with Image.open(result[key]) as png:
      assert png.size == (424, 236) == skip_analysis.HISTOGRAM_SIZE
      pixels = np.asarray(png.convert("RGB"))
    # Bars and the red mean line are drawn.
    assert np.any(np.all(pixels == skip_analysis.BAR_RGB, axis=-1))
    assert np.any(np.all(pixels == skip_analysis.MEAN_RGB, axis=-1))


def test_histogram_bars_and_mean_line():
  """Three values in bin 2 of 4 on [0, 1] and one in bin 0: bars 200 and 67 px high and 99 px
  wide (a white gap each), the mean line at x = mean · 400 = 195 over the bars."""
  pixels = skip_analysis.histogram_image(np.array([0.55, 0.6, 0.7, 0.1]), 4, 0.0, 1.0, "t")
  plot = pixels[skip_analysis.BAND:skip_analysis.BAND + skip_analysis.PLOT_HEIGHT,
                skip_analysis.MARGIN:skip_analysis.MARGIN + skip_analysis.PLOT_WIDTH]
  bar_height = np.all(plot == skip_analysis.BAR_RGB, axis=-1).sum(axis=0)
  want = np.zeros(400, int)
  want[0:99], want[200:299] = 67, 200
  mean_x = int((0.55 + 0.6 + 0.7 + 0.1) / 4 * 400)
  want[mean_x] = 0
  np.testing.assert_array_equal(bar_height, want)
  assert np.all(plot[:, mean_x] == skip_analysis.MEAN_RGB)
  with pytest.raises(ValueError, match="bins"):
    skip_analysis.histogram_image(np.zeros(3), 401, 0.0, 1.0, "t")


@pytest.mark.parametrize("stage", [1, 2])
def test_model_without_skips_is_refused(setup, stage):
  _, _, _, workdir, data_dir = setup
  config = tiny_config(stage)
  context = evaluators.EvalContext(config, pretzel_task.PretzelTask(config), None, 0, workdir,
                                   data_dir, None)
  with pytest.raises(ValueError, match=f"only the stage-3 Pretzel.*config.stage={stage}"):
    skip_analysis.evaluate(context)
