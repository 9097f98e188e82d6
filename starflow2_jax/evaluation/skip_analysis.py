"""`skip_analysis`: how much the vertical skips carry once stage 3 has trained them (paper §5.4).

Two skips join the streams (SPEC §1):

  visual positions:  e^F = P_u(u) + W_v h^V (+ MLP(log t))   the deep stream's input
  text positions:    h   = h^V + W_t g                       what LMHead reads

For each, per valid (non-padding) position of its kind (text: every valid non-visual position,
the vision start/end tokens included), with `skip` the projected other stream, `fused` the sum
it enters and `own = fused − skip` the receiving stream's own part:

  ratio  = ‖skip‖ / ‖fused‖       the paper's "contribution ratio": the share of the fused
                                   representation's magnitude that the other stream supplies
  cosine = cos(skip, own)          the paper's "directional alignment between the intermediate
                                   TARFlow visual latent and the projected VLM feature" (eq. 5.1;
                                   5.2 likewise for W_t g and h^V): near 0 means the skip adds
                                   complementary information
  cosine_fused = cos(skip, fused)  the same against the whole sum (reported as a mean only)

The paper's equations 5.1–5.2 did not survive its text conversion; the definitions above follow
its words: the ratio is relative to the fused representation, the cosine between the two
summands (against the fused sum, a cosine near zero beside a substantial ratio would need the
own part to cancel the skip, not to complement it).
Choice: at visual positions the fused representation is the token the deep stream actually reads,
the flow's noise embedding included, so `own` is P_u(u) + MLP(log t). A skip of zero has no
direction: its cosines count as 0.

The paper measures while generating from 50 prompts; this evaluator runs the model's own forward
pass (teacher forcing) over held-out records at `config.eval.noise_level`, dequantised as
`eval_metrics` does, batch i with `jax.random.fold_in(context.rng("skip_analysis"), i)`.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageDraw

from data_pipelines import pipeline
from data_pipelines import writers
from starflow2_jax import image_io

NAME = "skip_analysis"
SIDES = ("visual", "text")
QUANTITIES = ("ratio", "cosine", "cosine_fused")
HISTOGRAMS = ("ratio", "cosine")
# Histogram PNG layout in pixels: the plot, a title band above it, an axis band below it.
PLOT_WIDTH, PLOT_HEIGHT, MARGIN, BAND = 400, 200, 12, 18
HISTOGRAM_SIZE = (PLOT_WIDTH + 2 * MARGIN, PLOT_HEIGHT + 2 * BAND)   # PIL's (width, height)
BAR_RGB, MEAN_RGB, TEXT_RGB = (70, 110, 170), (200, 30, 30), (0, 0, 0)


# ---- per position ------------------------------------------------------------------------


def _cosine(a_btc, b_btc):
  """cos(a, b) over the last axis; 0 where either vector is zero."""
  norms_bt = jnp.linalg.norm(a_btc, axis=-1) * jnp.linalg.norm(b_btc, axis=-1)
  dot_bt = jnp.sum(a_btc * b_btc, axis=-1)
  return jnp.where(norms_bt > 0, dot_bt / jnp.where(norms_bt > 0, norms_bt, 1.0), 0.0)


def contribution(skip_btc, fused_btc):
  """{ratio, cosine, cosine_fused} [B, T] of a skip term and the sum it enters (module
  docstring), in float32."""
  skip_btc = skip_btc.astype(jnp.float32)
  fused_btc = fused_btc.astype(jnp.float32)
  fused_norm_bt = jnp.linalg.norm(fused_btc, axis=-1)
  ratio_bt = jnp.linalg.norm(skip_btc, axis=-1) / jnp.where(fused_norm_bt > 0, fused_norm_bt, 1.0)
  return {"ratio": ratio_bt, "cosine": _cosine(skip_btc, fused_btc - skip_btc),
          "cosine_fused": _cosine(skip_btc, fused_btc)}


def position_statistics(task, params, batch, x_bmnd, t_b):
  """One forward pass of the task's model: ({side: {quantity: [B, T]}}, {side: mask [B, T]}),
  the masks selecting valid visual positions and valid text positions."""
  _, state = task.apply(params, batch, x_bmnd, t_b, with_logits=True,
                        mutable=["intermediates"])
  terms = state["intermediates"]
  valid_bt, is_visual_bt = batch["valid"], batch["is_visual"]
  masks = {"visual": valid_bt & is_visual_bt, "text": valid_bt & ~is_visual_bt}
  stats = {side: contribution(terms[f"{side}_skip"][-1], terms[f"{side}_fused"][-1])
           for side in SIDES}
  return stats, masks


@functools.lru_cache(maxsize=4)
def batch_statistics(task, noise_level):
  """Jitted `(params, batch, rng) -> position_statistics` on a held-out batch, its latents
  as in the task's `eval_metrics`; kept per task, so the trainer's later calls do not
  compile again."""
  def step(params, batch, rng):
    x_bmnd = task.latent.dequantize(rng, task.batch_latents(batch))
    t_b = jnp.full((x_bmnd.shape[0],), noise_level, jnp.float32)
    return position_statistics(task, params, batch, x_bmnd, t_b)
  return jax.jit(step)


# ---- held-out data -----------------------------------------------------------------------


def held_out_batches(context, split, num_examples, batch_size):
  """The first `num_examples` examples of `split` in order, as (batch, real_b): every batch of
  `batch_size` rows (one compiled shape), the last one filled by repeating its first row and
  `real_b` marking the rows that count."""
  paths = writers.find_split_files(context.data_dir, split)
  ds = pipeline.make_dataset(paths, context.task.example_transform(), batch_size=batch_size,
                             seed=context.config.seed, shuffle=False, num_epochs=1,
                             drop_remainder=False)
  seen = 0
  for batch in ds:
    if seen >= num_examples:
      return
    count = min(len(batch["ids"]), num_examples - seen)
    rows = np.where(np.arange(batch_size) < count, np.arange(batch_size), 0)
    yield {k: np.asarray(v)[rows] for k, v in batch.items()}, np.arange(batch_size) < count
    seen += count


def collect(context, split, num_examples, batch_size, noise_level):
  """{side: {quantity: 1-D float array}} over the counted positions of the held-out batches,
  and the number of examples read."""
  step = batch_statistics(context.task, noise_level)
  rng = context.rng(NAME)
  values = {side: {q: [] for q in QUANTITIES} for side in SIDES}
  num_read = 0
  for i, (batch, real_b) in enumerate(held_out_batches(context, split, num_examples,
                                                       batch_size)):
    stats, masks = jax.device_get(step(context.params, batch, jax.random.fold_in(rng, i)))
    for side in SIDES:
      keep_bt = masks[side] & real_b[:, None]
      for q in QUANTITIES:
        values[side][q].append(stats[side][q][keep_bt])
    num_read += int(real_b.sum())
  return {side: {q: np.concatenate(v) for q, v in by_q.items()}
          for side, by_q in values.items()}, num_read


# ---- histograms --------------------------------------------------------------------------


def value_range(quantity, values):
  """A histogram's range: cosines on [−1, 1]; ratios on [0, max(1, largest)]."""
  if quantity.startswith("cosine"):
    return -1.0, 1.0
  return 0.0, max(1.0, float(np.max(values, initial=0.0)))


def histogram_image(values, bins, lo, hi, title):
  """uint8 [H, W, 3] (`HISTOGRAM_SIZE`): bars of `values` over `bins` equal bins of [lo, hi]
  (the tallest bar fills the plot), the mean as a red line, the title and range in text."""
  if not 1 <= bins <= PLOT_WIDTH:
    raise ValueError(f"bins must be in [1, {PLOT_WIDTH}] (the plot's width), got {bins}")
  counts, _ = np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi))
  heights = np.round(counts / max(counts.max(initial=0), 1) * PLOT_HEIGHT).astype(int)
  edges = np.round(np.linspace(0, PLOT_WIDTH, bins + 1)).astype(int)
  plot_hwc = np.full((PLOT_HEIGHT, PLOT_WIDTH, 3), 255, np.uint8)
  for k in range(bins):
    gap = 1 if edges[k + 1] - edges[k] > 2 else 0      # white between wide bars
    plot_hwc[PLOT_HEIGHT - heights[k]:, edges[k]:edges[k + 1] - gap] = BAR_RGB
  if len(values):
    mean_x = int(np.clip((np.mean(values) - lo) / (hi - lo) * PLOT_WIDTH, 0, PLOT_WIDTH - 1))
    plot_hwc[:, mean_x] = MEAN_RGB
  canvas = np.full((HISTOGRAM_SIZE[1], HISTOGRAM_SIZE[0], 3), 255, np.uint8)
  canvas[BAND:BAND + PLOT_HEIGHT, MARGIN:MARGIN + PLOT_WIDTH] = plot_hwc
  image = Image.fromarray(canvas)
  draw = ImageDraw.Draw(image)
  draw.text((MARGIN, 3), title, fill=TEXT_RGB)
  axis_y = BAND + PLOT_HEIGHT + 3
  draw.text((MARGIN, axis_y), f"{lo:g}", fill=TEXT_RGB)
  right = f"{hi:.3g}"
  draw.text((MARGIN + PLOT_WIDTH - draw.textlength(right), axis_y), right, fill=TEXT_RGB)
  return np.asarray(image)


def write_histograms(values, bins, out_dir, split):
  """`<out_dir>/<split>_<side>_<quantity>.png` for the histogrammed quantities; {key: path}."""
  paths = {}
  for side in SIDES:
    for q in HISTOGRAMS:
      v = values[side][q]
      lo, hi = value_range(q, v)
      title = f"{side} skip {q}  (n = {len(v)}, mean = {np.mean(v):.4f})"
      path = os.path.join(out_dir, f"{split}_{side}_{q}.png")
      paths[f"{side}_{q}_histogram"] = image_io.save_png(
          histogram_image(v, bins, lo, hi, title), path)
  return paths


# ---- the evaluator -----------------------------------------------------------------------


def check_has_skips(context):
  """Raises ValueError unless the task's model has the vertical skips (stage 3)."""
  model_config = getattr(getattr(context.task, "model", None), "config", None)
  if not getattr(model_config, "skips", False):
    raise ValueError(
        f"skip_analysis measures the vertical skips W_v, W_t, which only the stage-3 Pretzel "
        f"has; this model has none (config.task={context.config.get('task')!r}, "
        f"config.stage={context.config.get('stage')!r})")


def evaluate(context, split=None, num_examples=None, batch_size=None, bins=50,
             noise_level=None):
  """Contribution ratios and cosines of both skips (module docstring) over held-out records.

  Args:
    context: the `EvalContext`; its task must be a stage-3 Pretzel (else ValueError).
    split: records split (default `config.data.test_split`).
    num_examples: examples read from its start (default `config.eval.num_examples`).
    batch_size: examples per forward pass (default `config.eval.batch_size`).
    bins: histogram bins.
    noise_level: the noise level t of the pass (default `config.eval.noise_level`).

  Returns:
    `{visual,text}_{ratio,cosine,cosine_fused}_mean` (means over positions), the position
    counts `{visual,text}_positions`, `num_examples` read, and the paths of the histogram PNGs
    `{visual,text}_{ratio,cosine}_histogram` under `context.output_dir()` (the entry's directory).
  """
  check_has_skips(context)
  cfg = context.config
  split = split or cfg.data.test_split
  noise_level = float(cfg.eval.noise_level if noise_level is None else noise_level)
  values, num_read = collect(context, split, int(num_examples or cfg.eval.num_examples),
                             int(batch_size or cfg.eval.batch_size), noise_level)
  for side in SIDES:
    if not len(values[side]["ratio"]):
      raise ValueError(f"skip_analysis: the first {num_read} examples of split {split!r} have "
                       f"no {side} positions to measure")
  result = dict(split=split, num_examples=num_read, noise_level=noise_level)
  for side in SIDES:
    result[f"{side}_positions"] = len(values[side]["ratio"])
    result.update({f"{side}_{q}_mean": float(np.mean(values[side][q])) for q in QUANTITIES})
  result.update(write_histograms(values, bins, context.output_dir(context.name or NAME), split))
  return result
