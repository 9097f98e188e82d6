"""LLaVA-style conversation JSON -> interleaved records: human turns prompt, model turns targets.

An entry (LLaVA-Instruct, ShareGPT4V, Cambrian) is

  {"id": ..., "image": "coco/train2017/1.jpg" | [path, ...] (optional),
   "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                     {"from": "gpt", "value": "A cat."}, ...]}

Each turn's text becomes text segments in turn order, kept raw (no role prefix, no chat
template: the tokenizer's business). An `<image>` placeholder splits its turn's text and the
next image goes where it stood (the whitespace around the placeholder dropped); an entry with
images but no placeholder gets them first, before the first turn (LLaVA's convention). An
entry without `image` is a text-only conversation and is kept. Turns from `human`, `user` or
`system` are prompt, turns from `gpt` or `assistant` targets (any case; an image takes its
turn's side); with several turns a prompt follows a target, which meta `target_segments`
records (`json_input.layout_meta`).

Skipped (`json_input.py` names the file and entry): a placeholder count other than the
number of images (unless zero), a turn with an unknown role, no text or no value, an entry
with no model turn (nothing to train), a bad image path, plus what `json_input.py` skips.
"""

import re

from data_pipelines import json_input
from data_pipelines import records

PLACEHOLDER = "<image>"
PROMPT_ROLES = ("human", "user", "system")
TARGET_ROLES = ("gpt", "assistant")
_SPLIT = re.compile(r"\s*" + re.escape(PLACEHOLDER) + r"\s*")


def _image_paths(entry):
  """The entry's image paths: `image` as a string or a list of them (none when absent)."""
  images = entry.get("image")
  if images is None:
    return []
  images = [images] if isinstance(images, str) else images
  if not isinstance(images, list) or not images:
    raise json_input.BadEntry(f"'image' is {entry.get('image')!r}, not a path or a list of paths")
  return images


def _turns(entry):
  """[(is target, text)] of the entry's conversation, checked."""
  turns = entry.get("conversations")
  if not isinstance(turns, list) or not turns:
    raise json_input.BadEntry("no 'conversations' list")
  checked = []
  for t, turn in enumerate(turns):
    role = turn.get("from") if isinstance(turn, dict) else None
    role = role.lower() if isinstance(role, str) else role
    if role not in PROMPT_ROLES + TARGET_ROLES:
      raise json_input.BadEntry(f"turn {t}: 'from' is {role!r}, not one of "
                                f"{', '.join(PROMPT_ROLES + TARGET_ROLES)}")
    checked.append((role in TARGET_ROLES, json_input.text(turn.get("value"),
                                                          f"text of turn {t} ({role})")))
  if not any(target for target, _ in checked):
    raise json_input.BadEntry(f"no {' or '.join(TARGET_ROLES)} turn (nothing to train)")
  return checked


def to_document(entry):
  """One conversation entry as a json_input.Document (see the module docstring)."""
  entry = json_input.require_object(entry)
  images, turns = _image_paths(entry), _turns(entry)
  placeholders = sum(value.count(PLACEHOLDER) for _, value in turns)
  if placeholders and placeholders != len(images):
    raise json_input.BadEntry(f"{placeholders} {PLACEHOLDER} placeholders for {len(images)} "
                              "images")
  parts = [json_input.ImageRef(path) for path in images] if not placeholders else []
  targets = [False] * len(parts)
  pending = iter(images)
  for target, value in turns:
    for k, piece in enumerate(_SPLIT.split(value)):
      if k:
        parts.append(json_input.ImageRef(next(pending)))
        targets.append(target)
      if piece:
        parts.append(records.TextSegment(piece))
        targets.append(target)
  return json_input.Document(parts, targets)


def source(out_dir, options):
  """`prepare-data --source llava`: --annotations (the conversation JSON or JSONL),
  --source_dir (the image root), --split, --image_size, --workers."""
  return json_input.prepare("llava", to_document, out_dir, options)
