"""The WebDataset converter: tar shards of image + caption samples -> records, read back."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_pipelines import records
from data_pipelines import sources
from data_pipelines import image_decode
from data_pipelines import webdataset
from starflow2_jax import cli
from starflow2_jax.latents import precompute


def _encoded(array, fmt):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt)
  return buffer.getvalue()


def _write_tar(path, members):
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def _image(seed, shape):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def shards(tmp_path):
  """Two shards: good samples (png + txt at the target size, a wider png + json caption,
  a greyscale one) and bad ones (truncated png, no caption, malformed json, no image); and
  an empty shard."""
  square, wide, grey = _image(0, (8, 8, 3)), _image(1, (8, 12, 3)), _image(2, (8, 8))
  _write_tar(tmp_path / "000000.tar", [
      ("a/000.png", _encoded(square, "PNG")), ("a/000.txt", b"a red square "),
      ("a/001.png", _encoded(wide, "PNG")),
      ("a/001.json", json.dumps({"caption": "a wide one", "url": "x"}).encode()),
      ("a/002.png", _encoded(square, "PNG")[:40]), ("a/002.txt", b"truncated"),
      ("a/003.png", _encoded(square, "PNG")),
  ])
  _write_tar(tmp_path / "000001.tar", [
      ("004.json", b"{not json"), ("004.png", _encoded(square, "PNG")),
      ("005.txt", b"no image here"),
      ("006.png", _encoded(grey, "PNG")), ("006.txt", b"grey"),
  ])
  _write_tar(tmp_path / "000002.tar", [])
  return tmp_path, dict(square=square, wide=wide, grey=grey)


def test_webdataset_round_trips_good_samples_and_names_bad_ones(shards, tmp_path):
  source, images = shards
  out = tmp_path / "records"
  summary = webdataset.write_webdataset(str(source), str(out), "train", image_size=8)
  assert summary.written == 3 and summary.skipped == 5
  problems = "\n".join(summary.problems)
  for where in ("000000.tar sample 'a/002': unreadable png", "sample 'a/003': no caption",
                "000001.tar sample '004': malformed json", "sample '005': no image member",
                "000002.tar: empty shard"):
    assert where in problems, where
  _, count, read = precompute.read_split(str(out), "train")
  got = list(read)
  assert count == 3
  assert [r.segments[0].text for r in got] == ["a red square", "a wide one", "grey"]
  assert [(r.meta["shard"], r.meta["key"]) for r in got] == [
      ("000000.tar", "a/000"), ("000000.tar", "a/001"), ("000001.tar", "006")]
  assert [(r.meta["width"], r.meta["height"]) for r in got] == [(8, 8), (12, 8), (8, 8)]
  pixels = [r.segments[1].to_array() for r in got]
  np.testing.assert_array_equal(pixels[0], images["square"])      # already 8 × 8: untouched
  np.testing.assert_array_equal(pixels[2][..., 0], images["grey"])
  # 8 × 12 -> shorter side already 8, so only the centre crop: columns 2..9.
  np.testing.assert_array_equal(pixels[1], images["wide"][:, 2:10])


def test_resize_and_crop_makes_squares_of_the_centre():
  image = Image.fromarray(_image(3, (20, 40, 3)))
  out = image_decode.resize_and_crop(image, 10)
  assert out.size == (10, 10)
  reference = image.resize((20, 10), Image.Resampling.BICUBIC).crop((5, 0, 15, 10))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(reference))


def test_prepare_data_command_runs_the_webdataset_source(shards, tmp_path):
  source, _ = shards
  out = tmp_path / "cli"
  assert "webdataset" in sources.available()
  assert cli.run(["starflow2", "prepare-data", "--source", "webdataset", "--source_dir",
                  str(source), "--out", str(out), "--split", "val", "--image_size", "4"]) == 0
  with open(out / "val_summary.json") as f:
    assert json.load(f)["written"] == 3
  _, _, read = precompute.read_split(str(out), "val")
  assert all(r.segments[1].to_array().shape[:2] == (4, 4) for r in read)
  # One records shard per tar, the empty tar's too (an empty shard keeps the numbering).
  assert sorted(os.listdir(out)) == [".progress", "val-00000-of-00003.array_record",
                                     "val-00001-of-00003.array_record",
                                     "val-00002-of-00003.array_record", "val_summary.json"]
