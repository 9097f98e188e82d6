"""WebDataset tar shards (the layout img2dataset writes) -> captioned interleaved records.

A shard is a tar whose members are grouped by key — the member's path up to the first "."
of its file name — so `000017.jpg` and `000017.txt` are one sample. A sample needs one image
(`jpg`, `jpeg`, `png` or `webp`) and a caption: the `txt` member, else the `caption` (or
`text`) field of the `json` member. Tars are read as streams (memory flat in the shard's
size), in sorted file order.

Images are converted to RGB (greyscale stays L) and, with `image_size` S, resized so the
shorter side is S (bicubic, antialiased) and centre-cropped to S × S; the original size is
kept in the record's meta (`width`, `height`), with the shard and key. Bad input — an
unreadable or truncated image, a missing caption, malformed JSON, a sample without an image,
an unreadable or empty shard — is logged with its shard and key, counted and skipped; it
never aborts the conversion.

Not yet: parallel conversion over shards and resuming a killed conversion (issue 11).
"""

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

from data_pipelines import records
from data_pipelines import writers

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class _SkipSample(Exception):
  """Internal: a sample cannot become a record; the message says why."""


def _samples(tar_path):
  """Yields (key, {extension: bytes}) for the consecutive member groups of one tar."""
  key, sample = None, {}
  with tarfile.open(tar_path, mode="r|*") as tar:
    for member in tar:
      if not member.isfile():
        continue
      directory, name = os.path.split(member.name)
      stem, dot, extension = name.partition(".")
      if not dot:
        continue
      member_key = os.path.join(directory, stem)
      if member_key != key and sample:
        yield key, sample
        sample = {}
      key = member_key
      sample[extension.lower()] = tar.extractfile(member).read()
  if sample:
    yield key, sample


def _caption(sample):
  if "txt" in sample:
    caption = sample["txt"].decode("utf-8", errors="replace").strip()
  elif "json" in sample:
    try:
      meta = json.loads(sample["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise _SkipSample(f"malformed json ({e})") from e
    caption = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
    caption = caption.strip() if isinstance(caption, str) else ""
  else:
    caption = ""
  if not caption:
    raise _SkipSample("no caption (txt, or json 'caption'/'text')")
  return caption


def resize_and_crop(image, size):
  """Shorter side to `size` (bicubic, antialiased), then the centre `size` × `size`."""
  scale = size / min(image.width, image.height)
  width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
  image = image.resize((width, height), Image.Resampling.BICUBIC)
  left, top = (width - size) // 2, (height - size) // 2
  return image.crop((left, top, left + size, top + size))


def _image(sample, image_size):
  extension = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
  if extension is None:
    raise _SkipSample(f"no image member (one of {', '.join(IMAGE_EXTENSIONS)})")
  try:
    with Image.open(io.BytesIO(sample[extension])) as image:
      image.load()
      image = image.convert("L" if image.mode == "L" else "RGB")
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise _SkipSample(f"unreadable {extension} ({type(e).__name__}: {e})") from e
  original = (image.width, image.height)
  if image_size is not None:
    image = resize_and_crop(image, image_size)
  return np.asarray(image), original


def _records(tar_paths, image_size, summary):
  for tar_path in tar_paths:
    shard, found = os.path.basename(tar_path), 0
    try:
      for key, sample in _samples(tar_path):
        found += 1
        try:
          caption = _caption(sample)
          pixels, (width, height) = _image(sample, image_size)
        except _SkipSample as e:
          summary.skip(f"{tar_path} sample {key!r}: {e}")
          continue
        summary.written += 1
        yield records.InterleavedRecord(
            (records.TextSegment(caption), records.ImageSegment.from_array(pixels)),
            {"shard": shard, "key": key, "width": width, "height": height,
             "prompt_segments": 1})
    except (tarfile.TarError, OSError, EOFError) as e:
      summary.skip(f"{tar_path}: unreadable tar after {found} samples ({e})")
      continue
    if not found:
      summary.skip(f"{tar_path}: empty shard (no samples)")


def write_webdataset(source_dir, out_dir, split, image_size=None, num_shards=1):
  """Writes the samples of every `*.tar` in `source_dir` as split `split` of `out_dir`;
  returns the WriteSummary (also saved as JSON next to the shards)."""
  if not os.path.isdir(source_dir or ""):
    raise FileNotFoundError(f"WebDataset directory {source_dir!r} does not exist")
  tar_paths = sorted(os.path.join(source_dir, f) for f in os.listdir(source_dir)
                     if f.endswith(".tar"))
  if not tar_paths:
    raise FileNotFoundError(f"no .tar shards in {source_dir!r}")
  summary = writers.WriteSummary()
  paths = writers.write_records(_records(tar_paths, image_size, summary), out_dir, split,
                                num_shards)
  summary.files = [os.path.basename(p) for p in paths]
  writers.save_summary(summary, out_dir, split)
  return summary
