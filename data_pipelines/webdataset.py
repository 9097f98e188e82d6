"""WebDataset tar shards (the layout img2dataset writes) -> captioned interleaved records.

A shard is a tar whose members are grouped by key — the member's path up to the first "."
of its file name — so `000017.jpg` and `000017.txt` are one sample. A sample needs one image
(`jpg`, `jpeg`, `png` or `webp`) and a caption: the `txt` member, else the `caption` (or
`text`) field of the `json` member. Tars are read as streams (memory flat in the shard's
size), in sorted file order.

Images are decoded as `image_decode.decode_image` says (RGB or L; with `image_size` S, the
shorter side resized to S and the centre S × S kept); the original size is kept in the
record's meta (`width`, `height`), with the shard and key. Bad input — an
unreadable or truncated image, a missing caption, malformed JSON, a sample without an image,
an unreadable or empty shard — is logged with its shard and key, counted and skipped; it
never aborts the conversion. Each tar becomes one records shard (`conversion.py`: tars are
converted in parallel, and a killed conversion resumes where it stopped).
"""

import json
import os
import tarfile

from data_pipelines import conversion
from data_pipelines import image_decode
from data_pipelines import records

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


def _image(sample, image_size):
  extension = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
  if extension is None:
    raise _SkipSample(f"no image member (one of {', '.join(IMAGE_EXTENSIONS)})")
  try:
    return image_decode.decode_image(sample[extension], image_size)
  except image_decode.UnreadableImage as e:
    raise _SkipSample(f"unreadable {extension} ({e})") from e


def read_shard(source):
  """One tar shard's records (and Skips), in member order; `source` = (path, image_size)."""
  tar_path, image_size = source
  shard, found = os.path.basename(tar_path), 0
  try:
    for key, sample in _samples(tar_path):
      found += 1
      try:
        caption = _caption(sample)
        pixels, (width, height) = _image(sample, image_size)
      except _SkipSample as e:
        yield conversion.Skip(f"{tar_path} sample {key!r}: {e}")
        continue
      yield records.InterleavedRecord(
          (records.TextSegment(caption), records.ImageSegment.from_array(pixels)),
          {"shard": shard, "key": key, "width": width, "height": height,
           "prompt_segments": 1})
  except (tarfile.TarError, OSError, EOFError) as e:
    yield conversion.Skip(f"{tar_path}: unreadable tar after {found} samples ({e})")
    return
  if not found:
    yield conversion.Skip(f"{tar_path}: empty shard (no samples)")


def write_webdataset(source_dir, out_dir, split, image_size=None, workers=1):
  """Writes the samples of every `*.tar` in `source_dir` as split `split` of `out_dir`, one
  records shard per tar (see `conversion.convert`: parallel, resumable); returns the
  WriteSummary (also saved as JSON next to the shards)."""
  if not os.path.isdir(source_dir or ""):
    raise FileNotFoundError(f"WebDataset directory {source_dir!r} does not exist")
  tar_names = sorted(f for f in os.listdir(source_dir) if f.endswith(".tar"))
  if not tar_names:
    raise FileNotFoundError(f"no .tar shards in {source_dir!r}")
  units = [conversion.Unit(name, (os.path.join(source_dir, name), image_size))
           for name in tar_names]
  return conversion.convert(units, read_shard, out_dir, split, workers, what="tar shards")


def source(out_dir, options):
  """`prepare-data --source webdataset`: --source_dir (the tars), --split, --image_size."""
  from data_pipelines import sources   # the registry imports this module lazily
  (source_dir,) = sources.require_options(options, "webdataset", "source_dir")
  return {options.split: write_webdataset(source_dir, out_dir, options.split,
                                          options.image_size, options.workers)}
