"""Tests for the ArrayRecord writers, the Fashion-MNIST converter and the image-folder converter."""

import gzip
import json
import logging
import os

import numpy as np
import pytest
from array_record.python import array_record_module
from PIL import Image

from data_pipelines import image_folder
from data_pipelines import records
from demos import fashion_mnist
import fake_data as testing
from data_pipelines import writers


def _read_all(path):
  reader = array_record_module.ArrayRecordReader(path)
  try:
    return [records.decode_record(b) for b in reader.read_all()]
  finally:
    reader.close()


def _labels(path):
  return [r.meta["label"] for r in _read_all(path)]


# writers


def test_write_records_names_shards_and_round_robins(tmp_path):
  paths = writers.write_records(testing.caption_image_records(7), tmp_path, "train", num_shards=3)
  assert [os.path.basename(p) for p in paths] == [
      "train-00000-of-00003.array_record", "train-00001-of-00003.array_record",
      "train-00002-of-00003.array_record"]
  assert [_labels(p) for p in paths] == [[0, 3, 6], [1, 4], [2, 5]]
  assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths)
  assert writers.find_split_files(tmp_path, "train") == paths


def test_write_records_leaves_nothing_when_interrupted(tmp_path):
  old = writers.write_records(testing.caption_image_records(2), tmp_path, "train", num_shards=2)

  def failing():
    yield from testing.caption_image_records(3)
    raise RuntimeError("source broke")

  with pytest.raises(RuntimeError, match="source broke"):
    writers.write_records(failing(), tmp_path, "train", num_shards=1)
  assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in old)
  assert [_labels(p) for p in old] == [[0], [1]]


def test_rewriting_a_split_replaces_old_shards(tmp_path):
  writers.write_records(testing.caption_image_records(4), tmp_path, "train", num_shards=2)
  writers.write_records(testing.caption_image_records(4), tmp_path, "test", num_shards=1)
  new = writers.write_records(testing.caption_image_records(3), tmp_path, "train", num_shards=1)
  assert writers.find_split_files(tmp_path, "train") == new
  assert len(writers.find_split_files(tmp_path, "test")) == 1


def test_find_split_files_errors_name_dir_split_and_pattern(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    writers.find_split_files(tmp_path, "valid")
  message = str(info.value)
  assert str(tmp_path) in message and "'valid'" in message
  assert "valid-NNNNN-of-NNNNN.array_record" in message
  with pytest.raises(FileNotFoundError, match="does not exist"):
    writers.find_split_files(tmp_path / "nowhere", "train")
  paths = writers.write_records(testing.caption_image_records(2), tmp_path, "train", num_shards=2)
  os.remove(paths[1])
  with pytest.raises(ValueError, match="incomplete or mixed shard set"):
    writers.find_split_files(tmp_path, "train")


def test_save_summary_writes_json(tmp_path):
  summary = writers.WriteSummary(written=2)
  summary.skip("captions.jsonl line 3: bad JSON")
  path = writers.save_summary(summary, tmp_path, "train")
  assert os.path.basename(path) == "train_summary.json"
  assert json.loads(open(path).read()) == {
      "written": 2, "skipped": 1, "problems": ["captions.jsonl line 3: bad JSON"], "files": []}


# Fashion-MNIST


@pytest.mark.parametrize("gzipped", [True, False])
def test_load_idx_split_reads_fake_files(tmp_path, gzipped):
  labels = testing.write_fake_fashion_mnist(tmp_path, num_train=5, num_test=3, gzipped=gzipped)
  images, got = fashion_mnist.load_idx_split(tmp_path, "train")
  assert images.shape == (5, 28, 28) and images.dtype == np.uint8
  np.testing.assert_array_equal(got, labels["train"])
  assert fashion_mnist.load_idx_split(tmp_path, "test")[0].shape == (3, 28, 28)


def test_missing_fashion_mnist_names_path_and_package(tmp_path):
  missing = tmp_path / "no-such-dir"
  with pytest.raises(fashion_mnist.MissingDatasetError) as info:
    fashion_mnist.write_fashion_mnist(missing, tmp_path / "out")
  assert isinstance(info.value, FileNotFoundError)
  assert str(missing) in str(info.value)
  assert "apt-get install dataset-fashion-mnist" in str(info.value)
  testing.write_fake_fashion_mnist(tmp_path / "partial")
  os.remove(tmp_path / "partial" / "t10k-labels-idx1-ubyte.gz")
  with pytest.raises(fashion_mnist.MissingDatasetError, match="t10k-labels-idx1-ubyte"):
    fashion_mnist.load_idx_split(tmp_path / "partial", "test")


def test_corrupt_idx_files_raise_naming_the_file(tmp_path):
  testing.write_fake_fashion_mnist(tmp_path, gzipped=False)
  path = tmp_path / "train-images-idx3-ubyte"
  data = path.read_bytes()
  path.write_bytes(data[:-10])
  with pytest.raises(fashion_mnist.IdxFormatError, match="train-images-idx3-ubyte.*truncated"):
    fashion_mnist.load_idx_split(tmp_path, "train")
  path.write_bytes(b"\x00\x00\x08\x01" + data[4:])
  with pytest.raises(fashion_mnist.IdxFormatError, match="train-images-idx3-ubyte.*magic"):
    fashion_mnist.load_idx_split(tmp_path, "train")
  gz = tmp_path / "t10k-images-idx3-ubyte.gz"
  gz.write_bytes(gzip.compress(data)[:30])
  with pytest.raises(fashion_mnist.IdxFormatError, match="t10k-images-idx3-ubyte.gz.*gzip"):
    fashion_mnist.load_idx_split(tmp_path, "test")


def test_write_fashion_mnist_writes_captioned_records(tmp_path):
  labels = testing.write_fake_fashion_mnist(tmp_path / "src", num_train=6, num_test=4)
  summaries = fashion_mnist.write_fashion_mnist(tmp_path / "src", tmp_path / "out", limit=5)
  assert {s: summaries[s].written for s in summaries} == {"train": 5, "test": 4}
  (path,) = writers.find_split_files(tmp_path / "out", "train")
  got = _read_all(path)
  assert [r.meta for r in got] == [{"label": int(l), "index": i}
                                   for i, l in enumerate(labels["train"][:5])]
  assert got[1].segments[0] == records.TextSegment("a photo of a trouser")
  assert got[1].segments[1].to_array().shape == (28, 28, 1)
  assert os.path.exists(tmp_path / "out" / "test_summary.json")


def test_class_names_and_captions():
  assert len(fashion_mnist.CLASS_NAMES) == 10
  assert fashion_mnist.caption_for(0) == "a photo of a T-shirt/top"
  assert fashion_mnist.caption_for(9) == "a photo of a ankle boot"


# image folder


def _save_png(path, array):
  Image.fromarray(array).save(path, format="PNG")


def test_image_folder_skips_and_reports_bad_inputs(tmp_path, caplog):
  images = tmp_path / "images"
  os.makedirs(images / "sub")
  _save_png(images / "rgb.png", np.full((4, 6, 3), 10, np.uint8))
  _save_png(images / "sub" / "grey.png", np.full((4, 6), 20, np.uint8))
  _save_png(images / "rgba.png", np.full((4, 6, 4), 30, np.uint8))
  _save_png(images / "big.png", np.zeros((5, 6, 3), np.uint8))
  _save_png(images / "full.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
  (images / "truncated.png").write_bytes((images / "full.png").read_bytes()[:200])
  lines = [
      {"file": "rgb.png", "caption": "red"},             # line 1: ok
      {"file": "sub/grey.png", "caption": "grey"},       # line 2: ok
      {"file": "truncated.png", "caption": "broken"},    # line 3: truncated image
      {"file": "absent.png", "caption": "nothing"},      # line 4: missing file
      {"file": "rgb.png"},                               # line 5: missing caption
      {"file": "rgb.png", "caption": "  "},              # line 6: empty caption
      None,                                              # line 7: bad JSON
      {"file": "big.png", "caption": "too tall"},        # line 8: wrong size
      {"file": "rgba.png", "caption": "alpha"},          # line 9: ok, alpha dropped
  ]
  jsonl = tmp_path / "captions.jsonl"
  jsonl.write_text("\n".join("{not json" if l is None else json.dumps(l) for l in lines) + "\n")

  with caplog.at_level(logging.WARNING):
    summary = image_folder.write_image_folder(
        images, jsonl, tmp_path / "out", "train", image_size=(4, 6))

  assert (summary.written, summary.skipped) == (3, 6)
  expected = {3: "truncated.png", 4: "absent.png", 5: "caption", 6: "caption", 7: "bad JSON",
              8: "big.png"}
  for problem, (line, detail) in zip(summary.problems, expected.items()):
    assert f"captions.jsonl line {line}" in problem and detail in problem
  assert "unreadable image" in summary.problems[0]
  assert "does not exist" in summary.problems[1]
  assert "5x6, expected 4x6" in summary.problems[5]
  assert sum("captions.jsonl line" in r.getMessage() for r in caplog.records) == 6
  saved = json.loads((tmp_path / "out" / "train_summary.json").read_text())
  assert saved["skipped"] == 6 and saved["problems"] == summary.problems

  got = _read_all(writers.find_split_files(tmp_path / "out", "train")[0])
  assert [r.segments[0].text for r in got] == ["red", "grey", "alpha"]
  assert [r.segments[1].to_array().shape for r in got] == [(4, 6, 3), (4, 6, 1), (4, 6, 3)]
  assert [r.meta for r in got] == [{"line": 1, "file": "rgb.png"},
                                   {"line": 2, "file": "sub/grey.png"},
                                   {"line": 9, "file": "rgba.png"}]


def test_image_folder_rejects_paths_outside_the_folder(tmp_path):
  os.makedirs(tmp_path / "images")
  _save_png(tmp_path / "outside.png", np.zeros((2, 2, 3), np.uint8))
  jsonl = tmp_path / "captions.jsonl"
  jsonl.write_text(json.dumps({"file": "../outside.png", "caption": "escape"}) + "\n")
  summary = image_folder.write_image_folder(tmp_path / "images", jsonl, tmp_path / "out", "train")
  assert summary.written == 0 and "not inside the image root" in summary.problems[0]
