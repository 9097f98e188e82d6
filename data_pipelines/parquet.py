"""Parquet files of images and captions (the Hugging Face datasets layout) -> records.

Every `*.parquet` under the source directory is read, recursively and in sorted path order
(`data/train-00000-of-00002.parquet`, …; dot-folders such as a cache are ignored). The image
column holds a Hugging Face `Image` feature — a struct {bytes, path}, where null bytes mean
the image is the file at `path`, absolute or relative to the source directory — or plain
image bytes, or a path string; the caption column holds strings. Columns are named by
`image_key`/`text_key`, else found by name (`image`, `jpg` or `png`; `text` or `caption`);
a file where that is ambiguous, or lacks them, is an error naming the file and its columns.

Each (file, row group) is one conversion unit (`conversion.py`: parallel even for one big
file, resumable), read in batches of `BATCH_ROWS` rows (memory bounded by a row group, flat
in the dataset's size). Images are decoded as `image_decode.decode_image` says; a record is
the caption (the prompt) then the image, meta `file` (relative to the source directory),
`row` (in the file), the original `width` and `height`, and `prompt_segments` 1. Bad input —
an unreadable or truncated image, a missing or empty caption, an unreadable file, an empty
file or row group — is counted and skipped, named by file and row.

`captioned_record` and `pick_key` are shared with the other caption + image converters.
"""

import dataclasses
import os

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipelines import conversion
from data_pipelines import image_decode
from data_pipelines import records

IMAGE_KEYS = ("image", "jpg", "png")
TEXT_KEYS = ("text", "caption")
BATCH_ROWS = 64


class BadSample(Exception):
  """One input sample cannot become a record; the message says why."""


def captioned_record(caption, image, image_size, meta):
  """The stage-1 record of one sample: the caption (the prompt), then the image.

  Args:
    caption: str or UTF-8 bytes (None or blank: no caption).
    image: encoded image bytes.
    image_size: square size to resize and centre-crop to (None: kept).
    meta: where the sample came from; the original width and height are added.

  Raises:
    BadSample: no caption, or an unreadable image.
  """
  if isinstance(caption, bytes):
    caption = caption.decode("utf-8", errors="replace")
  if caption is not None and not isinstance(caption, str):
    raise BadSample(f"caption is {type(caption).__name__}, not text")
  if not (caption or "").strip():
    raise BadSample("no caption")
  if not image:
    raise BadSample("no image")
  try:
    pixels, (width, height) = image_decode.decode_image(image, image_size)
  except image_decode.UnreadableImage as e:
    raise BadSample(f"unreadable image ({e})") from e
  return records.InterleavedRecord(
      (records.TextSegment(caption.strip()), records.ImageSegment.from_array(pixels)),
      {**meta, "width": width, "height": height, "prompt_segments": 1})


def pick_key(kind, given, candidates, available, where):
  """The column or feature holding `kind` ("image" or "text"): `given` when set, else the
  one candidate; a ValueError naming `where` and listing `available` ({name: type})
  otherwise."""
  listing = f"{where} has " + ", ".join(f"{n} ({t})" for n, t in available.items())
  if given:
    if given not in available:
      raise ValueError(f"no {kind} column or feature {given!r}: {listing}")
    return given
  if len(candidates) != 1:
    found = f"several ({', '.join(candidates)})" if candidates else "none"
    raise ValueError(f"cannot tell which {kind} column or feature to read, {found} found; "
                     f"name it with --{kind}_key: {listing}")
  return candidates[0]


@dataclasses.dataclass(frozen=True)
class RowGroup:
  """One unit: row group `index` of `path` (None: the file has none, or is unreadable),
  whose first row is row `first_row` of the file; `columns` = (image, text)."""
  path: str
  index: int | None
  first_row: int
  columns: tuple | None
  source_dir: str
  image_size: int | None


def _is_image_type(t):
  if pa.types.is_struct(t):
    return any(t.field(i).name in ("bytes", "path") for i in range(t.num_fields))
  return pa.types.is_binary(t) or pa.types.is_large_binary(t) or _is_text_type(t)


def _is_text_type(t):
  return pa.types.is_string(t) or pa.types.is_large_string(t)


def resolve_columns(schema, image_key, text_key, path):
  """(image column, text column) of a file's arrow `schema`; ValueError naming `path`."""
  types = {field.name: field.type for field in schema}
  image = pick_key("image", image_key, [n for n in IMAGE_KEYS if n in types], types, path)
  text = pick_key("text", text_key, [n for n in TEXT_KEYS if n in types], types, path)
  if not _is_image_type(types[image]):
    raise ValueError(f"{path}: image column {image!r} is {types[image]}, not a struct of "
                     "bytes and path, binary or a path string")
  if not _is_text_type(types[text]):
    raise ValueError(f"{path}: text column {text!r} is {types[text]}, not string")
  return image, text


def _image_bytes(value, source_dir):
  """The encoded image of one cell: its bytes, else the file its path names."""
  if isinstance(value, dict):
    data, path = value.get("bytes"), value.get("path")
  elif isinstance(value, str):
    data, path = None, value
  else:
    data, path = value, None
  if data or not path:
    return data
  try:
    with open(os.path.join(source_dir, path), "rb") as f:
      return f.read()
  except OSError as e:
    raise BadSample(f"image file {path!r} unreadable ({e})") from e


def read_row_group(unit):
  """One RowGroup's records (and Skips), in row order."""
  where = unit.path if unit.index is None else f"{unit.path} row group {unit.index}"
  meta = {"file": os.path.relpath(unit.path, unit.source_dir).replace(os.sep, "/")}
  found = 0
  try:
    with pq.ParquetFile(unit.path) as parquet_file:
      if unit.index is not None:
        for batch in parquet_file.iter_batches(BATCH_ROWS, row_groups=[unit.index],
                                               columns=list(unit.columns)):
          images, captions = (batch.column(k).to_pylist() for k in unit.columns)
          for image, caption in zip(images, captions):
            row, found = unit.first_row + found, found + 1
            try:
              yield captioned_record(caption, _image_bytes(image, unit.source_dir),
                                     unit.image_size, {**meta, "row": row})
            except BadSample as e:
              yield conversion.Skip(f"{unit.path} row {row}: {e}")
  except (OSError, pa.ArrowException) as e:
    yield conversion.Skip(f"{where}: unreadable Parquet after {found} rows ({e})")
    return
  if not found:
    yield conversion.Skip(f"{where}: no rows")


def parquet_files(source_dir):
  """The `*.parquet` files under `source_dir`, recursively, in sorted relative-path order."""
  found = []
  for directory, folders, files in os.walk(source_dir):
    folders[:] = [f for f in folders if not f.startswith(".")]
    found += [os.path.join(directory, f) for f in files if f.endswith(".parquet")]
  return sorted(found, key=lambda p: os.path.relpath(p, source_dir))


def _file_units(path, source_dir, image_size, image_key, text_key):
  """The units of one file: one per row group (one reporting it, when it has none or
  cannot be opened)."""
  name = os.path.relpath(path, source_dir)
  try:
    with pq.ParquetFile(path) as parquet_file:
      schema, metadata = parquet_file.schema_arrow, parquet_file.metadata
  except (OSError, pa.ArrowException):
    return [conversion.Unit(f"{name} (unreadable)",
                            RowGroup(path, None, 0, None, source_dir, image_size))]
  columns = resolve_columns(schema, image_key, text_key, path)
  sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
  if not sizes:
    return [conversion.Unit(f"{name} (no row groups)",
                            RowGroup(path, None, 0, columns, source_dir, image_size))]
  return [conversion.Unit(f"{name} row group {i} of {len(sizes)} ({rows} rows)",
                          RowGroup(path, i, sum(sizes[:i]), columns, source_dir, image_size))
          for i, rows in enumerate(sizes)]


def write_parquet(source_dir, out_dir, split, image_size=None, workers=1, image_key=None,
                  text_key=None):
  """Writes the rows of every Parquet file under `source_dir` as split `split` of `out_dir`,
  one records shard per row group (see `conversion.convert`: parallel, resumable); returns
  the WriteSummary (also saved as JSON next to the shards)."""
  if not os.path.isdir(source_dir or ""):
    raise FileNotFoundError(f"Parquet directory {source_dir!r} does not exist")
  paths = parquet_files(source_dir)
  if not paths:
    raise FileNotFoundError(f"no .parquet files under {source_dir!r}")
  units = [unit for path in paths
           for unit in _file_units(path, source_dir, image_size, image_key, text_key)]
  return conversion.convert(units, read_row_group, out_dir, split, workers, what="row groups")


def source(out_dir, options):
  """`prepare-data --source parquet`: --source_dir, --split, --image_size, --image_key,
  --text_key."""
  from data_pipelines import sources   # the registry imports this module lazily
  (source_dir,) = sources.require_options(options, "parquet", "source_dir")
  return {options.split: write_parquet(source_dir, out_dir, options.split, options.image_size,
                                       options.workers, options.image_key, options.text_key)}
