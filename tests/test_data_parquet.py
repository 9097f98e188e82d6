"""The Parquet converter: Hugging Face-layout Parquet files of images and captions -> records
(texts, pixels after resize and crop, meta, the Pretzel layout), bad rows and files named and
counted, columns found or named, the same records with 2 workers, resuming, the command."""

import io
import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_pipelines import examples
from data_pipelines import image_decode
from data_pipelines import parquet
from data_pipelines import sources
from data_pipelines import text
from starflow2_jax import cli
from starflow2_jax.latents import precompute

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
FIRST = "data/train-00000-of-00002.parquet"
SECOND = "data/train-00001-of-00002.parquet"


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def _image(seed, shape):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _write(path, columns, row_group_size=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


@pytest.fixture
def dataset(tmp_path):
  """The HF layout: FIRST holds Image structs (bytes, or a path relative to the source
  directory) in row groups of 2 — good rows, a truncated PNG, and a last row group whose
  captions are missing or blank; SECOND a plain binary column; an empty file, a file that
  is not Parquet, and a dot-folder (ignored). Returns (source dir, {row name: pixels})."""
  source = tmp_path / "hf"
  images = dict(square=_image(0, (8, 8, 3)), wide=_image(1, (10, 16, 3)),
                tall=_image(2, (14, 9, 3)), grey=_image(3, (9, 12)))
  os.makedirs(source / "images")
  (source / "images" / "tall.png").write_bytes(_png(images["tall"]))
  good = _png(images["square"])
  _write(source / FIRST, {
      "image": pa.array([{"bytes": good, "path": "square.png"},
                         {"bytes": _png(images["wide"]), "path": None},
                         {"bytes": None, "path": "images/tall.png"},
                         {"bytes": good[:40], "path": None},
                         {"bytes": good, "path": None}, {"bytes": good, "path": None}],
                        HF_IMAGE),
      "text": ["a red square ", "a wide one", "a tall one", "truncated", None, "   "],
      "url": ["u"] * 6}, row_group_size=2)
  _write(source / SECOND, {"image": pa.array([_png(images["grey"])], pa.binary()),
                           "caption": ["grey"]})
  _write(source / "data/extra-empty.parquet",
         {"image": pa.array([], HF_IMAGE), "text": pa.array([], pa.string())})
  (source / "data/zz-broken.parquet").write_bytes(b"not parquet at all")
  os.makedirs(source / ".cache")
  (source / ".cache/ignored.parquet").write_bytes(b"a cache, not data")
  return source, images


def _expected(array, size):
  return np.asarray(image_decode.resize_and_crop(Image.fromarray(array), size))


def _stable(problems):
  """Problems without object addresses (PIL names its BytesIO `at 0x…`)."""
  return [re.sub(r" at 0x[0-9a-f]+", "", p) for p in problems]


def _records(out, split="train"):
  _, count, read = precompute.read_split(str(out), split)
  got = list(read)
  assert len(got) == count
  return got


def test_parquet_round_trips_good_rows_and_names_bad_ones(dataset, tmp_path):
  source, images = dataset
  out = tmp_path / "records"
  summary = sources.prepare("parquet", str(out), sources.SourceOptions(
      source_dir=str(source), image_size=8))["train"]
  assert (summary.written, summary.skipped) == (4, 5)
  problems = "\n".join(summary.problems)
  for where in (f"{source / 'data/extra-empty.parquet'} row group 0: no rows",
                f"{source / FIRST} row 3: unreadable image", f"{source / FIRST} row 4: no caption",
                f"{source / FIRST} row 5: no caption",
                f"{source / 'data/zz-broken.parquet'}: unreadable Parquet"):
    assert where in problems, where
  got = _records(out)
  assert [r.segments[0].text for r in got] == ["a red square", "a wide one", "a tall one",
                                               "grey"]
  assert [(r.meta["file"], r.meta["row"]) for r in got] == [
      (FIRST, 0), (FIRST, 1), (FIRST, 2), (SECOND, 0)]
  assert [(r.meta["width"], r.meta["height"]) for r in got] == [(8, 8), (16, 10), (9, 14),
                                                                (12, 9)]
  assert all(r.meta["prompt_segments"] == 1 for r in got)
  pixels = [r.segments[1].to_array() for r in got]
  for got_pixels, name in zip(pixels, ["square", "wide", "tall"]):
    np.testing.assert_array_equal(got_pixels, _expected(images[name], 8))
  np.testing.assert_array_equal(pixels[3][..., 0], _expected(images["grey"], 8))
  # One records shard per row group: 1 (empty file) + 3 + 1 + 1 (unreadable file).
  assert len(summary.files) == 6


def test_records_read_back_as_caption_prompt_then_target_image(dataset, tmp_path):
  source, images = dataset
  out = tmp_path / "records"
  parquet.write_parquet(str(source), str(out), "train", image_size=8)
  record = _records(out)[0]
  layout = examples.SequenceLayout(max_length=32, max_images=1, grid=(2, 2),
                                   image_shape=(8, 8, 3), vision_start_id=257,
                                   vision_end_id=258, image_pad_id=259, pad_id=0)
  tokenizer = text.ByteTokenizer()
  arrays = examples.InterleavedExample(layout, tokenizer.ids)(record)
  caption = tokenizer.ids("a red square")
  n = len(caption)
  np.testing.assert_array_equal(arrays["ids"][:n], caption)
  assert arrays["prompt_text"][:n].all() and not arrays["text_target"][:n].any()
  assert arrays["ids"][n] == 257 and arrays["ids"][n + 5] == 258
  assert arrays["text_target"][n] and arrays["text_target"][n + 5]   # learns when to draw
  assert not arrays["prompt_text"][n:].any() and arrays["valid"].sum() == n + 6
  assert arrays["image_target"][0] and arrays["image_valid"][0]
  np.testing.assert_array_equal(arrays["images"][0], images["square"])


def test_two_workers_write_the_same_records_and_a_rerun_keeps_finished_shards(dataset,
                                                                            tmp_path):
  source, _ = dataset
  one, two = tmp_path / "one", tmp_path / "two"
  parquet.write_parquet(str(source), str(one), "train", image_size=4, workers=1)
  summary = parquet.write_parquet(str(source), str(two), "train", image_size=4, workers=2)
  first, second = _records(one), _records(two)
  assert [r.meta for r in first] == [r.meta for r in second]
  assert [r.segments for r in first] == [r.segments for r in second]
  # A killed run, simulated: shard 2 missing. The rerun writes it and keeps the others.
  kept, lost = (two / summary.files[i] for i in (1, 2))
  kept_time = os.stat(kept).st_mtime_ns
  os.remove(lost)
  rerun = parquet.write_parquet(str(source), str(two), "train", image_size=4, workers=1)
  assert os.path.exists(lost) and os.stat(kept).st_mtime_ns == kept_time
  assert (rerun.written, rerun.skipped, _stable(rerun.problems)) == (
      summary.written, summary.skipped, _stable(summary.problems))


def test_columns_are_found_by_name_or_named_and_errors_list_them(tmp_path):
  both = tmp_path / "both"
  _write(both / "a.parquet", {"jpg": pa.array([b"x"]), "png": pa.array([b"y"]),
                              "caption": ["c"]})
  with pytest.raises(ValueError, match=r"a\.parquet has jpg \(binary\), png \(binary\), "
                                       r"caption \(string\)") as error:
    parquet.write_parquet(str(both), str(tmp_path / "out"), "train")
  assert "several (jpg, png)" in str(error.value) and "--image_key" in str(error.value)
  with pytest.raises(ValueError, match="no text column or feature 'txt'"):
    parquet.write_parquet(str(both), str(tmp_path / "out"), "train", image_key="png",
                          text_key="txt")
  with pytest.raises(ValueError, match="text column 'png' is binary, not string"):
    parquet.write_parquet(str(both), str(tmp_path / "out"), "train", image_key="jpg",
                          text_key="png")
  os.makedirs(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="no .parquet files"):
    parquet.write_parquet(str(tmp_path / "empty"), str(tmp_path / "out"), "train")


def test_prepare_data_command_runs_the_parquet_source_with_named_columns(tmp_path):
  source, out = tmp_path / "named", tmp_path / "cli"
  picture = _image(4, (6, 10, 3))
  _write(source / "part.parquet", {
      "photo": pa.array([{"bytes": _png(picture), "path": None}] * 2, HF_IMAGE),
      "text": ["not this", "nor this"], "caption": ["first", "second"]})
  assert "parquet" in sources.available()
  assert cli.run(["starflow2", "prepare-data", "--source", "parquet", "--source_dir",
                  str(source), "--out", str(out), "--split", "val", "--image_size", "4",
                  "--image_key", "photo", "--text_key", "caption", "--workers", "1"]) == 0
  with open(out / "val_summary.json") as f:
    assert json.load(f)["written"] == 2
  got = _records(out, "val")
  assert [r.segments[0].text for r in got] == ["first", "second"]
  for r in got:
    np.testing.assert_array_equal(r.segments[1].to_array(), _expected(picture, 4))
