"""Tiny synthetic inputs for tests: fake Fashion-MNIST idx files and captioned records.

Tests build their own data with these instead of relying on files installed on the machine.
"""

import gzip
import os

import numpy as np

from data_pipelines import records
from demos import fashion_mnist


def idx_bytes(array):
  """The idx encoding (unsigned-byte magic, big-endian dims, then data) of a uint8 array."""
  array = np.asarray(array, dtype=np.uint8)
  header = np.array([0x800 | array.ndim, *array.shape], dtype=">u4").tobytes()
  return header + array.tobytes()


def class_template_images(labels, rng, noise=16):
  """28x28 images whose class sets the background's grey level (20 · label) and puts a bright
  7x7 block at cell `label` of a 4x4 grid of cells, plus uniform noise: classes a tiny model
  learns to draw in seconds and a pixel classifier tells apart."""
  images = rng.integers(0, noise + 1, size=(len(labels), 28, 28))
  for image, label in zip(images, labels):
    image += 20 * int(label)
    row, col = divmod(int(label), 4)
    image[7 * row:7 * row + 7, 7 * col:7 * col + 7] = 255 - rng.integers(0, noise + 1, (7, 7))
  return images.astype(np.uint8)


def write_fake_fashion_mnist(source_dir, num_train=6, num_test=4, gzipped=True, seed=0,
                             class_templates=False):
  """Writes the four Fashion-MNIST idx files with 28x28 images — uniform noise, or
  `class_template_images` — and labels cycling over the classes; returns {split: labels}."""
  rng = np.random.default_rng(seed)
  os.makedirs(source_dir, exist_ok=True)
  labels_by_split = {}
  for split, count in (("train", num_train), ("test", num_test)):
    prefix = fashion_mnist.SPLITS[split]
    labels = np.arange(count, dtype=np.uint8) % len(fashion_mnist.CLASS_NAMES)
    images = (class_template_images(labels, rng) if class_templates else
              rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8))
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
      data = idx_bytes(array)
      name = f"{prefix}-{kind}-ubyte" + (".gz" if gzipped else "")
      with open(os.path.join(source_dir, name), "wb") as f:
        f.write(gzip.compress(data) if gzipped else data)
    labels_by_split[split] = labels.astype(np.int64)
  return labels_by_split


def caption_image_records(num_records, image_shape=(8, 8, 3)):
  """Records [caption "item i", image filled with i % 256] with meta {"label": i}."""
  out = []
  for i in range(num_records):
    image = np.full(image_shape, i % 256, dtype=np.uint8)
    segments = (records.TextSegment(f"item {i}"), records.ImageSegment.from_array(image))
    out.append(records.InterleavedRecord(segments, {"label": i}))
  return out
