"""Caption-to-image STARFlow (no VLM) on Fashion-MNIST: the embedded default and the demo.

    starflow2 prepare-data --source fashion_mnist --out runs/fm/data
    starflow2 train --config experiments/fashion_mnist.py --workdir runs/fm
    starflow2 caption-demo            # the same config, then samples, bpd and accuracy

Presets (pass after a colon, e.g. `--config experiments/fashion_mnist.py:tiny`):
  ""     the demo: 2100 steps of 32, capped at 9.5 min of training (on the 2-core dev machine
         the cap stops it at ~1870 steps: 5.06 bits/dim, 82% of guided samples recognised
         by the independent classifier; README has the figures).
  tiny   a seconds-long run for tests and smoke checks.
  wide   the demo with a wider deep block, for throughput benchmarks.
Every field can be overridden on the command line: `--config.train.steps=200`.
"""

import ml_collections

from data_pipelines import text
from demos import fashion_mnist
from starflow2_jax import sharding

CAPTIONS = [fashion_mnist.caption_for(label) for label in range(len(fashion_mnist.CLASS_NAMES))]
WORDS = text.vocabulary(CAPTIONS)      # 14: "a", "photo", "of" and the class names' words


def get_config(preset=""):
  c = ml_collections.ConfigDict()
  c.task = "caption_to_image"
  c.seed = 0

  c.data = dict(
      dir="",                        # records; "" = <workdir>/data (starflow2 prepare-data)
      source="fashion_mnist",        # the prepare-data source that writes them
      source_dir="/usr/share/datasets/fashion-mnist",
      train_split="train",
      test_split="test",
      image_size=(28, 28),
      channels=1,
      tokenizer="words",             # the caption words below (or "bytes": any text, 24 tokens)
      words=WORDS,
      max_caption_len=max(len(text.split_words(c)) for c in CAPTIONS),   # 6 tokens
      read_threads=0,                # decode records in the training thread (fastest on 2 cores)
      elastic=False,                 # True: batch k depends on (seed, k) only (docs/launch.md)
  )
  c.latent = dict(name="patch", patch_size=4)
  c.model = dict(
      vocab_size=-(-(len(WORDS) + 2) // 8) * 8,   # pad, unknown, words; a multiple of 8 to shard
      caption_width=128,
      deep=dict(width=128, num_layers=4, num_heads=4, mlp_ratio=4.0),
      shallow=dict(width=64, num_layers=2, num_heads=4, mlp_ratio=4.0),
      num_shallow_blocks=2,
      scale="softplus",              # or "exp"
      noise_conditioning=True,
      dtype="float32",               # compute dtype; "bfloat16" keeps float32 master weights
      remat=False,
  )
  c.noise = dict(t_min=0.02, t_max=0.2, loss_weighting="t")
  c.train = dict(
      steps=2100,
      batch_size=32,
      caption_dropout=0.1,
      log_every=50,
      eval_every=500,
      sample_every=0,                # 0: only at the end
      checkpoint_every=500,
      keep_checkpoints=2,
      time_limit_minutes=9.5,        # > 0: save and stop early when reached (0: no limit)
      max_nonfinite_steps=10,        # non-finite steps in a row that stop the run (0: never)
      microbatches=1,                # > 1: accumulate the gradient over microbatches
  )
  c.optimizer = dict(learning_rate=2e-3, warmup_steps=100, min_learning_rate=1e-6,
                     b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-4, grad_clip_norm=1.0,
                     trainable=(".*",))
  c.eval = dict(batch_size=250, num_examples=2000, noise_level=0.02)
  c.sample = dict(captions=CAPTIONS, per_class=8,
                  temperature=0.8, guidance_weight=2.0, denoise_steps=4)
  c.demo = dict(judge_per_class=30)  # guided samples per class the independent classifier judges
  c.mesh = dict(shape=dict(data=-1, fsdp=1, tensor=1),
                rules=[list(rule) for rule in sharding.DEFAULT_RULES])

  if preset == "tiny":
    c.model.caption_width = 32
    c.model.deep = dict(width=32, num_layers=2, num_heads=2, mlp_ratio=2.0)
    c.model.shallow = dict(width=32, num_layers=1, num_heads=2, mlp_ratio=2.0)
    c.train.update(steps=4, batch_size=8, log_every=2, eval_every=2, checkpoint_every=2)
    c.eval.update(batch_size=8, num_examples=16)
    c.train.time_limit_minutes = 0.0
    c.sample.update(per_class=1, denoise_steps=1)
    c.demo.judge_per_class = 1
  elif preset == "wide":
    c.model.deep = dict(width=256, num_layers=4, num_heads=4, mlp_ratio=4.0)
  elif preset:
    raise ValueError(f"unknown preset {preset!r} for {__name__}: use '', 'tiny' or 'wide'")
  return c
