"""Patch features of many image files into one float32 .npy [images, patches, width].

Written batch by batch into a memory-mapped `<out>.partial` and renamed when complete, so
host memory holds one batch and a failed run leaves no half-written `out`.
"""

import os

import jax
import numpy as np

from starflow2_jax.models.dinov2 import image_processing
from starflow2_jax.models.dinov2 import model as model_lib


def feature_extractor(model, params, batch_size):
  """fn(pixels [n ≤ batch_size, H, W, 3]) -> float32 numpy patch features [n, patches, width];
  shorter batches are zero-padded to `batch_size`, so it compiles once."""
  run = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model_lib.Dinov2.patch_features))

  def extract(pixels_nhwc):
    n = pixels_nhwc.shape[0]
    if not 0 < n <= batch_size:
      raise ValueError(f"{n} images for a batch of {batch_size}")
    padded = np.zeros((batch_size,) + pixels_nhwc.shape[1:], np.float32)
    padded[:n] = pixels_nhwc
    return np.asarray(run(params, padded), np.float32)[:n]

  return extract


def write_features(config, params, mean, std, image_paths, out, batch_size=8):
  """Writes the patch features of `image_paths` (loaded at `config.image_size`, see
  image_processing) to `out`; returns the array's shape."""
  size = config.image_size
  extract = feature_extractor(model_lib.Dinov2(config), params, batch_size)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  partial = f"{out}.partial"
  shape = (len(image_paths), config.num_patches, config.hidden_size)
  features = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=shape)
  try:
    for start in range(0, len(image_paths), batch_size):
      batch = image_paths[start:start + batch_size]
      features[start:start + len(batch)] = extract(np.stack(
          [image_processing.load_pixels(path, size, mean, std) for path in batch]))
    features.flush()
  except BaseException:
    del features
    os.remove(partial)
    raise
  del features
  os.replace(partial, out)
  return shape
