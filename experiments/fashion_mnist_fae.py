"""STARFlow2 on FAE latents (SPEC §5) on Fashion-MNIST: the FAE demo's runs.

    starflow2 train --config experiments/fashion_mnist_fae.py:dinov2 --workdir runs/f/dinov2
    starflow2 train --config experiments/fashion_mnist_fae.py:fae --workdir runs/f/fae \\
        --config.fae.dinov2=runs/f/dinov2
    starflow2 train --config experiments/fashion_mnist_fae.py:fae_pixels --workdir runs/f/pix \\
        --config.fae.dinov2=runs/f/dinov2 --config.init.from_workdir=runs/f/fae
    starflow2 train --config experiments/fashion_mnist_fae.py:stage1 --workdir runs/f/s1 \\
        --config.latent.fae_workdir=runs/f/pix --config.init.from_workdir=runs/demo/stage0

Presets (add `-tiny` for seconds-long test runs):
  dinov2      a DINOv2-architecture encoder trained from scratch (no weights can be
              downloaded here): class head on [CLS] + patch-pixel head (models/dinov2/pretrain.py)
  fae         the FAE's autoencode phase (VAE on the features + pixel decoder on noisy ones)
  fae_pixels  the pixel decoder fine-tuned on the feature decoder's reconstructions
  stage0…3    `fashion_mnist_stages.py`'s stages with `latent.name = "fae"`
All read the `fashion_mnist_stages` records (`generate_*` splits for the image runs).
"""

import ml_collections

from experiments import fashion_mnist_stages as stages_experiment
from starflow2_jax import sharding

# Per size: the DINOv2, the FAE, and the steps of each run.
SIZES = {
    "": dict(
        dinov2=dict(preset="tiny", patch_size=4, image_size=28, hidden_size=64, num_layers=4,
                    num_heads=4),
        fae=dict(latent_dim=8, encoder_heads=4, encoder_head_dim=32, feature_decoder_width=64,
                 feature_decoder_layers=2, feature_decoder_heads=4,
                 feature_decoder_mlp_hidden=172, pixel_decoder_width=96, pixel_decoder_layers=3,
                 pixel_decoder_heads=4, pixel_decoder_mlp_ratio=4.0),
        steps=dict(dinov2=500, fae=500, fae_pixels=200, stage1=700, stage2=400),
        batch_size=64),
    "tiny": dict(
        dinov2=dict(preset="tiny", patch_size=4, image_size=28, hidden_size=32, num_layers=1,
                    num_heads=2),
        fae=dict(latent_dim=4, encoder_heads=2, encoder_head_dim=16, feature_decoder_width=32,
                 feature_decoder_layers=1, feature_decoder_heads=2,
                 feature_decoder_mlp_hidden=64, pixel_decoder_width=32, pixel_decoder_layers=1,
                 pixel_decoder_heads=2, pixel_decoder_mlp_ratio=2.0),
        steps=dict(dinov2=3, fae=3, fae_pixels=3), batch_size=8),
}
IMAGE_RUNS = ("dinov2", "fae", "fae_pixels")


def _image_run(run, size):
  s = SIZES[size]
  c = ml_collections.ConfigDict()
  c.task = "dinov2_pretrain" if run == "dinov2" else "fae"
  c.seed = 10 + IMAGE_RUNS.index(run)
  c.data = dict(dir="", source="fashion_mnist_stages",
                source_dir="/usr/share/datasets/fashion-mnist",
                train_split="generate_train", test_split="generate_test",
                image_size=(28, 28), channels=1, read_threads=0)
  c.init = dict(from_workdir="")
  if run == "dinov2":
    c.dinov2 = dict(model=dict(s["dinov2"]), num_classes=10, pixel_weight=1.0)
    trainable = [".*"]
  else:
    # beta: the KL's weight against the feature reconstruction (summed per token, in units
    # of the features' mean square); 1e-2 keeps every latent channel in use and near the
    # prior's unit scale (`eval/latent_std_*`), docs/fae.md.
    c.fae = dict(dinov2="", model=dict(s["fae"]), phase="autoencode", beta=1e-2,
                 feature_noise=0.4, perceptual_weight=0.5)
    trainable = ["fae/.*"]
    if run == "fae_pixels":
      c.fae.phase = "finetune_pixels"
      trainable = ["fae/pixel_decoder/.*"]
  steps = s["steps"][run]
  c.train = dict(steps=steps, batch_size=s["batch_size"], caption_dropout=0.0,
                 log_every=min(100, steps), eval_every=0, sample_every=0,
                 checkpoint_every=steps, keep_checkpoints=1, time_limit_minutes=0.0,
                 max_nonfinite_steps=10, final_samples=False,
                 microbatches=1)             # DINOv2 and FAE runs do not accumulate: keep 1
  c.optimizer = dict(learning_rate=2e-3 if run != "fae_pixels" else 1e-3,
                     warmup_steps=min(100, steps // 5), min_learning_rate=1e-5, b1=0.9,
                     b2=0.99, eps=1e-8, weight_decay=1e-4, grad_clip_norm=1.0,
                     trainable=trainable)
  c.eval = dict(batch_size=250 if not size else 8, num_examples=1000 if not size else 8)
  c.mesh = dict(shape=dict(data=-1, fsdp=1, tensor=1),
                rules=[list(rule) for rule in sharding.DEFAULT_RULES])
  return c


def get_config(preset="fae"):
  name, _, size = preset.partition("-")
  if size not in SIZES:
    raise ValueError(f"unknown size {size!r} in preset {preset!r}: use '' or 'tiny'")
  if name in IMAGE_RUNS:
    return _image_run(name, size)
  if name == "stage0":      # text alone: no latent space involved
    return stages_experiment.get_config(preset)
  if name.startswith("stage"):
    c = stages_experiment.get_config(preset)
    c.latent = dict(name="fae", fae_workdir="")   # the fae_pixels run's workdir
    # Stage 0 (shared with the patch latent) trains only the VLM; the flow's parameters whose
    # shape depends on the latent's D start fresh instead of from its untrained ones.
    c.init.reinitialise = ["(?!vlm/).*"]
    c.data.precomputed_latents = False            # True: records from precompute-latents
    steps = SIZES[size]["steps"].get(name)
    if steps:    # the demo's budget: the same steps for both latent spaces (fae_demo.py)
      c.train.update(steps=steps, checkpoint_every=steps)
      c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, steps // 5)
    return c
  raise ValueError(f"unknown preset {preset!r} for {__name__}: use one of "
                   f"{IMAGE_RUNS + ('stage0', 'stage1', 'stage2', 'stage3')} (+ '-tiny')")
