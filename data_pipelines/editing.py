"""Image-editing triplets -> interleaved records: [source image, instruction] prompt, edited
image target.

A JSONL file (or a JSON array), one triplet an entry, image paths relative to the image root:

  {"source": "in/0001.png", "instruction": "make the sky purple", "target": "out/0001.png"}

Each field is read from the first of its names present (the names editing sets ship with):
SOURCE_KEYS, INSTRUCTION_KEYS, TARGET_KEYS below. The record is [source image, instruction
text, edited image] with `prompt_segments` 2. Skipped (`json_input.py` names the file and
line): a missing field or an empty instruction, a bad source or edited image, plus what
`json_input.py` skips.
"""

from data_pipelines import json_input
from data_pipelines import records

SOURCE_KEYS = ("source", "source_image", "input_image", "input")
INSTRUCTION_KEYS = ("instruction", "edit_instruction", "edit", "prompt")
TARGET_KEYS = ("target", "target_image", "edited_image", "output_image", "output")


def to_document(entry):
  """One triplet as a json_input.Document: source and instruction prompt, edit target."""
  entry = json_input.require_object(entry)
  source = json_input.field(entry, SOURCE_KEYS, "source image")
  instruction = json_input.text(json_input.field(entry, INSTRUCTION_KEYS, "instruction"),
                                "instruction")
  target = json_input.field(entry, TARGET_KEYS, "edited image")
  return json_input.Document(
      [json_input.ImageRef(source), records.TextSegment(instruction), json_input.ImageRef(target)],
      [False, False, True])


def source(out_dir, options):
  """`prepare-data --source editing`: --annotations (the triplet JSONL), --source_dir (the
  image root), --split, --image_size, --workers."""
  return json_input.prepare("editing", to_document, out_dir, options)
