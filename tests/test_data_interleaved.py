"""The interleaved-document converter: JSONL documents of text and image segments -> records
with the segments in order and the first `prompt_segments` as the prompt; both segment forms
(keyed and typed); bad documents named by line and skipped."""

import json

import numpy as np
import pytest

import converter_helpers as helpers
from data_pipelines import interleaved
from data_pipelines import json_input
from data_pipelines import sources
from starflow2_jax import cli


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """An image root and an annotations folder: `docs.jsonl` (good and bad documents) and
  `empty.json` (an empty JSON array)."""
  root = tmp_path_factory.mktemp("interleaved")
  images = root / "images"
  a = helpers.save_image(images / "a.png", 0, (12, 10, 3))
  b = helpers.save_image(images / "b.png", 1, (8, 8, 3))
  g = helpers.save_image(images / "g.png", 2, (16, 24))
  helpers.save_image(images / "bad.png", 3, (16, 16, 3), truncate=True)
  helpers.save_image(root / "out.png", 4, (8, 8, 3))
  annotations = root / "annotations"
  annotations.mkdir()
  helpers.write_lines(annotations / "docs.jsonl", [
      {"segments": [{"text": "Step one."}, {"image": "a.png"}, {"text": "Step two."},
                    {"image": "b.png"}], "prompt_segments": 1},
      {"segments": [{"type": "text", "text": "Typed"}, {"type": "image", "value": "g.png"}]},
      {"segments": []},                                                              # 3
      {"segments": [{"text": "x"}, {"image": "bad.png"}]},                           # 4
      '{"segments": [{"text": "x"}',                                                 # 5
      {"segments": [{"text": "x"}, {"image": "../out.png"}]},                        # 6
      {"segments": [{"text": "x"}, {"video": "v.mp4"}]},                             # 7
      {"segments": [{"text": "x"}, {"image": "a.png"}], "prompt_segments": 2},       # 8
      {"segments": [{"image": "nope.png"}, {"text": "y"}]},                          # 9
      {"segments": [{"text": ""}, {"image": "a.png"}]},                              # 10
      {"id": "d11", "segments": [{"image": "b.png"}, {"text": "A caption after."}],
       "prompt_segments": 1},
  ])
  (annotations / "empty.json").write_text("[\n]\n")
  want = [["Step one.", a, "Step two.", b], ["Typed", g], [b, "A caption after."]]
  return dict(images=images, annotations=annotations, want=want)


@pytest.fixture(scope="module")
def converted(dataset, tmp_path_factory):
  out = tmp_path_factory.mktemp("interleaved_records")
  options = sources.SourceOptions(source_dir=str(dataset["images"]),
                                  annotations=str(dataset["annotations"]), image_size=8)
  return sources.prepare("interleaved", str(out), options)["train"], helpers.read_records(out)


def test_documents_round_trip_and_bad_ones_are_named(dataset, converted):
  summary, got = converted
  assert (summary.written, summary.skipped) == (3, 9) and len(got) == 3
  for record, want in zip(got, dataset["want"]):
    helpers.assert_parts(record, want)
  problems = "\n".join(summary.problems)
  for where in ("docs.jsonl line 3: no segments", "docs.jsonl line 4: unreadable image 'bad.png'",
                "docs.jsonl line 5: malformed JSON",
                "docs.jsonl line 6: image path '../out.png' is not inside",
                "docs.jsonl line 7: segment 1 has keys ['video']",
                "docs.jsonl line 8: prompt_segments 2 is not",
                "docs.jsonl line 9: image 'nope.png' does not exist",
                "docs.jsonl line 10: missing or empty text of segment 0", "empty.json: empty"):
    assert where in problems, where
  assert [(r.meta["line"], r.meta.get("id"), r.meta["prompt_segments"]) for r in got] == [
      (1, None, 1), (2, None, 0), (11, "d11", 1)]
  assert [(r.meta["width_0"], r.meta["height_0"]) for r in got] == [(10, 12), (24, 16), (8, 8)]
  assert (got[0].meta["width_1"], got[0].meta["height_1"]) == (8, 8)
  assert got[1].segments[1].to_array().shape == (8, 8, 1)    # greyscale stays greyscale


def test_the_prompt_is_the_leading_segments(converted):
  _, got = converted
  ex = helpers.example(got[0])                  # Step one. | <a> Step two. <b>
  assert helpers.text_of(ex, ex["prompt_text"]) == "Step one."
  assert helpers.text_of(ex, ex["text_target"]) == "Step two."
  assert ex["image_target"].tolist() == [True, True]
  assert (ex["ids"][ex["text_target"]] == helpers.VISION_START).sum() == 2
  ex = helpers.example(got[2])                  # <b> | A caption after.
  assert not ex["prompt_text"].any() and ex["image_target"].tolist() == [False, False]
  assert helpers.text_of(ex, ex["text_target"]) == "A caption after."


def test_units_in_parallel_give_the_same_records(dataset, converted, tmp_path):
  _, serial = converted
  summary = json_input.convert(interleaved.to_document, str(dataset["annotations"]),
                               str(dataset["images"]), str(tmp_path), "train", image_size=8,
                               workers=2, per_unit=4)
  assert len(summary.files) == 4 and (summary.written, summary.skipped) == (3, 9)
  assert helpers.encoded(helpers.read_records(tmp_path)) == helpers.encoded(serial)


def test_prepare_data_command_runs_the_interleaved_source(dataset, tmp_path):
  out = tmp_path / "cli"
  assert cli.run(["starflow2", "prepare-data", "--source", "interleaved", "--annotations",
                  str(dataset["annotations"] / "docs.jsonl"), "--source_dir",
                  str(dataset["images"]), "--out", str(out), "--image_size", "4"]) == 0
  with open(out / "train_summary.json") as f:
    assert json.load(f)["written"] == 3
  shapes = [p.shape[:2] for r in helpers.read_records(out) for p in helpers.parts(r)
            if isinstance(p, np.ndarray)]
  assert shapes == [(4, 4)] * 4
