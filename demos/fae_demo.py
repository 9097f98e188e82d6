"""STARFlow2 on FAE latents against the patch latent, on Fashion-MNIST, on a laptop CPU.

No pretrained DINOv2 can be downloaded here, so the demo builds its own frozen feature space
first (docs/fae.md), then trains STARFlow2 on both latent spaces with the same steps and
compares them:

  records     the `fashion_mnist_stages` records (what the staged demo uses)
  stage0      the tiny VLM's text pre-training (shared by both latent spaces)
  dinov2      a DINOv2-architecture encoder: class head on [CLS] + patch-pixel head
  fae         the FAE's VAE on its features (+ pixel decoder on noisy features)
  fae_pixels  the pixel decoder fine-tuned on the feature decoder's reconstructions
  latents     `precompute-latents` of the generation and understanding records
  stage1/2    caption -> image, then image -> answer, once per latent space (same steps)

Judged on held-out images: generation accuracy (the independent pixel classifier on images
drawn from each class's caption), understanding accuracy, bits/dim (pixel bits/dim for the
patch latent; bits per latent dimension for the FAE, not comparable), and for the FAE its
feature reconstruction cosine, pixel PSNR and the latent's per-channel mean and std.
Everything lands in `<workdir>/summary.json`, with pictures beside it.
"""

import json
import logging
import os
import shutil
import time

import jax
import numpy as np
from absl import flags

from demos import fashion_mnist
from demos import staged_demo
from experiments import fashion_mnist_fae as experiment
from starflow2_jax import cli
from starflow2_jax import image_io
from starflow2_jax.latents import precompute
from starflow2_jax.training import fae_task
from starflow2_jax.training import frozen
from starflow2_jax.training import trainer

LATENT_SPLITS = ("generate_train", "generate_test", "understand_train", "understand_test")
LATENTS = ("fae", "patch")

# What `starflow2 fae-demo` must reach (checked into summary.json beside each figure).
FLOORS = (
    ("fae_feature_cosine", ">=", 0.9),
    ("fae_latent_abs_mean_max", "<=", 0.1),
    ("fae_latent_std_deviation_max", "<=", 0.2),
    ("total_seconds", "<=", 20 * 60),
)


def _config(preset, data_dir, **fields):
  config = experiment.get_config(preset)
  config.data.dir = data_dir
  return staged_demo.override(config, fields)


def latent_statistics(latent, images, batch=250):
  """Per-channel mean and std of the latents of `images` (all elements of all images)."""
  encode = jax.jit(latent.encode)
  x = np.concatenate([np.asarray(encode(images[i:i + batch]))
                      for i in range(0, len(images), batch)])
  flat = x.reshape(-1, x.shape[-1])
  return flat.mean(0), flat.std(0)


def _train(config, workdir, seconds, name):
  start = time.time()
  result = trainer.train(config, workdir)
  seconds[name] = time.time() - start
  return result


def run(workdir, source_dir=fashion_mnist.DEFAULT_SOURCE_DIR, size="", judge_per_class=30,
        understanding_examples=500, test_examples=1000):
  """Runs every step (resuming finished runs from their checkpoints); returns the summary."""
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  suffix = f"-{size}" if size else ""
  data_dir = os.path.join(workdir, "data")
  latents_dir = os.path.join(workdir, "latents")
  path = lambda name: os.path.join(workdir, name)
  seconds, summary = {}, {}
  staged_demo.prepare_records(_config(f"stage0{suffix}", data_dir,
                                      **{"data.source_dir": source_dir}))
  _train(_config(f"stage0{suffix}", data_dir), path("stage0"), seconds, "stage0")

  # ---- the feature space and the FAE ---------------------------------------------------
  dinov2 = _train(_config(f"dinov2{suffix}", data_dir), path("dinov2"), seconds, "dinov2")
  summary["dinov2_test_accuracy"] = dinov2.summary["eval"].get("accuracy")
  _train(_config(f"fae{suffix}", data_dir, **{"fae.dinov2": path("dinov2")}), path("fae"),
         seconds, "fae")
  pixels = _train(_config(f"fae_pixels{suffix}", data_dir, **{
      "fae.dinov2": path("dinov2"), "init.from_workdir": path("fae")}), path("fae_pixels"),
      seconds, "fae_pixels")
  fae_eval = pixels.summary["eval"]
  summary.update(fae_feature_cosine=fae_eval["feature_cosine"], fae_psnr=fae_eval["psnr"],
                 fae_feature_relative_error=fae_eval["feature_relative_error"])

  test_images, test_labels = fashion_mnist.load_idx_split(source_dir, "test")
  test_images = test_images[:test_examples, :, :, None]
  summary.update({f"fae_raw_{k}": fae_eval[k] for k in (
      "latent_abs_mean_max", "latent_std_min", "latent_std_max")})   # before standardising
  latent = frozen.load_fae_latent(path("fae_pixels"))
  mean, std = latent_statistics(latent, test_images)
  summary.update(fae_latent_channel_mean=mean.tolist(), fae_latent_channel_std=std.tolist(),
                 fae_latent_abs_mean_max=float(np.max(np.abs(mean))),
                 fae_latent_std_deviation_max=float(np.max(np.abs(std - 1.0))))
  originals = test_images[:20]
  recon = fae_task.reconstructions(latent, originals)
  image_io.save_png(image_io.image_grid(np.stack([originals[:10], recon[:10], originals[10:],
                                                  recon[10:]])),
                    path("fae_reconstructions.png"))

  start_latents = time.time()
  for split in LATENT_SPLITS:
    precompute.precompute_split(latent, data_dir, latents_dir, split)
  seconds["precompute_latents"] = time.time() - start_latents

  # ---- STARFlow2 on each latent space (judged by the stages' evaluators) -----------------
  for name in LATENTS:
    previous = path("stage0")
    for stage in (1, 2):
      config = _config(f"stage{stage}{suffix}", data_dir, **{"init.from_workdir": previous})
      staged_demo.judge_sizes(config, judge_per_class, understanding_examples,
                              config.eval.num_examples)
      if stage == 1:
        config.evals.generation.grid_columns = 12
      if name == "patch":      # the staged demo's own latent (experiments/fashion_mnist_stages)
        config.latent = dict(name="patch", patch_size=4)
      else:                    # the FAE, read from the precomputed records
        config.latent.fae_workdir = path("fae_pixels")
        config.data.update(dict(dir=latents_dir, precomputed_latents=True))
      stage_dir = path(f"{name}_stage{stage}")
      result = _train(config, stage_dir, seconds, f"{name}_stage{stage}")
      previous = stage_dir
      evals = result.summary["evals"]
      if stage == 1:
        bpd_key = "pixel_bpd" if name == "patch" else "latent_bpd"
        summary[f"{name}_test_{bpd_key}"] = evals["bpd"].get(bpd_key)
        summary[f"{name}_generation_accuracy"] = evals["generation"]["accuracy"]
        summary["classifier_test_accuracy"] = evals["generation"]["classifier_test_accuracy"]
        shutil.copy(evals["generation"]["grid"], path(f"{name}_generated.png"))
      else:
        summary[f"{name}_understanding_accuracy"] = evals["understanding"]["accuracy"]

  summary.update(seconds=seconds, total_seconds=time.time() - start)
  summary["floors"] = staged_demo.check_floors(summary, FLOORS if not size else ())
  summary["floors_met"] = all(c["met"] for c in summary["floors"])
  if jax.process_index() == 0:
    with open(path("summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary


def format_summary(s):
  pct = lambda key: f"{s[key]:.1%}" if s.get(key) is not None else "—"
  num = lambda key: f"{s[key]:.3f}" if s.get(key) is not None else "—"
  lines = [
      "                           FAE latent      patch latent",
      f"generation accuracy      {pct('fae_generation_accuracy'):>11}   "
      f"{pct('patch_generation_accuracy'):>13}",
      f"understanding accuracy   {pct('fae_understanding_accuracy'):>11}   "
      f"{pct('patch_understanding_accuracy'):>13}",
      f"test bits/dim            {num('fae_test_latent_bpd'):>11}   "
      f"{num('patch_test_pixel_bpd'):>13}   (per latent dim / per pixel)",
      f"stage-1 seconds          {s['seconds'].get('fae_stage1', 0):11.0f}   "
      f"{s['seconds'].get('patch_stage1', 0):13.0f}",
      f"FAE: feature cosine {num('fae_feature_cosine')}, PSNR {num('fae_psnr')} dB, "
      f"latent |mean| ≤ {num('fae_latent_abs_mean_max')}, |std − 1| ≤ "
      f"{num('fae_latent_std_deviation_max')}",
      f"DINOv2 test accuracy {pct('dinov2_test_accuracy')}; judge on real test "
      f"{pct('classifier_test_accuracy')}",
      "seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in s["seconds"].items()),
      f"total seconds {s['total_seconds']:.0f}",
  ]
  if s.get("floors"):
    lines.append(staged_demo.format_floors(s["floors"]))
  return "\n".join(lines)


def _define_flags(fv, argv):
  cli.define_workdir(fv, "runs/fae_demo", "Where every run, the records, the latents and the "
                     "summary go (finished runs are not retrained).")
  flags.DEFINE_string("source_dir", fashion_mnist.DEFAULT_SOURCE_DIR,
                      "The Fashion-MNIST idx files.", flag_values=fv)


def _run_command(fv):
  summary = run(fv.workdir, fv.source_dir)
  print(format_summary(summary))
  print(f"pictures, TensorBoard logs and summary.json are in {fv.workdir}/")


COMMAND = cli.Command(
    "STARFlow2 on FAE latents vs the patch latent on Fashion-MNIST, same steps (~19 min)",
    "starflow2 fae-demo --workdir runs/fae_demo", _define_flags, _run_command)
