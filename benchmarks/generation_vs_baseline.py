"""STARFlow2's stage 1 against the caption-to-image flow alone, at equal training steps.

    PYTHONPATH=. .venv/bin/python benchmarks/generation_vs_baseline.py --steps 800 \
        --workdir runs/compare

Both models have the same flow sizes (deep 4 × 128, two shallow blocks 2 × 64), latent (4×4
patches), batch (32), optimiser and sampling settings (guidance w = 2, τ = 0.8, 4 denoising
steps); the baseline reads its caption through an embedding, STARFlow2 through the frozen
VLM of the demo's stage 0 (trained first, with its own steps). Both are trained for `--steps`
steps and judged by one independent pixel classifier on the same number of guided samples
per class, on the real Fashion-MNIST (`scripts/setup.sh` installs it). Prints one row each.
"""

import json
import os
import time

from absl import app
from absl import flags
import jax
import numpy as np

from demos import caption_demo
from demos import classifier
from demos import fashion_mnist
from demos import fashion_mnist_judges as judges
from demos import staged_demo
from experiments import fashion_mnist as baseline_experiment
from starflow2_jax.training import trainer

_STEPS = flags.DEFINE_integer("steps", 800, "training steps of each model (batch 32)")
_WORKDIR = flags.DEFINE_string("workdir", "runs/compare", "where both runs are kept")
_PER_CLASS = flags.DEFINE_integer("per_class", 30, "guided samples per class to judge")
_JUDGE_EXAMPLES = flags.DEFINE_integer("judge_examples", 20000,
                                       "real training images the judge is fitted on")


def judge_and_labels(source_dir, per_class):
  images, labels = fashion_mnist.load_idx_split(source_dir, "train")
  judge = classifier.fit_logistic_regression(images[:_JUDGE_EXAMPLES.value],
                                             labels[:_JUDGE_EXAMPLES.value], 10)
  return judge, np.repeat(np.arange(10), per_class)


def run_baseline(workdir, steps, judge, labels, per_class):
  config = caption_demo.prepare_records(baseline_experiment.get_config(), workdir)
  config.train.update(steps=steps, time_limit_minutes=0.0, eval_every=0)
  start = time.time()
  result = trainer.train(config, workdir)
  seconds = time.time() - start
  captions = [c for c in config.sample.captions for _ in range(per_class)]
  images = result.task.sample_captions(result.state.params, captions,
                                       jax.random.key(judges.GENERATION_SEED),
                                       config.sample.guidance_weight)
  return dict(steps=result.summary["step"], test_bpd=result.summary["test_bpd"],
              generation_accuracy=judge.accuracy(images, labels), train_seconds=seconds)


def run_starflow2(workdir, steps, judge, per_class):
  data_dir = os.path.join(workdir, "data")
  stage0_dir = os.path.join(workdir, "stage0")
  staged_demo.prepare_records(staged_demo.stage_config(0, "", data_dir, None))
  trainer.train(staged_demo.stage_config(0, "", data_dir, None), stage0_dir)
  config = staged_demo.stage_config(1, "", data_dir, stage0_dir,
                                    {"train.steps": steps, "eval.num_examples": 2000})
  config.evals = {"bpd": {}}     # bits/dim after training, like the baseline; judged below
  start = time.time()
  result = trainer.train(config, os.path.join(workdir, "stage1"))
  seconds = time.time() - start
  params, task = result.state.params, result.task
  accuracy, _ = judges.generation_accuracy(task, params, judge, per_class,
                                           jax.random.key(judges.GENERATION_SEED))
  return dict(steps=result.summary["step"], test_bpd=result.summary["test_bpd"],
              generation_accuracy=accuracy, train_seconds=seconds)


def main(argv):
  del argv
  steps, per_class, workdir = _STEPS.value, _PER_CLASS.value, _WORKDIR.value
  source_dir = baseline_experiment.get_config().data.source_dir
  judge, labels = judge_and_labels(source_dir, per_class)
  rows = {
      "caption baseline (no VLM)": run_baseline(os.path.join(workdir, "baseline"), steps,
                                                judge, labels, per_class),
      "STARFlow2 stage 1 (frozen VLM)": run_starflow2(os.path.join(workdir, "starflow2"), steps,
                                                       judge, per_class),
  }
  print(f"\nguided generation at {steps} steps (w = 2, τ = 0.8, {per_class} per class judged)")
  print(f"{'model':<34} {'steps':>6} {'test bpd':>9} {'accuracy':>9} {'train s':>8}")
  for name, r in rows.items():
    print(f"{name:<34} {r['steps']:>6} {r['test_bpd']:>9.3f} {r['generation_accuracy']:>9.1%} "
          f"{r['train_seconds']:>8.0f}")
  with open(os.path.join(workdir, "comparison.json"), "w") as f:
    json.dump(dict(steps=steps, per_class=per_class, rows=rows), f, indent=2)


if __name__ == "__main__":
  app.run(main)
