"""What the JSON-annotated converters share: streaming the annotations, images, records.

`llava.py`, `editing.py` and `interleaved.py` each say only how one annotation entry becomes
a `Document` — text segments and `ImageRef`s (image paths), which of them are targets, extra
meta — and raise `BadEntry` for an entry that cannot. This module does the rest, the same for
the three:

- Annotations are a JSON array (LLaVA-Instruct and Cambrian ship one big array) or JSONL (one
  entry a line), told apart by the first character; `--annotations` may also be a folder of
  `.json`/`.jsonl` files, read in sorted order. Nothing is loaded whole: a first pass streams
  each file once (`json.JSONDecoder.raw_decode` over a buffered reader, for arrays) and keeps
  only the byte offset of every `per_unit`-th entry, so memory stays flat in the file's size.
- Each run of `per_unit` entries is a `conversion.Unit` (one records shard) that seeks to its
  offset: units convert in parallel and a killed conversion resumes (`conversion.py`).
- Image paths are relative to the image root; absolute paths and paths leaving the root are
  refused. Images are decoded as `image_decode.decode_image` says (resized and centre-cropped
  to `image_size`); each image's original size goes to meta `width_<k>`, `height_<k>` (k:
  the image's place among the record's images).
- Bad input is a `conversion.Skip` naming the file and the entry (`entry i`, 0-based, in an
  array; `line n`, 1-based, in JSONL): a malformed JSON line, an entry the converter refuses,
  a missing, escaping, unreadable or truncated image, an empty file. A record is assembled
  whole before it is yielded, so a bad entry never leaves a partial record. A malformed value
  inside a JSON array ends that file (where the next entry starts cannot be known): it is
  reported once, with the byte offset.
"""

import codecs
import dataclasses
import json
import os
import re
from typing import Callable

import tqdm

from data_pipelines import conversion
from data_pipelines import image_decode
from data_pipelines import records
from data_pipelines import sources

PER_UNIT = 1000                 # entries per unit (records shard)
ANNOTATION_SUFFIXES = (".json", ".jsonl")
_BLOCK = 1 << 20                # bytes read at a time from a JSON array
_MAX_ENTRY = 256 << 20          # characters one array entry may span before it counts as malformed
_SEPARATORS = re.compile(r"[\s,]*")
_DECODER = json.JSONDecoder()


class BadEntry(ValueError):
  """One annotation entry cannot become a record; the message says why."""


@dataclasses.dataclass(frozen=True)
class ImageRef:
  """An image of a document, by its path relative to the image root."""
  path: object


@dataclasses.dataclass(frozen=True)
class Document:
  """One entry as a converter reads it: `parts` (TextSegment or ImageRef), `targets` (one
  bool per part: trained on, as opposed to prompt) and extra `meta`."""
  parts: list
  targets: list
  meta: dict = dataclasses.field(default_factory=dict)


# ---- helpers for the converters' `to_document` ----------------------------------------------

def require_object(entry):
  """`entry` if it is a JSON object (dict), else BadEntry."""
  if not isinstance(entry, dict):
    raise BadEntry(f"expected a JSON object, got {type(entry).__name__}")
  return entry


def text(value, what):
  """`value` if it is a string with some non-space character, else BadEntry naming `what`."""
  if not isinstance(value, str) or not value.strip():
    raise BadEntry(f"missing or empty {what}")
  return value


def field(entry, keys, what):
  """The value of the first of `keys` present in `entry`, else BadEntry naming them."""
  for key in keys:
    if key in entry:
      return entry[key]
  raise BadEntry(f"no {what} (one of {', '.join(map(repr, keys))})")


# ---- images ---------------------------------------------------------------------------------

def resolve_image(root, path):
  """The file of `path` inside `root`; BadEntry for a non-string, absolute or escaping path.

  Symbolic links inside the root are followed wherever they point: the check is on the path
  as written, which is what the annotations control."""
  if not isinstance(path, str) or not path:
    raise BadEntry(f"image path {path!r} is not a non-empty string")
  root = os.path.normpath(os.path.abspath(root))
  resolved = os.path.normpath(os.path.join(root, path))
  if os.path.isabs(path) or os.path.commonpath([root, resolved]) != root:
    raise BadEntry(f"image path {path!r} is not inside the image root {root}")
  return resolved


def load_image(root, path, image_size):
  """(pixels, (original width, height)) of image `path` under `root`, resized and cropped to
  `image_size` (None: kept); BadEntry naming the path when it is missing or unreadable."""
  resolved = resolve_image(root, path)
  try:
    with open(resolved, "rb") as f:
      data = f.read()
  except FileNotFoundError as e:
    raise BadEntry(f"image {path!r} does not exist") from e
  except (OSError, ValueError) as e:   # ValueError: a NUL in the path
    raise BadEntry(f"image {path!r} cannot be read ({type(e).__name__}: {e})") from e
  try:
    return image_decode.decode_image(data, image_size)
  except image_decode.UnreadableImage as e:
    raise BadEntry(f"unreadable image {path!r} ({e})") from e


# ---- streaming the annotations --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Chunk:
  """`count` entries of one annotations file from byte `offset`; `first` is the first one's
  index (0-based entry of a JSON array, `array`) or 1-based line number (JSONL)."""
  path: str
  array: bool
  offset: int
  first: int
  count: int

  def where(self, index):
    return f"{self.path} {'entry' if self.array else 'line'} {index}"

  @property
  def name(self):
    return (f"{os.path.basename(self.path)} {'entries' if self.array else 'lines'} from "
            f"{self.first} ({self.count}) at byte {self.offset}")


@dataclasses.dataclass(frozen=True)
class Malformed:
  """An entry that is not valid JSON; `reason` says where and why."""
  reason: str


def annotation_files(path):
  """The annotation files `path` names: the file itself, or a folder's .json/.jsonl files."""
  if os.path.isdir(path):
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if f.endswith(ANNOTATION_SUFFIXES))
    if not files:
      raise FileNotFoundError(f"no {'/'.join(ANNOTATION_SUFFIXES)} files in {path!r}")
    return files
  if not os.path.isfile(path):
    raise FileNotFoundError(f"annotations {path!r} do not exist")
  return [path]


def _array_start(path):
  """The byte offset just after the opening `[` if `path` holds a JSON array, else None."""
  with open(path, "rb") as f:
    head = f.read(4096)
  start = len(codecs.BOM_UTF8) if head.startswith(codecs.BOM_UTF8) else 0
  stripped = head[start:].lstrip()
  if not stripped.startswith(b"["):
    return None
  return len(head) - len(stripped) + 1


class _Window:
  """A str window over a binary file read in blocks, with the byte offset of its cursor.

  Invalid UTF-8 decodes to lone surrogates (and back to the same bytes), so offsets stay
  exact; text holding such bytes is refused when a record is made of it."""

  def __init__(self, f, offset):
    f.seek(offset)
    self._f, self.offset, self.eof = f, offset, False
    self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    self._text, self._pos = "", 0

  def _more(self):
    """Reads one more block, dropping what was consumed; False once the file is exhausted."""
    if self.eof:
      return False
    block = self._f.read(_BLOCK)
    self.eof = not block
    self._text = self._text[self._pos:] + self._decoder.decode(block, final=self.eof)
    self._pos = 0
    return True

  def _consume(self, end):
    self.offset += len(self._text[self._pos:end].encode("utf-8", "surrogateescape"))
    self._pos = end

  def peek(self):
    """The next character after whitespace and commas (consumed); '' at the end of file."""
    while True:
      self._consume(_SEPARATORS.match(self._text, self._pos).end())
      if self._pos < len(self._text):
        return self._text[self._pos]
      if not self._more():
        return ""

  def skip_char(self):
    self._consume(self._pos + 1)

  def value(self):
    """The JSON value at the cursor (consumed), or Malformed."""
    while True:
      try:
        value, end = _DECODER.raw_decode(self._text, self._pos)
        if end < len(self._text) or self.eof:   # a number may go on in the next block
          self._consume(end)
          return value
      except json.JSONDecodeError as e:
        truncated = e.pos >= len(self._text) - 64 or e.msg.startswith("Unterminated string")
        if self.eof or not truncated or len(self._text) - self._pos > _MAX_ENTRY:
          return Malformed(f"malformed JSON at byte {self.offset} ({e.msg}); the rest of the "
                           "array is not read")
      self._more()


def _array_entries(path, offset, count=None):
  """Yields (byte offset, value or Malformed) for up to `count` entries of a JSON array from
  byte `offset`, stopping at `]`, the end of the file, or after a Malformed value."""
  with open(path, "rb") as f:
    window = _Window(f, offset)
    while count is None or count > 0:
      if window.peek() in ("]", ""):
        return
      start, value = window.offset, window.value()
      yield start, value
      if isinstance(value, Malformed):
        return
      count = None if count is None else count - 1


def _parse_line(line):
  try:
    return json.loads(line.decode("utf-8-sig"))   # -sig: a byte-order mark on line 1
  except UnicodeDecodeError as e:
    return Malformed(f"not UTF-8 ({e.reason} at byte {e.start})")
  except json.JSONDecodeError as e:
    return Malformed(f"malformed JSON ({e.msg} at column {e.colno})")


def _jsonl_lines(path, offset, first_line):
  """Yields (byte offset, line number, raw line) of the non-blank lines from byte `offset`."""
  with open(path, "rb") as f:
    f.seek(offset)
    number = first_line
    for line in f:
      if line.strip():
        yield offset, number, line
      offset += len(line)
      number += 1


def _chunks_of(path, array, positions, per_unit):
  """Chunks of `per_unit` entries from (byte offset, index) `positions`; one empty chunk for
  an empty file (so that it is reported)."""
  chunks, count, start = [], 0, None
  for offset, index in positions:
    if count == 0:
      start = (offset, index)
    count += 1
    if count == per_unit:
      chunks.append(Chunk(path, array, start[0], start[1], count))
      count = 0
  if count:
    chunks.append(Chunk(path, array, start[0], start[1], count))
  return chunks or [Chunk(path, array, 0, 0 if array else 1, 0)]


def index_file(path, per_unit=PER_UNIT):
  """The Chunks of one annotations file: a streaming pass that keeps one offset per chunk."""
  start = _array_start(path)
  bar = tqdm.tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, mininterval=1.0,
                  desc=f"indexing {os.path.basename(path)}", dynamic_ncols=True, leave=False)
  with bar:
    if start is None:
      positions = ((offset, number) for offset, number, _ in _jsonl_lines(path, 0, 1))
    else:
      positions = ((offset, i) for i, (offset, _) in enumerate(_array_entries(path, start)))
    chunks = _chunks_of(path, start is not None, _progress(positions, bar), per_unit)
  return chunks


def _progress(positions, bar):
  for offset, index in positions:
    bar.update(offset - bar.n)
    yield offset, index


def chunk_entries(chunk):
  """Yields (index, value or Malformed) of the chunk's entries."""
  if chunk.array:
    for i, (_, value) in enumerate(_array_entries(chunk.path, chunk.offset, chunk.count)):
      yield chunk.first + i, value
    return
  lines = _jsonl_lines(chunk.path, chunk.offset, chunk.first)
  for _, (_, number, line) in zip(range(chunk.count), lines):
    yield number, _parse_line(line)


# ---- records --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, repr=False)
class _Reader:
  """How a unit's entries become records (picklable: `to_document` is a module function)."""
  to_document: Callable
  image_root: str
  image_size: int | None

  def __repr__(self):
    # The same in every process (no function address): `conversion` compares it to resume.
    function = f"{self.to_document.__module__}.{self.to_document.__qualname__}"
    return f"_Reader({function}, {self.image_root!r}, {self.image_size!r})"


def _record(document, reader, meta):
  """The document as an InterleavedRecord: images loaded, sizes and prompt/targets in meta."""
  if not document.parts:
    raise BadEntry("no segments")
  if len(document.targets) != len(document.parts):
    raise ValueError(f"{len(document.targets)} target flags for {len(document.parts)} parts")
  segments, sizes = [], []
  for part in document.parts:
    if isinstance(part, ImageRef):
      pixels, size = load_image(reader.image_root, part.path, reader.image_size)
      segments.append(records.ImageSegment.from_array(pixels))
      sizes.append(size)
    else:
      try:
        part.text.encode("utf-8")
      except UnicodeEncodeError as e:
        raise BadEntry("a text is not valid UTF-8 (a lone surrogate)") from e
      segments.append(part)
  meta = {**meta, **document.meta, **layout_meta(document.targets)}
  for k, (width, height) in enumerate(sizes):
    meta[f"width_{k}"], meta[f"height_{k}"] = width, height
  return records.InterleavedRecord(segments, meta)


def layout_meta(targets):
  """Meta saying which segments are targets (`examples.InterleavedExample` reads it):
  `prompt_segments`, the leading non-targets, and — only when a prompt segment follows a
  target (a multi-turn conversation) — `target_segments`, '1' per target and '0' per prompt."""
  leading = next((i for i, t in enumerate(targets) if t), len(targets))
  meta = {"prompt_segments": leading}
  if not all(targets[leading:]):
    meta["target_segments"] = "".join("1" if t else "0" for t in targets)
  return meta


def _entry_meta(chunk, index, entry):
  meta = {"file": os.path.basename(chunk.path), "entry" if chunk.array else "line": index}
  entry_id = entry.get("id") if isinstance(entry, dict) else None
  if isinstance(entry_id, str) or (type(entry_id) is int and -2**63 <= entry_id < 2**63):
    meta["id"] = entry_id    # (an int msgpack can store)
  return meta


def read_unit(source):
  """One chunk's records and Skips, in file order; `source` = (Chunk, _Reader)."""
  chunk, reader = source
  if chunk.count == 0:
    yield conversion.Skip(f"{chunk.path}: empty (no entries)")
    return
  for index, entry in chunk_entries(chunk):
    if isinstance(entry, Malformed):
      yield conversion.Skip(f"{chunk.where(index)}: {entry.reason}")
      continue
    try:
      record = _record(reader.to_document(entry), reader, _entry_meta(chunk, index, entry))
    except BadEntry as e:
      yield conversion.Skip(f"{chunk.where(index)}: {e}")
      continue
    yield record


def convert(to_document, annotations, image_root, out_dir, split, image_size=None, workers=1,
            per_unit=PER_UNIT):
  """Converts the entries of `annotations` (a JSON array or JSONL file, or a folder of them)
  into split `split` of `out_dir`, one records shard per `per_unit` entries (see
  `conversion.convert`: parallel, resumable); returns the WriteSummary.

  Args:
    to_document: a module-level function, entry -> Document, raising BadEntry.
    annotations: the annotations file or folder.
    image_root: the folder image paths are relative to.
    out_dir, split: where to write.
    image_size: the square size images are resized and centre-cropped to (None: kept).
    workers: processes converting units at once.
    per_unit: entries per unit.
  """
  if per_unit < 1:
    raise ValueError(f"per_unit must be >= 1, got {per_unit}")
  if not os.path.isdir(image_root or ""):
    raise FileNotFoundError(f"image directory {image_root!r} does not exist")
  reader = _Reader(to_document, image_root, image_size)
  units = [conversion.Unit(chunk.name, (chunk, reader))
           for path in annotation_files(annotations) for chunk in index_file(path, per_unit)]
  return conversion.convert(units, read_unit, out_dir, split, workers,
                            what=f"units of {per_unit} entries")


def prepare(name, to_document, out_dir, options):
  """A `prepare-data` source: --annotations, --source_dir (the image root), --split,
  --image_size and --workers for `convert`."""
  annotations, image_root = sources.require_options(options, name, "annotations", "source_dir")
  return {options.split: convert(to_document, annotations, image_root, out_dir, options.split,
                                 options.image_size, options.workers)}
