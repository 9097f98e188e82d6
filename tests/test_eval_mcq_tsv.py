"""The `mcq_tsv` evaluator (evaluation/mcq_tsv.py): VLMEvalKit's prompt for a row, its answer
extraction on hand-written outputs, images as the TSV stores them, and accuracy (overall, per
category, unanswered, skipped) from a generator whose answers the test writes; then one run
through the tiny model."""

import base64
import csv
import io
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from experiments import fashion_mnist_stages
from starflow2_jax.evaluation import evaluators
from starflow2_jax.evaluation import mcq_tsv
from starflow2_jax.sampling import prompts
from starflow2_jax.training import pretzel_task

COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]


def tiny_task():
  """The demo's tiny stage-3 Pretzel (28×28 greyscale images, a word tokenizer)."""
  return pretzel_task.PretzelTask(fashion_mnist_stages.get_config("stage3-tiny"))


def context_for(task, params, workdir, name, step=3):
  """The EvalContext `evaluators.run` hands the config entry `name`; the held-out metrics
  are never asked for."""
  def no_metrics(**_):
    raise AssertionError("these evaluators do not read held-out metrics")
  return evaluators.EvalContext(config=task.config, task=task, params=params, step=step,
                                workdir=str(workdir), data_dir="", held_out_metrics=no_metrics,
                                name=name)


def png_base64(pixels):
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return base64.b64encode(buffer.getvalue()).decode()


def picture(seed, size=(20, 40, 3)):
  return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def write_tsv(path, rows, columns=COLUMNS):
  """A VLMEvalKit-style TSV: one dict per row, absent fields empty."""
  with open(path, "w", newline="") as f:
    writer = csv.writer(f, delimiter="\t")
    writer.writerow(columns)
    writer.writerows([[row.get(c, "") for c in columns] for row in rows])
  return str(path)


def row(index, answer, category="", image=None, **fields):
  return dict(dict(index=str(index), question=f"question {index}?", A="cat", B="dog",
                   C="red bird", answer=answer, category=category,
                   image=png_base64(picture(index)) if image is None else image), **fields)


@pytest.fixture(scope="module")
def task():
  return tiny_task()


# ---- the prompt -----------------------------------------------------------------------------

def test_the_prompt_is_vlmevalkits():
  with_hint = dict(question="What is sold here?", hint="The picture shows a shop.", A="shoes",
                   B="bags", C="", D="coats", E="nan")
  assert mcq_tsv.build_prompt(with_hint) == (
      "Hint: The picture shows a shop.\n"
      "Question: What is sold here?\n"
      "Options:\n"
      "A. shoes\n"
      "B. bags\n"
      "D. coats\n"
      "Please select the correct answer from the options above. \n")
  for missing_hint in ("", "nan", "NaN", None):
    assert mcq_tsv.build_prompt(dict(question="Q?", hint=missing_hint, A="x", B="y")) == (
        "Question: Q?\nOptions:\nA. x\nB. y\n"
        "Please select the correct answer from the options above. \n")
  assert mcq_tsv.build_prompt(dict(question="Q?", A="", B="NaN")) == "Question: Q?\n"


# ---- the answer -----------------------------------------------------------------------------

OPTIONS = {"A": "cat", "B": "dog", "C": "red bird"}


@pytest.mark.parametrize("text, choice", [
    ("A", "A"),
    ("(B)", "B"),
    ("C.", "C"),
    ("B) dog", "B"),
    ("The answer is B", "B"),
    ("Answer: (C) red bird", "C"),
    ("I think the correct answer is **A** since the animal clearly meows at us", "A"),
    ("dog", "B"),
    ("It is a red bird", "C"),
    # VLMEvalKit reads a lone letter only among the last four words, then option text only
    # in answers at most twice as long as the options together:
    ("B is right because the dog in the picture barks loudly", None),
    ("A or B", None),            # two letters: ambiguous
    ("cat or dog", None),        # two option texts: ambiguous
    ("a", None),                 # letters are upper case
    ("E", None),                 # not an option
    ("", None),
])
def test_extract_choice(text, choice):
  assert mcq_tsv.extract_choice(text, OPTIONS) == choice


# ---- reading the file -----------------------------------------------------------------------

def test_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere.tsv"):
    mcq_tsv.read_rows(str(tmp_path / "nowhere.tsv"))
  path = write_tsv(tmp_path / "no_answer.tsv", [row(1, "A")],
                   [c for c in COLUMNS if c != "answer"])
  with pytest.raises(ValueError, match="no_answer.tsv.*answer"):
    mcq_tsv.read_rows(path)


def test_images_are_decoded_referenced_and_fitted_to_the_layout(task):
  half = np.zeros((20, 40, 3), np.uint8)
  half[:, 20:] = 255                     # left half black, right half white
  rows = {"1": dict(index="1", image=png_base64(half)), "2": dict(index="2", image="1"),
          "3": dict(index="3", image=str([png_base64(half), png_base64(picture(0))]))}
  assert mcq_tsv.encoded_images(rows["2"], rows) == [rows["1"]["image"]]
  assert len(mcq_tsv.encoded_images(rows["3"], rows)) == 2
  assert mcq_tsv.encoded_images(dict(index="4", image=""), rows) == []
  pixels = mcq_tsv.decode_image(rows["1"]["image"], task.layout.image_shape)
  assert pixels.shape == task.layout.image_shape == (28, 28, 1) and pixels.dtype == np.uint8
  # The shorter side is scaled to 28 (the image to 56 × 28) and the centre 28 columns kept:
  # the left half of the crop is black, the right half white.
  assert pixels[:, :10].max() < 30 and pixels[:, -10:].min() > 225
  with pytest.raises(ValueError, match="not in the file"):
    mcq_tsv.encoded_images(dict(index="5", image="99"), rows)


# ---- scoring --------------------------------------------------------------------------------

class StubGenerator:
  """Answers each prompt with the text `answers` gives its question; records the calls."""

  def __init__(self, answers):
    self.answers, self.prompts, self.overrides = answers, [], None

  def generate(self, params, batch, rng):
    self.prompts += batch
    return [prompts.Result(list(p), [self.answers[p[-1].split("Question: ")[1].split("\n")[0]]])
            for p in batch]


def test_accuracy_counts_from_known_answers(task, tmp_path, monkeypatch):
  rows = [
      row(1, "A", "x"),                              # "A": right
      row(2, "B", "x"),                              # "The answer is (B).": right
      row(3, "C", "y"),                              # "dog" = B: wrong
      row(4, "A", "y"),                              # "A or B": unanswered, wrong
      row(5, "A", "y", A="", B="", C=""),            # no options: skipped
      row(6, "B", "x", image="1"),                   # row 1's image; "B": right
      row(7, "A", "z", hint=" ".join(["long"] * 80)),  # longer than the layout: skipped
      row(8, "B", "x"),                              # beyond the limit
  ]
  answers = {"question 1?": "A", "question 2?": "The answer is (B).", "question 3?": "dog",
             "question 4?": "A or B", "question 6?": "B", "question 7?": "B"}
  stub = StubGenerator(answers)

  def generator_for(task_, **overrides):
    assert task_ is task
    stub.overrides = overrides
    return stub
  monkeypatch.setattr(prompts, "generator_for", generator_for)
  path = write_tsv(tmp_path / "bench.tsv", rows)
  context = context_for(task, params=None, workdir=tmp_path, name="")
  entry = dict(type="mcq_tsv", every=0, tsv=path, limit=7, batch_size=2, max_new=7)
  result = evaluators.run({"bench": entry}, context)["bench"]

  assert result["accuracy"] == pytest.approx(3 / 5)
  assert result["accuracy/x"] == 1.0 and result["accuracy/y"] == 0.0
  assert "accuracy/z" not in result                  # its only question was skipped
  assert (result["num_questions"], result["unanswered"], result["skipped"]) == (5, 1, 2)
  assert stub.overrides == dict(guidance_weight=None, text_temperature=0.0, max_new=7)
  # What the model saw: the row's images, then VLMEvalKit's prompt.
  asked = {p[-1].split("Question: ")[1].split("\n")[0]: p for p in stub.prompts}
  assert sorted(asked) == ["question 1?", "question 2?", "question 3?", "question 4?",
                           "question 6?"]
  assert asked["question 1?"][-1] == mcq_tsv.build_prompt(rows[0])
  first = mcq_tsv.decode_image(rows[0]["image"], task.layout.image_shape)
  for question in ("question 1?", "question 6?"):
    assert len(asked[question]) == 2
    np.testing.assert_array_equal(asked[question][0], first)
  assert not np.array_equal(asked["question 2?"][0], first)
  # The predictions file: one line per row read, with the text and the letter read from it.
  with open(result["predictions"]) as f:
    lines = [json.loads(line) for line in f]
  assert result["predictions"] == os.path.join(
      tmp_path, "eval", "bench", "step_0000003", "predictions.jsonl")
  assert [line["index"] for line in lines] == [str(i) for i in range(1, 8)]
  assert [line["choice"] for line in lines] == ["A", "B", "B", None, None, "B", None]
  assert [line["correct"] for line in lines] == [True, True, False, False, False, True, False]
  assert lines[1]["prediction"] == "The answer is (B)."
  assert lines[4]["skipped"] == "no options" and "positions" in lines[6]["skipped"]
  assert evaluators.scalars(result)["accuracy"] == pytest.approx(0.6)


def test_runs_through_the_tiny_model(task, tmp_path):
  """End to end with random parameters: the answers are the model's greedy text."""
  params = jax.jit(task.init_params)(jax.random.key(0))
  rows = [row(1, "A", "x"), row(2, "B", "y"), row(3, "C", "y")]
  path = write_tsv(tmp_path / "tiny.tsv", rows)
  result = mcq_tsv.evaluate(context_for(task, params, tmp_path, "tiny"), tsv=path,
                            batch_size=4, max_new=3)
  with open(result["predictions"]) as f:
    lines = [json.loads(line) for line in f]
  assert result["num_questions"] == 3 and result["skipped"] == 0
  assert all(isinstance(line["prediction"], str) and line["prediction"] for line in lines)
  assert [line["choice"] for line in lines] == [
      mcq_tsv.extract_choice(line["prediction"], line["options"]) for line in lines]
  assert result["accuracy"] == pytest.approx(np.mean([line["correct"] for line in lines]))
  assert result["unanswered"] == sum(line["choice"] is None for line in lines)
