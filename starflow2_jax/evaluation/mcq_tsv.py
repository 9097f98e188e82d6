"""`mcq_tsv`: multiple-choice visual questions from the TSV files VLMEvalKit reads (MMBench,
SEED-Bench, AI2D, MMMU), asked as VLMEvalKit asks them and scored by its exact-matching rule.

A row has `index`, `question`, optionally `hint`, one column per option letter (`A`, `B`, …;
an empty cell means the row has no such option), `answer` (the right letter), optionally
`category`, and `image`: a base64 image, a list of them (`['…', '…']`), or — a value of at
most 64 characters — the `index` of the row whose image it shares (as VLMEvalKit reads it).
Empty cells are missing values exactly where pandas (VLMEvalKit's reader) would see NaN.

The prompt is VLMEvalKit's `ImageMCQDataset.build_prompt`: the images, then
`Hint: …` (if any), `Question: …`, `Options:` with one `X. text` line per option and the
instruction to pick one. The model answers greedily; `extract_choice` reads the letter the
way VLMEvalKit's `can_infer` does (a lone option letter near the end of the answer, "the
answer is X", else the one option whose text the answer contains). No letter is a wrong
answer, counted in `unanswered`. Rows the layout cannot hold (too many images or positions),
with an unreadable image or without options are skipped and counted in `skipped`.
"""

import ast
import base64
import collections
import csv
import json
import os
import re
import string
import sys

import jax
import numpy as np
from PIL import Image

from data_pipelines import examples
from data_pipelines import image_decode
from starflow2_jax.sampling import prompts

REQUIRED_COLUMNS = ("index", "question", "answer", "image")
# The strings pandas.read_csv reads as NaN by default: VLMEvalKit drops such options and hints.
NA_STRINGS = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
# An `image` cell this short is another row's index (VLMEvalKit's space saving).
MAX_REFERENCE_LENGTH = 64
_PUNCTUATION = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
_ANSWER_IS = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([A-Z])\**")


# ---- reading the TSV ------------------------------------------------------------------------

def read_rows(path):
  """The rows of a VLMEvalKit TSV as dicts of strings; errors name the file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"mcq_tsv: no TSV file at {path!r}")
  csv.field_size_limit(min(sys.maxsize, 2**31 - 1))    # base64 images are long fields
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f, delimiter="\t")
    columns = reader.fieldnames or []
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
      raise ValueError(f"mcq_tsv: {path!r} has no column {', '.join(missing)} "
                       f"(columns: {columns})")
    if "A" not in columns:
      raise ValueError(f"mcq_tsv: {path!r} has no option columns A, B, … (columns: {columns})")
    return list(reader)


def is_missing(value):
  """Whether a cell is a missing value (pandas' NaN strings; a short row's absent cell)."""
  return value is None or value in NA_STRINGS


def options_of(row):
  """{letter: text} of the options a row has, in letter order."""
  return {letter: row[letter] for letter in string.ascii_uppercase
          if letter in row and not is_missing(row[letter])}


def build_prompt(row):
  """The question text VLMEvalKit's `ImageMCQDataset.build_prompt` writes for a row."""
  text = "" if is_missing(row.get("hint")) else f"Hint: {row['hint']}\n"
  text += f"Question: {row['question']}\n"
  options = options_of(row)
  if options:
    text += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items())
    text += "Please select the correct answer from the options above. \n"
  return text


def encoded_images(row, rows_by_index):
  """The base64 strings of a row's images: its own, or those of the row it references."""
  value = row["image"] or ""
  if 0 < len(value) <= MAX_REFERENCE_LENGTH:
    if value not in rows_by_index:
      raise ValueError(f"image refers to row {value!r}, which is not in the file")
    value = rows_by_index[value]["image"] or ""
  if len(value) > 1 and value[0] == "[" and value[-1] == "]":
    return [str(v) for v in ast.literal_eval(value)]
  return [value] if value else []


def decode_image(encoded, image_shape):
  """A base64 image as uint8 [H, W, C] of the layout: shorter side resized, centre kept."""
  h, w, c = image_shape
  if h != w:
    raise ValueError(f"mcq_tsv reads images into square layouts only, not {image_shape}")
  pixels, _ = image_decode.decode_image(base64.b64decode(encoded), h)
  mode = "L" if c == 1 else "RGB"
  return np.asarray(Image.fromarray(pixels).convert(mode), np.uint8).reshape(h, w, c)


# ---- reading the answer ---------------------------------------------------------------------

def choice_by_letter(text, options):
  """The option letter an answer names: exactly one option letter among its words (VLMEvalKit
  splits at `.()[],:;!*#{}` and whitespace), standing in the last four words; else "the
  answer is X"."""
  words = text.translate(_PUNCTUATION).split()
  named = [letter for letter in options if letter in words]
  if len(named) == 1 and words.index(named[0]) > len(words) - 5:
    return named[0]
  match = _ANSWER_IS.search(text)
  return match.group(1) if match and match.group(1) in options else None


def choice_by_text(text, options):
  """The one option whose text (case-insensitive) the answer contains; None when none or
  several do, or when the answer is over twice as long as all option texts together."""
  text = text.lower()
  if len(text) > 2 * sum(len(v) for v in options.values()):
    return None
  found = [letter for letter, option in options.items() if option.lower() in text]
  return found[0] if len(found) == 1 else None


def extract_choice(text, options):
  """The option letter a generated answer picks (VLMEvalKit's `can_infer`), or None."""
  return choice_by_letter(text, options) or choice_by_text(text, options)


# ---- asking the model -----------------------------------------------------------------------

def prompt_size(layout, tokenizer, prompt):
  """(positions, images) a prompt takes in the layout, laid out as the sampler lays it."""
  builder = examples.SequenceBuilder(layout)
  for segment in prompt:
    if isinstance(segment, str):
      builder.add_text(tokenizer.ids(segment), target=False)
    else:
      builder.add_image(segment, target=False)
  return len(builder.ids), len(builder.images)


def question(task, row, rows_by_index):
  """(prompt segments, None) for a row, or (None, why it is skipped)."""
  if not options_of(row):
    return None, "no options"
  try:
    images = [decode_image(e, task.layout.image_shape)
              for e in encoded_images(row, rows_by_index)]
  except (ValueError, SyntaxError, image_decode.UnreadableImage) as e:
    return None, f"unreadable image: {e}"
  prompt = images + [build_prompt(row)]
  positions, num_images = prompt_size(task.layout, task.tokenizer, prompt)
  if positions > task.layout.max_length or num_images > task.layout.max_images:
    return None, (f"{positions} positions and {num_images} images; the layout holds "
                  f"{task.layout.max_length} and {task.layout.max_images}")
  return prompt, None


def answer_rows(context, rows, rows_by_index, rng, batch_size, max_new):
  """[(generated text or None, why the row is skipped or None)], asking `batch_size` rows
  at a time (one batch's images decoded at once). Questions without an image go in a batch
  of their own, so image questions are always read at the understanding noise level."""
  generator = prompts.generator_for(context.task, guidance_weight=None, text_temperature=0.0,
                                    max_new=max_new)
  out = []
  for start in range(0, len(rows), batch_size):
    asked = [question(context.task, row, rows_by_index) for row in rows[start:start + batch_size]]
    texts = [None] * len(asked)
    for has_image in (True, False):
      chosen = [i for i, (prompt, _) in enumerate(asked)
                if prompt is not None and prompts.is_understanding(prompt) == has_image]
      if chosen:
        results = generator.generate(context.params, [asked[i][0] for i in chosen],
                                     jax.random.fold_in(rng, 2 * start + int(has_image)))
        for i, result in zip(chosen, results):
          texts[i] = result.text
    out += [(text, why) for text, (_, why) in zip(texts, asked)]
  return out


# ---- the evaluator --------------------------------------------------------------------------

def score(records):
  """Accuracy over the asked questions, overall and per category, with the counts."""
  asked = [r for r in records if r["skipped"] is None]
  result = dict(num_questions=len(asked), skipped=len(records) - len(asked),
                unanswered=sum(r["choice"] is None for r in asked),
                accuracy=float(np.mean([r["correct"] for r in asked])) if asked else 0.0)
  by_category = collections.defaultdict(list)
  for r in asked:
    if r["category"] is not None:
      by_category[r["category"]].append(r["correct"])
  for category, correct in sorted(by_category.items()):
    result[f"accuracy/{category}"] = float(np.mean(correct))
  return result


def evaluate(context, tsv, limit=None, batch_size=16, max_new=None):
  """Asks the first `limit` rows (default all) of `tsv` in batches of `batch_size`, each
  answer at most `max_new` tokens (default `config.sample.max_new`); writes
  `predictions.jsonl` under `context.output_dir()`."""
  rows = read_rows(tsv)
  rows_by_index = {row["index"]: row for row in rows}
  rows = rows[:limit] if limit else rows
  answers = answer_rows(context, rows, rows_by_index, context.rng(), batch_size,
                        max_new or context.config.sample.max_new)
  records = [_record(row, text, why) for row, (text, why) in zip(rows, answers)]
  path = os.path.join(context.output_dir(), "predictions.jsonl")
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  return dict(score(records), predictions=path)


def _record(row, text, skipped):
  """One prediction line: the question, the generated text and the letter read from it."""
  options = options_of(row)
  choice = None if text is None else extract_choice(text, options)
  return dict(index=row["index"], category=None if is_missing(row.get("category"))
              else row["category"], question=row["question"], options=options,
              answer=row["answer"], prediction=text, choice=choice,
              correct=choice is not None and choice == (row["answer"] or "").strip(),
              skipped=skipped)
