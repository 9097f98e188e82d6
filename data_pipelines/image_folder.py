"""Converts a folder of images plus a JSONL caption file into captioned interleaved records.

Each JSONL line is `{"file": "relative/path.png", "caption": "..."}`. Any bad input (a bad
JSON line, missing file or caption, unreadable or truncated image, wrong size) is logged,
counted in the WriteSummary and skipped, so one broken file does not sink a whole run.

Images are re-encoded as PNG in one of two modes: greyscale ("L") images stay "L"; every
other mode (RGBA, palette, CMYK, 16-bit, ...) is converted to "RGB", and alpha is dropped.
"""

import json
import os

import numpy as np
from PIL import Image

from data_pipelines import json_input
from data_pipelines import records
from data_pipelines import writers


def _parse_line(line):
  """(relative file, caption) from one JSONL line."""
  try:
    entry = json.loads(line)
  except json.JSONDecodeError as e:
    raise json_input.BadEntry(f"bad JSON ({e})") from e
  if not isinstance(entry, dict):
    raise json_input.BadEntry(f"expected a JSON object, got {type(entry).__name__}")
  file, caption = entry.get("file"), entry.get("caption")
  if not isinstance(file, str) or not file:
    raise json_input.BadEntry("missing or non-string 'file'")
  if not isinstance(caption, str) or not caption.strip():
    raise json_input.BadEntry("missing or empty 'caption'")
  return file, caption


def _load_image(path, image_size):
  """The image at `path` as RGB or L, checked against `image_size` (H, W) if given."""
  if not os.path.isfile(path):
    raise json_input.BadEntry("image file does not exist")
  try:
    with Image.open(path) as image:
      image.load()
      image = image.convert("L" if image.mode == "L" else "RGB")
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise json_input.BadEntry(f"unreadable image ({type(e).__name__}: {e})") from e
  if image_size is not None and (image.height, image.width) != tuple(image_size):
    raise json_input.BadEntry(f"image is {image.height}x{image.width}, expected "
                     f"{image_size[0]}x{image_size[1]} (HxW)")
  return image


def _records(image_dir, captions_jsonl, image_size, summary):
  """Yields one record per good JSONL line; bad lines go to `summary.skip`."""
  with open(captions_jsonl, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      file = None
      try:
        file, caption = _parse_line(line)
        image = _load_image(json_input.resolve_image(image_dir, file), image_size)
      except json_input.BadEntry as e:
        where = f"{captions_jsonl} line {line_number}" + (f" (file {file!r})" if file else "")
        summary.skip(f"{where}: {e}")
        continue
      segments = (records.TextSegment(caption), records.ImageSegment.from_array(np.asarray(image)))
      summary.written += 1
      yield records.InterleavedRecord(segments, {"line": line_number, "file": file})


def write_image_folder(image_dir, captions_jsonl, out_dir, split, image_size=None, num_shards=1):
  """Writes the captioned images listed in `captions_jsonl` as split `split` of `out_dir`.

  Args:
    image_dir: directory that the JSONL "file" paths are relative to.
    captions_jsonl: path of the JSONL caption file.
    out_dir: output directory for shards and `{split}_summary.json`.
    split: split name, e.g. "train".
    image_size: expected (H, W); images of another size are skipped. None accepts any size.
    num_shards: number of shard files.

  Returns:
    The WriteSummary (also saved as JSON next to the shards).
  """
  if not os.path.isfile(captions_jsonl):
    raise FileNotFoundError(f"caption file {captions_jsonl!r} does not exist")
  if not os.path.isdir(image_dir):
    raise FileNotFoundError(f"image directory {image_dir!r} does not exist")
  summary = writers.WriteSummary()
  paths = writers.write_records(
      _records(image_dir, captions_jsonl, image_size, summary), out_dir, split, num_shards)
  summary.files = [os.path.basename(p) for p in paths]
  writers.save_summary(summary, out_dir, split)
  return summary


def source(out_dir, options):
  """`prepare-data --source image_folder`: --source_dir (the images), --annotations (the
  caption JSONL), --split."""
  from data_pipelines import sources   # the registry imports this module lazily
  image_dir, captions = sources.require_options(options, "image_folder", "source_dir",
                                                "annotations")
  return {options.split: write_image_folder(image_dir, captions, out_dir, options.split)}
