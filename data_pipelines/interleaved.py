"""Interleaved documents (an ordered list of text and image entries) -> interleaved records.

A JSONL file (or a JSON array), one document an entry, image paths relative to the image root:

  {"segments": [{"text": "Step 1: whisk the eggs."}, {"image": "howto/12/1.jpg"}, ...],
   "prompt_segments": 1}

A segment is `{"text": str}` or `{"image": path}`; the typed form `{"type": "text" | "image",
"text" | "image" | "value": ...}` (CoMM-like) is read too. Segments keep their order; the
first `prompt_segments` (optional, default 0: everything is trained) are the prompt, the rest
targets. Skipped (`json_input.py` names the file and line): a document with no segments, a
segment that is neither text nor image or has empty text, a `prompt_segments` that leaves no
target, a bad image, plus what `json_input.py` skips.
"""

from data_pipelines import json_input
from data_pipelines import records

KINDS = ("text", "image")


def _part(i, item):
  """Segment `i` as a TextSegment or an ImageRef."""
  if not isinstance(item, dict):
    raise json_input.BadEntry(f"segment {i} is {type(item).__name__}, not an object")
  kind = item.get("type")
  if kind is None:
    present = [k for k in KINDS if k in item]
    if len(present) != 1:
      raise json_input.BadEntry(f"segment {i} has keys {sorted(item)}: it needs one of "
                                "'text', 'image' (or a 'type')")
    kind = present[0]
  if kind not in KINDS:
    raise json_input.BadEntry(f"segment {i}: type {kind!r} is not 'text' or 'image'")
  value = item[kind] if kind in item else item.get("value")
  if kind == "image":
    return json_input.ImageRef(value)
  return records.TextSegment(json_input.text(value, f"text of segment {i}"))


def to_document(entry):
  """One document as a json_input.Document (see the module docstring)."""
  entry = json_input.require_object(entry)
  items = entry.get("segments")
  if not isinstance(items, list) or not items:
    raise json_input.BadEntry("no segments")
  parts = [_part(i, item) for i, item in enumerate(items)]
  prompt = entry.get("prompt_segments", 0)
  if type(prompt) is not int or not 0 <= prompt < len(parts):
    raise json_input.BadEntry(f"prompt_segments {prompt!r} is not an int in [0, {len(parts)}) "
                              "(at least one target)")
  return json_input.Document(parts, [i >= prompt for i in range(len(parts))])


def source(out_dir, options):
  """`prepare-data --source interleaved`: --annotations (the document JSONL), --source_dir
  (the image root), --split, --image_size, --workers."""
  return json_input.prepare("interleaved", to_document, out_dir, options)
