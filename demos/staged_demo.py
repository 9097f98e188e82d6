"""The whole STARFlow2 pipeline on Fashion-MNIST: stages 0-3 in turn, each judged.

Stage k trains in `<workdir>/stage{k}` from `experiments/fashion_mnist_stages.py:stage{k}`,
warm-started from stage k−1; all stages share the records in `<workdir>/data`. After the
stages that change them, on held-out test images — each figure an evaluator that the
stage's config names and the trainer runs after its last step (`config.evals`;
demos/fashion_mnist_judges.py):

  bpd            the test images' bits/dim given their captions     (after stages 1 and 3)
  generation     an independent pixel classifier's accuracy on images drawn from each
                 class's caption, with classifier-free guidance      (after stages 1 and 3)
  understanding  greedy answers to "what is in this picture?" that name the right class
                                                                     (after stages 2 and 3)

Then an interleaved sample from the final model (`interleaved/index.html` and a PNG), and
everything in `<workdir>/summary.json`, where `floors` puts each figure beside the floor the
experiment promises (`experiments/fashion_mnist_stages.py:FLOORS`) and `floors_met` says
whether all were reached; a missed floor is printed and logged as MISSED.
"""

import json
import logging
import os
import shutil
import time

import jax
import numpy as np
from absl import flags
from PIL import Image, ImageDraw

from data_pipelines import sources
from demos import fashion_mnist
from demos import fashion_mnist_stages as stage_records
from experiments import fashion_mnist_stages as experiment
from starflow2_jax import cli
from starflow2_jax import image_io
from starflow2_jax.sampling import prompts
from starflow2_jax.training import trainer

INTERLEAVED_PROMPTS = (["a sneaker:"], ["a bag:"], ["a dress:", prompts.DRAW],
                       ["a photo of a trouser. and a photo of a sandal:"])


def stage_config(stage, size, data_dir, previous_workdir, overrides=None):
  config = experiment.get_config(f"stage{stage}" + (f"-{size}" if size else ""))
  config.data.dir = data_dir
  config.init.from_workdir = previous_workdir or ""
  return override(config, overrides)


def override(config, overrides=None):
  """`config` with each dotted field of `overrides` set, e.g. {"evals.generation.seed": 7};
  a field missing from the config is an error naming it."""
  for key, value in (overrides or {}).items():
    *path, field = key.split(".")
    node = config
    for part in path:
      node = node[part]
    if field not in node:
      raise KeyError(f"config has no field {key!r}")
    node[field] = value
  return config


def prepare_records(config):
  """Every stage's records, written once by the `fashion_mnist_stages` source (what
  `starflow2 prepare-data --source fashion_mnist_stages` runs)."""
  splits = [f"{kind}_{split}" for kind in stage_records.KINDS for split in fashion_mnist.SPLITS]
  sources.prepare_from_config(config.data, skip_if_present=splits)


def judge_sizes(config, judge_per_class, understanding_examples, bpd_examples):
  """The demo's sample sizes written into a stage config's evaluators (those it has)."""
  evals = config.evals
  if "generation" in evals:
    evals.generation.per_class = judge_per_class
  if "understanding" in evals:
    evals.understanding.num_examples = understanding_examples
  config.eval.num_examples = bpd_examples
  return config


def render_png(results, path, scale=3):
  """The prompt and generation of each result as one strip of text and images."""
  h = w = 28 * scale
  rows = []
  for result in results:
    items = result.prompt + result.generated
    canvas = Image.new("RGB", (1200, h + 8), "white")
    draw = ImageDraw.Draw(canvas)
    x = 4
    for k, item in enumerate(items):
      generated = k >= len(result.prompt)
      if isinstance(item, str):
        label = "[draw]" if item == prompts.DRAW else item
        draw.text((x, h // 2 - 6), label, fill=(0, 110, 0) if generated else (0, 0, 0))
        x += int(draw.textlength(label)) + 8
      else:
        image = Image.fromarray(np.asarray(item).squeeze(-1)).resize((w, h), Image.NEAREST)
        canvas.paste(image.convert("RGB"), (x, 4))
        if generated:
          draw.rectangle((x - 1, 3, x + w, h + 4), outline=(0, 160, 0))
        x += w + 8
    rows.append(np.asarray(canvas.crop((0, 0, min(max(x, 200), 1200), h + 8))))
  width = max(r.shape[1] for r in rows)
  stacked = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)),
                                   constant_values=255) for r in rows])
  return image_io.save_png(stacked, path)


def stage_figures(stage, evals, workdir):
  """The demo's figures from a stage's evaluator results (config.evals of
  experiments/fashion_mnist_stages.py); the generated grid copied to the workdir."""
  figures = {}
  bpd = evals.get("bpd_generate", evals["bpd"])        # the caption-conditioned test images
  if "generation" in evals:
    figures[f"test_bpd_stage{stage}"] = bpd["pixel_bpd"]
    figures[f"generation_accuracy_stage{stage}"] = evals["generation"]["accuracy"]
    figures["classifier_test_accuracy"] = evals["generation"]["classifier_test_accuracy"]
    shutil.copy(evals["generation"]["grid"], os.path.join(workdir, f"generated_stage{stage}.png"))
  if "understanding" in evals:
    figures[f"understanding_accuracy_stage{stage}"] = evals["understanding"]["accuracy"]
    figures[f"example_answers_stage{stage}"] = evals["understanding"]["example_answers"]
  return figures


def run(workdir, size="", overrides=None, judge_per_class=30, understanding_examples=500,
        bpd_examples=1000):
  """Runs stages 0-3 (resuming finished ones from their checkpoints); returns the summary."""
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  data_dir = os.path.join(workdir, "data")
  summary, previous, seconds = {}, None, {}
  results = {}
  prepare_records(stage_config(0, size, data_dir, None, overrides))
  for stage in range(4):
    config = judge_sizes(stage_config(stage, size, data_dir, previous, overrides),
                         judge_per_class, understanding_examples, bpd_examples)
    stage_dir = os.path.join(workdir, f"stage{stage}")
    stage_start = time.time()
    results[stage] = trainer.train(config, stage_dir)   # its evaluators run after training
    seconds[f"stage{stage}"] = time.time() - stage_start
    previous = stage_dir
    summary.update(stage_figures(stage, results[stage].summary["evals"], workdir))

  logging.info("interleaved samples from the stage-3 model")
  task, params = results[3].task, results[3].state.params
  interleaved = prompts.generator_for(task, max_new=task.layout.max_length).generate(
      params, [list(p) for p in INTERLEAVED_PROMPTS], jax.random.key(7))
  page = prompts.write_html(interleaved, os.path.join(workdir, "interleaved"),
                            "STARFlow2 demo: interleaved samples")
  picture = render_png(interleaved, os.path.join(workdir, "interleaved.png"))

  summary.update(
      stage_seconds=seconds, total_seconds=time.time() - start,
      interleaved_page=os.path.relpath(page, workdir),
      interleaved_png=os.path.relpath(picture, workdir),
      stage_summaries={k: r.summary for k, r in results.items()})
  summary["floors"] = check_floors(summary, experiment.FLOORS[size])
  summary["floors_met"] = all(c["met"] for c in summary["floors"])
  for line in format_floors(summary["floors"]).splitlines():
    (logging.info if summary["floors_met"] else logging.warning)(line)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary


def check_floors(summary, floors):
  """Each floor (figure, "<=" | ">=", bound) beside the figure it judges; a bound is a number
  or (another figure, offset). A missing figure misses its floor."""
  checks = []
  for figure, comparison, bound in floors:
    if isinstance(bound, tuple):
      other, offset = bound
      limit = summary[other] + offset if other in summary else None
      floor = f"{comparison} {other}" + (f" {offset:+g}" if offset else "")
    else:
      limit, floor = bound, f"{comparison} {bound:g}"
    value = summary.get(figure)
    met = value is not None and limit is not None and (
        value >= limit if comparison == ">=" else value <= limit)
    checks.append(dict(figure=figure, value=value, floor=floor, limit=limit, met=bool(met)))
  return checks


def format_floors(checks):
  lines = []
  for c in checks:
    value = "missing" if c["value"] is None else f"{c['value']:.4g}"
    limit = "" if c["limit"] is None else f" (= {c['limit']:.4g})"
    lines.append(f"  {'met   ' if c['met'] else 'MISSED'}  {c['figure']} = {value}, "
                 f"floor {c['floor']}{limit}")
  missed = sum(not c["met"] for c in checks)
  head = (f"floors: all {len(checks)} met" if not missed else
          f"floors: {missed} of {len(checks)} MISSED — this run does not reach what the demo "
          "promises")
  return "\n".join([head] + lines)


def format_summary(s):
  pct = lambda key: f"{s[key]:.1%}" if key in s else "—"
  lines = [
      "                          after stage 1   after stage 2   after stage 3",
      f"test bits/dim (pixels)    {s.get('test_bpd_stage1', float('nan')):13.3f}"
      f"   {'':13}   {s.get('test_bpd_stage3', float('nan')):13.3f}",
      f"generation accuracy       {pct('generation_accuracy_stage1'):>13}   {'':13}   "
      f"{pct('generation_accuracy_stage3'):>13}",
      f"understanding accuracy    {'':13}   {pct('understanding_accuracy_stage2'):>13}   "
      f"{pct('understanding_accuracy_stage3'):>13}",
      f"classifier on real test   {pct('classifier_test_accuracy')}",
      "stage seconds             " + ", ".join(f"{k} {v:.0f}" for k, v in
                                              s["stage_seconds"].items()),
      f"total seconds             {s['total_seconds']:.0f}",
  ]
  if "floors" in s:
    lines.append(format_floors(s["floors"]))
  return "\n".join(lines)


def _define_flags(fv, argv):
  cli.define_workdir(fv, "runs/demo", "Where each stage's workdir, the records and the "
                     "summary go (finished stages are not retrained).")
  flags.DEFINE_string("source_dir", fashion_mnist.DEFAULT_SOURCE_DIR,
                      "The Fashion-MNIST idx files.", flag_values=fv)


def _run_command(fv):
  summary = run(fv.workdir, overrides={"data.source_dir": fv.source_dir})
  print(format_summary(summary))
  print(f"samples, TensorBoard logs and summary.json are in {fv.workdir}/")


COMMAND = cli.Command(
    "the embedded default: STARFlow2's stages 0-3 on Fashion-MNIST, each judged (~18 min)",
    "starflow2 demo --workdir runs/demo", _define_flags, _run_command)
