"""Sample grids: one row per caption, plain samples then guided ones (the trainer's samples)."""

import jax
import numpy as np

from starflow2_jax import image_io


def caption_grid(sample_captions, sample_cfg, params, rng):
  """One row per caption of `sample_cfg.captions`: `per_class` plain samples, then as many
  guided ones (`sample_cfg.guidance_weight`), drawn by
  `sample_captions(params, captions, rng, guidance_weight=None) -> uint8 [B, H, W, C]`.

  Returns (grid uint8 [H, W, C], plain images, guided images, labels)."""
  s = sample_cfg
  captions = [c for c in s.captions for _ in range(s.per_class)]
  labels = np.repeat(np.arange(len(s.captions)), s.per_class)
  rng_plain, rng_guided = jax.random.split(rng)
  plain = sample_captions(params, captions, rng_plain)
  guided = sample_captions(params, captions, rng_guided, s.guidance_weight)
  rows = len(s.captions)
  grid = np.concatenate([plain.reshape(rows, s.per_class, *plain.shape[1:]),
                         guided.reshape(rows, s.per_class, *guided.shape[1:])], axis=1)
  return image_io.image_grid(grid), plain, guided, labels
