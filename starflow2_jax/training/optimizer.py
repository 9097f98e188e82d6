"""AdamW with warmup + cosine decay to a floor, gradient clipping and a trainable set.

Which parameters train is data: regular expressions over '/'-joined parameter paths
(big_vision style). Frozen parameters get `optax.set_to_zero()`, which holds no state, so
they cost no optimizer memory and stay bit-identical.
"""

import optax

from starflow2_jax import tree_paths


def learning_rate_schedule(cfg, total_steps):
  warmup = min(int(cfg.warmup_steps), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=cfg.min_learning_rate)


def make_optimizer(cfg, total_steps):
  """The optimizer of the config's `optimizer` section and its learning-rate schedule."""
  schedule = learning_rate_schedule(cfg, total_steps)
  adamw = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip_norm),
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
  patterns = tuple(cfg.trainable)
  optimizer = optax.multi_transform(
      {"train": adamw, "freeze": optax.set_to_zero()},
      lambda params: tree_paths.trainable_labels(params, patterns))
  return optimizer, schedule
