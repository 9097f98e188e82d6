"""The whole STARFlow2 pipeline on Fashion-MNIST: stages 0-3 in turn, each judged.

Stage k trains in `<workdir>/stage{k}` from `experiments/fashion_mnist_stages.py:stage{k}`,
warm-started from stage k−1; all stages share the records in `<workdir>/data`. After the
stages that change them, on held-out test images:

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
import time

import jax
import numpy as np
from absl import flags
from PIL import Image, ImageDraw

from data_pipelines import sources
from data_pipelines import text as text_lib
from demos import classifier
from demos import fashion_mnist
from demos import fashion_mnist_stages as stage_records
from experiments import fashion_mnist_stages as experiment
from starflow2_jax import cli
from starflow2_jax import image_io
from starflow2_jax import sharding
from starflow2_jax.sampling import prompts
from starflow2_jax.training import data as data_lib
from starflow2_jax.training import trainer

GENERATION_SEED = 101
INTERLEAVED_PROMPTS = (["a sneaker:"], ["a bag:"], ["a dress:", prompts.DRAW],
                       ["a photo of a trouser. and a photo of a sandal:"])


def stage_config(stage, size, data_dir, previous_workdir, overrides=None):
  config = experiment.get_config(f"stage{stage}" + (f"-{size}" if size else ""))
  config.data.dir = data_dir
  config.init.from_workdir = previous_workdir or ""
  for key, value in (overrides or {}).items():
    section, field = key.split(".", 1)
    config[section][field] = value
  return config


def prepare_records(config):
  """Every stage's records, written once by the `fashion_mnist_stages` source (what
  `starflow2 prepare-data --source fashion_mnist_stages` runs)."""
  splits = [f"{kind}_{split}" for kind in stage_records.KINDS for split in fashion_mnist.SPLITS]
  sources.prepare_from_config(config.data, skip_if_present=splits)


def held_out_bpd(task, params, config, data_dir, num_examples):
  """Pixel bits/dim of caption-conditioned test images (the generation records' test split)."""
  config = config.copy_and_resolve_references()
  config.data.test_split = "generate_test"
  config.eval.num_examples = num_examples
  mesh, rules = sharding.mesh_and_rules(config.mesh)
  with jax.set_mesh(mesh):
    metrics = trainer.evaluate(jax.jit(task.eval_metrics), params,
                               data_lib.eval_batches(config, task, data_dir), mesh, rules,
                               config.seed)
  return metrics["pixel_bpd"]


def generation_accuracy(task, params, judge, per_class, rng):
  captions = [stage_records.caption(k) for k in range(10) for _ in range(per_class)]
  labels = np.repeat(np.arange(10), per_class)
  images = task.sample_captions(params, captions, rng, task.config.sample.guidance_weight)
  return judge.accuracy(images, labels), images


def named_class(answer):
  """The class whose name the answer's words contain (longest name first), or None."""
  words = " " + " ".join(text_lib.split_words(answer)) + " "
  names = sorted(range(10), key=lambda k: -len(fashion_mnist.CLASS_NAMES[k]))
  for k in names:
    if f" {' '.join(text_lib.split_words(fashion_mnist.CLASS_NAMES[k]))} " in words:
      return k
  return None


def understanding_accuracy(task, params, images, labels, rng, batch=100):
  answers = []
  for i in range(0, len(images), batch):
    answers += prompts.answer(task, params, images[i:i + batch], stage_records.QUESTION,
                              jax.random.fold_in(rng, i))
  correct = [named_class(a) == int(label) for a, label in zip(answers, labels)]
  return float(np.mean(correct)), answers


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


def run(workdir, size="", overrides=None, judge_per_class=30, understanding_examples=500,
        bpd_examples=1000, judge_examples=20000):
  """Runs stages 0-3 (resuming finished ones from their checkpoints); returns the summary."""
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  data_dir = os.path.join(workdir, "data")
  summary, previous, seconds = {}, None, {}
  results = {}
  prepare_records(stage_config(0, size, data_dir, None, overrides))
  for stage in range(4):
    config = stage_config(stage, size, data_dir, previous, overrides)
    stage_dir = os.path.join(workdir, f"stage{stage}")
    stage_start = time.time()
    results[stage] = trainer.train(config, stage_dir)
    seconds[f"stage{stage}"] = time.time() - stage_start
    previous = stage_dir

    params, task = results[stage].state.params, results[stage].task
    rng = jax.random.key(100 + stage)
    if stage == 1:
      logging.info("fitting the independent classifier on the real training split")
      train_images, train_labels = fashion_mnist.load_idx_split(config.data.source_dir, "train")
      test_images, test_labels = fashion_mnist.load_idx_split(config.data.source_dir, "test")
      judge = classifier.fit_logistic_regression(train_images[:judge_examples],
                                                 train_labels[:judge_examples], 10)
      summary["classifier_test_accuracy"] = judge.accuracy(test_images, test_labels)
    if stage in (1, 3):
      logging.info("stage %d: held-out bpd and generation accuracy", stage)
      summary[f"test_bpd_stage{stage}"] = held_out_bpd(task, params, config, data_dir,
                                                       bpd_examples)
      # The same draws after stages 1 and 3 (paired samples): their difference is the model's.
      accuracy, images = generation_accuracy(task, params, judge, judge_per_class,
                                             jax.random.key(GENERATION_SEED))
      summary[f"generation_accuracy_stage{stage}"] = accuracy
      grid = images.reshape((10, judge_per_class) + images.shape[1:])
      image_io.save_png(image_io.image_grid(grid), os.path.join(workdir, f"generated_stage{stage}.png"))
    if stage in (2, 3):
      logging.info("stage %d: understanding accuracy", stage)
      n = understanding_examples
      accuracy, answers = understanding_accuracy(task, params, test_images[:n, :, :, None],
                                                 test_labels[:n], rng)
      summary[f"understanding_accuracy_stage{stage}"] = accuracy
      summary[f"example_answers_stage{stage}"] = [
          dict(label=fashion_mnist.CLASS_NAMES[int(label)], answer=a)
          for label, a in zip(test_labels[:5], answers[:5])]

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
