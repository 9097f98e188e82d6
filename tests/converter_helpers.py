"""What the JSON-annotated converter tests (llava, editing, interleaved) share: writing tiny
images and annotations, reading the records back, and laying a record out for the Pretzel."""

import json
import os

import numpy as np
from array_record.python import array_record_module
from PIL import Image

from data_pipelines import examples
from data_pipelines import image_decode
from data_pipelines import records
from data_pipelines import text
from data_pipelines import writers

SIZE = 8
TOKENIZER = text.ByteTokenizer()
VISION_START, VISION_END, IMAGE_PAD = 257, 258, 259


def save_image(path, seed, shape, truncate=False):
  """Writes a random PNG of `shape` ([H, W] greyscale or [H, W, 3]); cut short if asked."""
  array = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)
  if truncate:
    with open(path, "rb") as f:
      data = f.read()
    with open(path, "wb") as f:
      f.write(data[:len(data) // 2])
  return path


def write_lines(path, lines):
  """A JSONL file: dicts are dumped, strings written as they are (malformed or blank lines)."""
  with open(path, "w", encoding="utf-8") as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
  return path


def expected_pixels(path, size=SIZE):
  """The image at `path` as the converter should store it: RGB (or L), shorter side to
  `size`, centre crop, as uint8 [H, W, C]."""
  with Image.open(path) as image:
    image = image.convert("L" if image.mode == "L" else "RGB")
  array = np.asarray(image_decode.resize_and_crop(image, size))
  return array[..., None] if array.ndim == 2 else array


def read_records(out_dir, split="train"):
  """The split's records, shard by shard in stored order."""
  found = []
  for path in writers.find_split_files(str(out_dir), split):
    reader = array_record_module.ArrayRecordReader(path)
    try:
      count = reader.num_records()
      found += [records.decode_record(d) for d in reader.read(0, count)] if count else []
    finally:
      reader.close()
  return found


def parts(record):
  """The record's segments as text strings and image pixel arrays."""
  return [s.text if isinstance(s, records.TextSegment) else s.to_array()
          for s in record.segments]


def assert_parts(record, want):
  """The record's segments equal `want`: text strings, or image files as pathlib.Paths
  (compared with the pixels the converter should have stored)."""
  got = parts(record)
  assert len(got) == len(want), (got, want)
  for g, w in zip(got, want):
    if isinstance(w, os.PathLike):
      np.testing.assert_array_equal(g, expected_pixels(w))
    else:
      assert g == w


def example(record, channels=3, max_images=2, max_length=160):
  """The record laid out for the Pretzel with byte-level text ids."""
  layout = examples.SequenceLayout(
      max_length=max_length, max_images=max_images, grid=(2, 2),
      image_shape=(SIZE, SIZE, channels), vision_start_id=VISION_START,
      vision_end_id=VISION_END, image_pad_id=IMAGE_PAD, pad_id=0)
  return examples.InterleavedExample(layout, TOKENIZER.ids)(record)


def text_of(ex, mask):
  """The text (bytes only: special ids dropped) at the positions `mask` selects."""
  ids = ex["ids"][mask]
  return TOKENIZER.decode(ids[ids < TOKENIZER.vocab_size])


def encoded(recs):
  return [records.encode_record(r) for r in recs]
