"""Fashion-MNIST (idx files) converted to captioned interleaved records.

The idx files come from the Debian package `dataset-fashion-mnist`; reading them needs no
network and no TensorFlow. Each example becomes [TextSegment(caption), ImageSegment(28x28
greyscale)] with meta {"label", "index"}, written as `train` (60k) and `test` (10k).
"""

import gzip
import os
import zlib

import numpy as np
import tqdm

from data_pipelines import records
from data_pipelines import writers

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist/"
CLASS_NAMES = (
    "T-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
SPLITS = {"train": "train", "test": "t10k"}  # split name -> idx file prefix

_GET_IT = ("install it with `apt-get install dataset-fashion-mnist` (files go to "
           f"{DEFAULT_SOURCE_DIR}), or pass the directory that holds the idx files")
_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


class MissingDatasetError(FileNotFoundError):
  """The Fashion-MNIST directory or one of its idx files does not exist."""


class IdxFormatError(ValueError):
  """An idx file is truncated, corrupt or has an unexpected header."""


def caption_for(label):
  """The caption of class `label`, e.g. "a photo of a sneaker"."""
  return f"a photo of a {CLASS_NAMES[label]}"


def _find_idx_file(source_dir, name):
  """Path of `name` (gzipped preferred, then plain) in `source_dir`."""
  if not os.path.isdir(source_dir):
    raise MissingDatasetError(f"Fashion-MNIST directory {source_dir!r} does not exist; {_GET_IT}")
  for candidate in (name + ".gz", name):
    path = os.path.join(source_dir, candidate)
    if os.path.isfile(path):
      return path
  raise MissingDatasetError(
      f"Fashion-MNIST file {os.path.join(source_dir, name + '.gz')!r} (or without .gz) "
      f"does not exist; {_GET_IT}")


def _read_bytes(path):
  with open(path, "rb") as f:
    data = f.read()
  if data[:2] != b"\x1f\x8b":
    return data
  try:
    return gzip.decompress(data)
  except (OSError, EOFError, zlib.error) as e:
    raise IdxFormatError(f"{path}: corrupt or truncated gzip data ({e})") from e


def read_idx(path, magic):
  """Reads an unsigned-byte idx file whose header starts with `magic`; returns the array."""
  data = _read_bytes(path)
  ndim = magic & 0xFF
  header_size = 4 * (1 + ndim)
  if len(data) < header_size:
    raise IdxFormatError(f"{path}: {len(data)} bytes, shorter than the {header_size}-byte header")
  header = np.frombuffer(data, dtype=">u4", count=1 + ndim)
  if header[0] != magic:
    raise IdxFormatError(f"{path}: magic number {header[0]:#010x}, expected {magic:#010x}")
  shape = tuple(int(n) for n in header[1:])
  expected = header_size + int(np.prod(shape))
  if len(data) != expected:
    raise IdxFormatError(
        f"{path}: {len(data)} bytes but the header {shape} implies {expected} (truncated?)")
  return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def load_idx_split(source_dir, split):
  """Loads `split` ("train" or "test"): images uint8 [N, 28, 28], labels int64 [N]."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
  images_path = _find_idx_file(source_dir, f"{SPLITS[split]}-images-idx3-ubyte")
  labels_path = _find_idx_file(source_dir, f"{SPLITS[split]}-labels-idx1-ubyte")
  images = read_idx(images_path, _IMAGES_MAGIC)
  labels = read_idx(labels_path, _LABELS_MAGIC).astype(np.int64)
  if images.shape[1:] != (28, 28):
    raise IdxFormatError(f"{images_path}: images are {images.shape[1:]}, expected (28, 28)")
  if len(images) != len(labels):
    raise IdxFormatError(
        f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
  if labels.size and labels.max() >= len(CLASS_NAMES):
    raise IdxFormatError(f"{labels_path}: label {labels.max()} is not a Fashion-MNIST class")
  return images, labels


def _records(images, labels):
  for index, (image, label) in enumerate(zip(images, labels)):
    segments = (records.TextSegment(caption_for(label)), records.ImageSegment.from_array(image))
    yield records.InterleavedRecord(segments, {"label": int(label), "index": index})


def write_fashion_mnist(source_dir=DEFAULT_SOURCE_DIR, out_dir="data/fashion_mnist",
                        num_shards=1, limit=None):
  """Converts both splits to ArrayRecord shards plus `{split}_summary.json` in `out_dir`.

  Both splits are read and validated before anything is written.

  Args:
    source_dir: directory with the four idx files (gzipped or not).
    out_dir: output directory.
    num_shards: shards per split.
    limit: if set, keep only the first `limit` examples of each split (for quick runs).

  Returns:
    {split: WriteSummary}.
  """
  loaded = {split: load_idx_split(source_dir, split) for split in SPLITS}
  summaries = {}
  for split, (images, labels) in loaded.items():
    images, labels = images[:limit], labels[:limit]
    summary = writers.WriteSummary()
    progress = tqdm.tqdm(_records(images, labels), total=len(images), desc=f"fashion-mnist {split}")
    paths = writers.write_records(progress, out_dir, split, num_shards)
    summary.written = len(images)
    summary.files = [os.path.basename(p) for p in paths]
    writers.save_summary(summary, out_dir, split)
    summaries[split] = summary
  return summaries


def record_source(out_dir, options):
  """The `fashion_mnist` record source (`starflow2 prepare-data --source fashion_mnist`):
  caption + image records of both splits from the idx files in `options.source_dir`."""
  return write_fashion_mnist(options.source_dir or DEFAULT_SOURCE_DIR, out_dir)
