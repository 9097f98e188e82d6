"""The LLaVA converter: conversation JSON (an array, or JSONL) -> records whose human turns are
prompt and model turns targets; bad entries named and skipped; the JSON streaming it rests on
(`json_input.py`); and the `target_segments` layout of multi-turn records (`examples.py`)."""

import json
import os

import numpy as np
import pytest

import converter_helpers as helpers
from data_pipelines import json_input
from data_pipelines import llava
from data_pipelines import pipeline
from data_pipelines import records
from data_pipelines import sources
from starflow2_jax import cli


def _turns(*values):
  """Alternating human and gpt turns."""
  return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """An image root and an annotations folder: `llava.json` (a JSON array of good and bad
  entries), `extra.jsonl` (JSONL with a malformed and a blank line), `empty.json`."""
  root = tmp_path_factory.mktemp("llava")
  images = root / "images"
  a = helpers.save_image(images / "coco" / "a.png", 0, (12, 20, 3))
  b = helpers.save_image(images / "b.png", 1, (9, 9, 3))
  helpers.save_image(images / "bad.png", 2, (16, 16, 3), truncate=True)
  helpers.save_image(root / "secret.png", 3, (8, 8, 3))
  entries = [
      {"id": "e0", "image": "coco/a.png", "conversations": _turns("<image>\nDescribe it.",
                                                                   "A red thing.")},
      {"id": 1, "image": "b.png", "conversations": _turns(
          "What is it?\n<image>", "A cat.", "And its colour?", "Grey.")},
      {"id": "text", "conversations": _turns("Hi there", "Hello! How can I help?")},
      {"image": "coco/a.png", "conversations": _turns("No placeholder here.", "Fine.")},
      {"image": "b.png", "conversations": _turns("<image> and <image>", "Two?")},      # 4
      {"image": "bad.png", "conversations": _turns("<image>\nQ", "A")},                # 5
      {"image": "missing.png", "conversations": _turns("<image>\nQ", "A")},            # 6
      {"image": "../secret.png", "conversations": _turns("<image>\nQ", "A")},          # 7
      {"image": "b.png", "conversations": [{"from": "human", "value": "<image>\nQ"},
                                           {"from": "gpt"}]},                          # 8
      {"id": "two", "image": ["coco/a.png", "b.png"], "conversations": _turns(
          "<image>\nFirst.", "One.", "Second:\n<image>", "Two.")},
  ]
  annotations = root / "annotations"
  annotations.mkdir()
  with open(annotations / "llava.json", "w") as f:
    json.dump(entries, f, indent=1)
  helpers.write_lines(annotations / "extra.jsonl", [
      {"id": "j1", "image": "b.png", "conversations": _turns("<image>\nWhat?", "A square.")},
      '{"conversations": [{"from": "human"', "",
      {"conversations": _turns("Just text", "Indeed.")}])
  (annotations / "empty.json").write_text("")
  want = [  # the good entries, in file order (empty.json, extra.jsonl, llava.json)
      [b, "What?", "A square."], ["Just text", "Indeed."],
      [a, "Describe it.", "A red thing."], ["What is it?", b, "A cat.", "And its colour?", "Grey."],
      ["Hi there", "Hello! How can I help?"], [a, "No placeholder here.", "Fine."],
      [a, "First.", "One.", "Second:", b, "Two."]]
  return dict(root=root, images=images, annotations=annotations, want=want)


@pytest.fixture(scope="module")
def converted(dataset, tmp_path_factory):
  out = tmp_path_factory.mktemp("llava_records")
  options = sources.SourceOptions(source_dir=str(dataset["images"]),
                                  annotations=str(dataset["annotations"]), image_size=8)
  summary = sources.prepare("llava", str(out), options)["train"]
  return summary, helpers.read_records(out)


def test_conversations_round_trip_and_bad_entries_are_named(dataset, converted):
  summary, got = converted
  assert (summary.written, summary.skipped) == (7, 7) and len(got) == 7
  for record, want in zip(got, dataset["want"]):
    helpers.assert_parts(record, want)
  problems = "\n".join(summary.problems)
  for where in ("empty.json: empty", "extra.jsonl line 2: malformed JSON",
                "llava.json entry 4: 2 <image> placeholders for 1 images",
                "llava.json entry 5: unreadable image 'bad.png'",
                "llava.json entry 6: image 'missing.png' does not exist",
                "llava.json entry 7: image path '../secret.png' is not inside",
                "llava.json entry 8: missing or empty text of turn 1 (gpt)"):
    assert where in problems, where
  metas = [r.meta for r in got]
  assert [(m["file"], m.get("line", m.get("entry")), m.get("id")) for m in metas] == [
      ("extra.jsonl", 1, "j1"), ("extra.jsonl", 4, None), ("llava.json", 0, "e0"),
      ("llava.json", 1, 1), ("llava.json", 2, "text"), ("llava.json", 3, None),
      ("llava.json", 9, "two")]
  # Original sizes, per image in record order (a is 20 wide, 12 high; b 9 × 9).
  assert {k: v for k, v in metas[6].items() if k[:5] in ("width", "heigh")} == {
      "width_0": 20, "height_0": 12, "width_1": 9, "height_1": 9}
  # Single-turn: a prompt prefix; multi-turn: a prompt after a target needs target_segments.
  assert metas[2]["prompt_segments"] == 2 and "target_segments" not in metas[2]
  assert (metas[3]["prompt_segments"], metas[3]["target_segments"]) == (2, "00101")
  assert metas[6]["target_segments"] == "001001"


def test_multi_turn_prompt_after_a_target_through_the_example(converted):
  _, got = converted
  ex = helpers.example(got[3])                 # What is it? <b> | A cat. | And its colour? | Grey.
  assert helpers.text_of(ex, ex["prompt_text"]) == "What is it?And its colour?"
  assert helpers.text_of(ex, ex["text_target"]) == "A cat.Grey."
  second_question = np.flatnonzero(ex["prompt_text"])[-1]
  first_answer = np.flatnonzero(ex["text_target"])[0]
  assert second_question > first_answer        # a prompt token after a target token
  assert ex["image_valid"].tolist() == [True, False] and not ex["image_target"].any()
  single = helpers.example(got[2])
  assert helpers.text_of(single, single["prompt_text"]) == "Describe it."
  assert helpers.text_of(single, single["text_target"]) == "A red thing."


def test_target_segments_take_precedence_over_prompt_segments():
  image = records.ImageSegment.from_array(np.zeros((8, 8, 3), np.uint8))
  segments = [records.TextSegment("ab"), image, records.TextSegment("c"), records.TextSegment("d")]
  ex = helpers.example(records.InterleavedRecord(
      segments, {"prompt_segments": 3, "target_segments": "0101"}))
  assert helpers.text_of(ex, ex["prompt_text"]) == "abc"
  assert helpers.text_of(ex, ex["text_target"]) == "d"
  assert ex["image_target"].tolist() == [True, False]
  vision = np.isin(ex["ids"], [helpers.VISION_START, helpers.VISION_END])
  assert ex["text_target"][vision].all()       # a target image's markers are text targets
  ex = helpers.example(records.InterleavedRecord(segments, {"prompt_segments": 3}))
  assert helpers.text_of(ex, ex["prompt_text"]) == "abc" and not ex["image_target"].any()
  for bad in ("010", "01x1", 101):
    with pytest.raises(pipeline.RecordMismatchError, match="target_segments"):
      helpers.example(records.InterleavedRecord(segments, {"target_segments": bad}))


def test_units_in_parallel_give_the_same_records_and_resume(dataset, converted, tmp_path):
  _, serial = converted
  out = tmp_path / "parallel"
  summary = json_input.convert(llava.to_document, str(dataset["annotations"]),
                               str(dataset["images"]), str(out), "train", image_size=8,
                               workers=2, per_unit=2)
  # empty.json, extra.jsonl (3 entries), llava.json (10 entries): 1 + 2 + 5 units.
  assert len(summary.files) == 8 and (summary.written, summary.skipped) == (7, 7)
  assert helpers.encoded(helpers.read_records(out)) == helpers.encoded(serial)
  # A killed run: one shard missing. The rerun converts only that unit.
  shards = sorted(out / f for f in summary.files)
  os.remove(shards[4])
  before = {p: os.stat(p).st_mtime_ns for p in shards if p != shards[4]}
  again = json_input.convert(llava.to_document, str(dataset["annotations"]),
                             str(dataset["images"]), str(out), "train", image_size=8,
                             per_unit=2)
  assert {p: os.stat(p).st_mtime_ns for p in before} == before
  assert again.problems == summary.problems
  assert helpers.encoded(helpers.read_records(out)) == helpers.encoded(serial)


def test_prepare_data_command_runs_the_llava_source(dataset, tmp_path):
  out = tmp_path / "cli"
  assert cli.run(["starflow2", "prepare-data", "--source", "llava", "--annotations",
                  str(dataset["annotations"] / "llava.json"), "--source_dir",
                  str(dataset["images"]), "--out", str(out), "--split", "val",
                  "--image_size", "4", "--workers", "1"]) == 0
  with open(out / "val_summary.json") as f:
    assert (json.load(f)["written"]) == 5
  got = helpers.read_records(out, "val")
  assert [r.segments[0].to_array().shape for r in got if isinstance(
      r.segments[0], records.ImageSegment)] == [(4, 4, 3)] * 3


def test_the_source_needs_its_flags(tmp_path):
  with pytest.raises(ValueError, match="--annotations, --source_dir"):
    sources.prepare("llava", str(tmp_path / "out"), sources.SourceOptions())


def test_json_arrays_stream_across_blocks(tmp_path, monkeypatch):
  monkeypatch.setattr(json_input, "_BLOCK", 3)   # every value spans several reads
  values = [12345, {"a": "é漢字🙂", "b": [1.5, None, True]}, [1, 2, {"c": "x" * 40}], "str",
            {"d": "\\\"quoted\\\""}, -7]
  path = tmp_path / "a.json"
  path.write_text("\ufeff \n" + json.dumps(values, indent=2, ensure_ascii=False), "utf-8")
  chunks = json_input.index_file(str(path), per_unit=4)
  assert [(c.first, c.count) for c in chunks] == [(0, 4), (4, 2)]
  got = [e for c in chunks for e in json_input.chunk_entries(c)]
  assert got == list(enumerate(values))


def test_a_malformed_array_value_ends_the_file_and_is_named(tmp_path, monkeypatch):
  monkeypatch.setattr(json_input, "_BLOCK", 4)
  path = tmp_path / "bad.json"
  path.write_text('[{"a": 1},\n {"b": [1, 2},\n {"c": 3}]')
  (chunk,) = json_input.index_file(str(path), per_unit=10)
  (i0, v0), (i1, v1) = json_input.chunk_entries(chunk)
  assert (i0, v0, i1) == (0, {"a": 1}, 1)
  assert isinstance(v1, json_input.Malformed) and "byte 12" in v1.reason
  assert "rest of the array is not read" in v1.reason
