"""The editing converter: (source image, instruction, edited image) JSONL -> records whose
source and instruction are the prompt and edited image the target; the field aliases; bad
triplets named by line and skipped."""

import json

import numpy as np
import pytest

import converter_helpers as helpers
from data_pipelines import editing
from data_pipelines import json_input
from data_pipelines import sources
from starflow2_jax import cli


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """An image root and `edits.jsonl`: three good triplets (canonical names, then aliases)
  among bad ones."""
  root = tmp_path_factory.mktemp("editing")
  images = root / "images"
  src0 = helpers.save_image(images / "src" / "0.png", 0, (10, 16, 3))
  out0 = helpers.save_image(images / "out" / "0.png", 1, (12, 12, 3))
  src1 = helpers.save_image(images / "src" / "1.png", 2, (20, 8, 3))
  out1 = helpers.save_image(images / "out" / "1.png", 3, (8, 8, 3))
  helpers.save_image(images / "out" / "bad.png", 4, (16, 16, 3), truncate=True)
  helpers.save_image(root / "outside.png", 5, (8, 8, 3))
  annotations = helpers.write_lines(root / "edits.jsonl", [
      {"source": "src/0.png", "instruction": "make it blue", "target": "out/0.png"},
      {"id": 7, "input_image": "src/1.png", "edit_instruction": "flip it",
       "edited_image": "out/1.png"},
      {"source": "src/0.png", "target": "out/0.png"},                             # 3
      {"source": "src/0.png", "instruction": "  ", "target": "out/0.png"},        # 4
      {"source": "src/0.png", "instruction": "sharpen", "target": "out/bad.png"},  # 5
      '{"source": "src/0.png",',                                                   # 6
      "",
      {"source": "src/0.png", "instruction": "x", "target": "../outside.png"},    # 8
      {"source": "src/9.png", "instruction": "x", "target": "out/0.png"},         # 9
      {"source_image": "src/1.png", "prompt": "crop it", "output": "out/0.png"},
  ])
  want = [[src0, "make it blue", out0], [src1, "flip it", out1], [src1, "crop it", out0]]
  return dict(root=root, images=images, annotations=annotations, want=want)


@pytest.fixture(scope="module")
def converted(dataset, tmp_path_factory):
  out = tmp_path_factory.mktemp("editing_records")
  options = sources.SourceOptions(source_dir=str(dataset["images"]),
                                  annotations=str(dataset["annotations"]), image_size=8)
  return sources.prepare("editing", str(out), options)["train"], helpers.read_records(out)


def test_triplets_round_trip_and_bad_ones_are_named(dataset, converted):
  summary, got = converted
  assert (summary.written, summary.skipped) == (3, 6) and len(got) == 3
  for record, want in zip(got, dataset["want"]):
    helpers.assert_parts(record, want)
  problems = "\n".join(summary.problems)
  for where in ("edits.jsonl line 3: no instruction (one of 'instruction'",
                "edits.jsonl line 4: missing or empty instruction",
                "edits.jsonl line 5: unreadable image 'out/bad.png'",
                "edits.jsonl line 6: malformed JSON",
                "edits.jsonl line 8: image path '../outside.png' is not inside",
                "edits.jsonl line 9: image 'src/9.png' does not exist"):
    assert where in problems, where
  assert [(r.meta["line"], r.meta.get("id"), r.meta["prompt_segments"]) for r in got] == [
      (1, None, 2), (2, 7, 2), (10, None, 2)]
  sizes = [tuple(r.meta[k] for k in ("width_0", "height_0", "width_1", "height_1")) for r in got]
  assert sizes == [(16, 10, 12, 12), (8, 20, 8, 8), (8, 20, 12, 12)]
  assert all("target_segments" not in r.meta for r in got)


def test_the_source_and_instruction_are_the_prompt(dataset, converted):
  _, got = converted
  ex = helpers.example(got[0])
  assert ex["image_target"].tolist() == [False, True]
  assert helpers.text_of(ex, ex["prompt_text"]) == "make it blue"
  # The only text targets: the edited image's <|vision_start|> and <|vision_end|>.
  np.testing.assert_array_equal(ex["ids"][ex["text_target"]],
                                [helpers.VISION_START, helpers.VISION_END])
  source, _, edited = dataset["want"][0]
  np.testing.assert_array_equal(ex["images"][0], helpers.expected_pixels(source))
  np.testing.assert_array_equal(ex["images"][1], helpers.expected_pixels(edited))


def test_units_in_parallel_give_the_same_records(dataset, converted, tmp_path):
  _, serial = converted
  summary = json_input.convert(editing.to_document, str(dataset["annotations"]),
                               str(dataset["images"]), str(tmp_path), "train", image_size=8,
                               workers=2, per_unit=3)
  assert len(summary.files) == 3 and (summary.written, summary.skipped) == (3, 6)
  assert helpers.encoded(helpers.read_records(tmp_path)) == helpers.encoded(serial)


def test_an_empty_file_is_reported(dataset, tmp_path):
  empty = helpers.write_lines(tmp_path / "none.jsonl", ["", "  "])
  summary = sources.prepare("editing", str(tmp_path / "out"), sources.SourceOptions(
      source_dir=str(dataset["images"]), annotations=str(empty)))["train"]
  assert (summary.written, summary.skipped, len(summary.files)) == (0, 1, 1)
  assert "none.jsonl: empty" in summary.problems[0]


def test_prepare_data_command_runs_the_editing_source(dataset, tmp_path):
  out = tmp_path / "cli"
  assert cli.run(["starflow2", "prepare-data", "--source", "editing", "--annotations",
                  str(dataset["annotations"]), "--source_dir", str(dataset["images"]),
                  "--out", str(out), "--split", "val", "--image_size", "4"]) == 0
  with open(out / "val_summary.json") as f:
    assert json.load(f)["skipped"] == 6
  got = helpers.read_records(out, "val")
  assert [[p.shape for p in helpers.parts(r)[::2]] for r in got] == [[(4, 4, 3)] * 2] * 3
