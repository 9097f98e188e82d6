"""Fashion-MNIST as records for the four stages of the STARFlow2 demo (interleaved format).

Splits `{kind}_{train|test}`, one kind per stage's data:

  text        stage 0: text alone, for the demo's tiny language model: captions, questions
              with their answers, a caption then a question about it, interleaved sentences
  generate    stage 1: "a photo of a sneaker" -> image (the caption is the prompt)
  understand  stage 2: image, "what is in this picture?" -> "a sneaker."
  interleaved stage 3: "a sneaker:" -> image, "and a bag:", image, "."
  mixture     stage 3: generate, understand and interleaved records in turn

Records carry meta "label" (the class of the first image; the understanding answer) and
"prompt_segments". The vocabulary of every text here is `WORDS`.
"""

import os

import numpy as np
import tqdm

from data_pipelines import records
from data_pipelines import text
from data_pipelines import writers
from demos import fashion_mnist

QUESTION = "what is in this picture?"
KINDS = ("text", "generate", "understand", "interleaved", "mixture")


def caption(label):
  return fashion_mnist.caption_for(label)


def answer(label):
  return f"a {fashion_mnist.CLASS_NAMES[label]}."


def _names(label):
  return f"a {fashion_mnist.CLASS_NAMES[label]}"


def generate_record(image, label):
  return records.InterleavedRecord(
      (records.TextSegment(caption(label)), records.ImageSegment.from_array(image)),
      {"label": int(label), "prompt_segments": 1})


def understand_record(image, label):
  return records.InterleavedRecord(
      (records.ImageSegment.from_array(image), records.TextSegment(QUESTION),
       records.TextSegment(answer(label))),
      {"label": int(label), "prompt_segments": 2})


def interleaved_record(images, labels):
  (a, b), (la, lb) = images, labels
  return records.InterleavedRecord(
      (records.TextSegment(f"{_names(la)}:"), records.ImageSegment.from_array(a),
       records.TextSegment(f"and {_names(lb)}:"), records.ImageSegment.from_array(b),
       records.TextSegment(".")),
      {"label": int(la), "second_label": int(lb), "prompt_segments": 1})


def described_image(label, rng):
  """An image span that holds noisy evidence of its class as text, what a VLM "sees" in a
  picture: 1–8 class names, each the true one with probability 0.6, else a random one."""
  count = len(fashion_mnist.CLASS_NAMES)
  names = [fashion_mnist.CLASS_NAMES[label if rng.random() < 0.6 else rng.integers(count)]
           for _ in range(rng.integers(1, 9))]
  return f"<|vision_start|> {' '.join(names)} <|vision_end|>"


def text_record(rng):
  """One of the sentence shapes the later stages use, with random classes. Images are spans
  that hold noisy votes for their class, so the language model learns where spans open and
  close, what a captioned span will hold (its state at `<|vision_start|>` knows the class,
  which stage 1's flow reads), and to answer a question by weighing what is inside a span
  (stage 2 then only has to make each patch of a picture read like a vote for its class)."""
  la, lb = (int(v) for v in rng.integers(0, len(fashion_mnist.CLASS_NAMES), 2))
  image_a, image_b = described_image(la, rng), described_image(lb, rng)
  shapes = (f"{caption(la)} {image_a}", f"{image_a} {QUESTION} {answer(la)}",
            f"{caption(la)}. {QUESTION} {answer(la)}",
            f"{_names(la)}: {image_a} and {_names(lb)}: {image_b} .")
  return records.InterleavedRecord((records.TextSegment(shapes[rng.integers(len(shapes))]),),
                                   {"label": la, "prompt_segments": 0})


TEXTS = ([caption(k) for k in range(10)] + [QUESTION] + [answer(k) for k in range(10)]
         + ["and", ":"])
WORDS = text.vocabulary(TEXTS)


# Records per kind, as a fraction of the split's images (the demo's stages 0 and 3 see far
# fewer examples than there are images).
FRACTION = {"text": 1 / 3, "generate": 1, "understand": 1, "interleaved": 1 / 3, "mixture": 1 / 2}


def _records(kind, images, labels, seed):
  rng = np.random.default_rng(seed)
  n = len(images)
  if kind == "text":
    for _ in range(n):
      yield text_record(rng)
  elif kind == "generate":
    for image, label in zip(images, labels):
      yield generate_record(image, label)
  elif kind == "understand":
    for image, label in zip(images, labels):
      yield understand_record(image, label)
  elif kind == "interleaved":
    for _ in range(n):
      i, j = rng.integers(0, n, 2)
      yield interleaved_record((images[i], images[j]), (labels[i], labels[j]))
  elif kind == "mixture":
    streams = [_records(k, images, labels, seed + 1 + i)
               for i, k in enumerate(("generate", "understand", "interleaved"))]
    for i in range(n):
      yield next(streams[i % 3])
  else:
    raise ValueError(f"unknown record kind {kind!r}: one of {KINDS}")


def _count(kind, n):
  return max(1, int(n * FRACTION[kind]))


def _limited(kind, images, labels, seed):
  for i, record in enumerate(_records(kind, images, labels, seed)):
    if i >= _count(kind, len(images)):
      return
    yield record


def write_stage_records(source_dir=fashion_mnist.DEFAULT_SOURCE_DIR, out_dir="data/fm_stages",
                        limit=None):
  """Writes every `{kind}_{split}` of `KINDS` to `out_dir` (ArrayRecord + summary JSON);
  returns {name: WriteSummary}."""
  summaries = {}
  loaded = {split: fashion_mnist.load_idx_split(source_dir, split)
            for split in fashion_mnist.SPLITS}
  for split, (images, labels) in loaded.items():
    images, labels = images[:limit], labels[:limit]
    for k, kind in enumerate(KINDS):
      name = f"{kind}_{split}"
      stream = tqdm.tqdm(_limited(kind, images, labels, seed=k), desc=f"fashion-mnist {name}",
                         total=_count(kind, len(images)))
      summary = writers.WriteSummary()
      paths = writers.write_records(stream, out_dir, name, num_shards=1)
      summary.written = stream.n
      summary.files = [os.path.basename(p) for p in paths]
      writers.save_summary(summary, out_dir, name)
      summaries[name] = summary
  return summaries


def record_source(out_dir, options):
  """The `fashion_mnist_stages` record source (`starflow2 prepare-data --source
  fashion_mnist_stages`): every stage's records from the idx files in `options.source_dir`."""
  return write_stage_records(options.source_dir or fashion_mnist.DEFAULT_SOURCE_DIR, out_dir)
