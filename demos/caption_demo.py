"""The embedded default: train the caption-conditioned flow on Fashion-MNIST, then judge it.

Trains (or resumes) in `workdir`, samples one row per class with and without guidance, and
asks an independent pixel classifier, trained on the real training split, to recognise the
guided samples. Everything lands in `<workdir>/summary.json`.
"""

import json
import logging
import os
import time

import jax
import numpy as np

from data_pipelines import sources
from demos import classifier
from demos import fashion_mnist
from starflow2_jax import cli
from starflow2_jax import image_io
from starflow2_jax.training import trainer


def prepare_records(config, workdir):
  """`config` with `data.dir` set (default `<workdir>/data`), its records written once by the
  `fashion_mnist` source (what `starflow2 prepare-data --source fashion_mnist` runs)."""
  config = config.copy_and_resolve_references()
  config.data.dir = config.data.dir or os.path.join(workdir, "data")
  sources.prepare_from_config(config.data, skip_if_present=tuple(fashion_mnist.SPLITS))
  return config


def run(config, workdir):
  """Runs the demo; returns the summary dict (also written to `<workdir>/summary.json`)."""
  start = time.time()
  config = prepare_records(config, workdir)
  result = trainer.train(config, workdir)
  train_seconds = time.time() - start

  logging.info("fitting the independent classifier on the real training split")
  train_images, train_labels = fashion_mnist.load_idx_split(config.data.source_dir, "train")
  test_images, test_labels = fashion_mnist.load_idx_split(config.data.source_dir, "test")
  judge = classifier.fit_logistic_regression(train_images, train_labels,
                                             len(fashion_mnist.CLASS_NAMES))

  params, task = result.state.params, result.task
  grid_rng, judge_rng_plain, judge_rng_guided = jax.random.split(jax.random.key(config.seed + 3), 3)
  grid, *_ = task.sample_grid(params, grid_rng)
  grid_path = image_io.save_png(grid, os.path.join(workdir, "demo_samples.png"))

  per_class = config.demo.judge_per_class
  logging.info("sampling %d images per class, with and without guidance, for the judge", per_class)
  captions = [c for c in config.sample.captions for _ in range(per_class)]
  labels = np.repeat(np.arange(len(config.sample.captions)), per_class)
  plain = task.sample_captions(params, captions, judge_rng_plain)
  guided = task.sample_captions(params, captions, judge_rng_guided, config.sample.guidance_weight)

  summary = dict(
      result.summary,
      classifier_test_accuracy=judge.accuracy(test_images, test_labels),
      guided_sample_accuracy=judge.accuracy(guided, labels),
      unguided_sample_accuracy=judge.accuracy(plain, labels),
      guidance_weight=config.sample.guidance_weight,
      judged_samples_per_class=per_class,
      temperature=config.sample.temperature,
      sample_grid=os.path.basename(grid_path),
      train_seconds=train_seconds,
      total_seconds=time.time() - start)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary


def format_summary(summary):
  lines = [
      f"steps trained                      {summary['step']}",
      f"test bits/dim (pixels, 8-bit)      {summary['test_bpd']:.3f}",
      f"guided-sample accuracy             {summary['guided_sample_accuracy']:.1%}"
      f"  (w = {summary['guidance_weight']}, τ = {summary['temperature']}, "
      f"{summary['judged_samples_per_class']} per class)",
      f"unguided-sample accuracy           {summary['unguided_sample_accuracy']:.1%}",
      f"classifier accuracy on real test   {summary['classifier_test_accuracy']:.1%}",
      f"training time / total time         {summary['train_seconds']:.0f} s / "
      f"{summary['total_seconds']:.0f} s",
  ]
  return "\n".join(lines)


def _define_flags(fv, argv):
  cli.define_config(fv, argv)
  cli.define_workdir(fv, "runs/caption_demo")


def _run_command(fv):
  summary = run(fv.config, fv.workdir)
  print(format_summary(summary))
  print(f"samples, TensorBoard logs and summary.json are in {fv.workdir}/")


COMMAND = cli.Command(
    "the caption-to-image flow alone on Fashion-MNIST (~10 min), judged",
    "starflow2 caption-demo --workdir runs/caption_demo [--config.train.steps=300]",
    _define_flags, _run_command)
