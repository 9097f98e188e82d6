"""The TFDS converter: a dataset prepared on disk in array_record format (written here by a
tiny GeneratorBasedBuilder, no TensorFlow) -> records (texts, pixels after resize and crop,
meta, the Pretzel layout), bad examples named and counted, features found or named, the
same records with 2 workers, the command with --split and the feature flags."""

import io
import json
import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from PIL import Image

from data_pipelines import examples
from data_pipelines import image_decode
from data_pipelines import sources
from data_pipelines import text
from data_pipelines import tfds_source
from starflow2_jax import cli
from starflow2_jax.latents import precompute


def _encoded(array, fmt):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt)
  return buffer.getvalue()


def _image(seed, shape):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


IMAGES = dict(square=_image(0, (8, 8, 3)), wide=_image(1, (10, 16, 3)),
              photo=_image(2, (12, 9, 3)), last=_image(3, (9, 9, 3)))
JPEG = _encoded(IMAGES["photo"], "JPEG")
# (image bytes, caption, alt text); example 5 is overwritten with bytes that are no example.
TRAIN = [(_encoded(IMAGES["square"], "PNG"), "a red square ", "alt 0"),
         (_encoded(IMAGES["wide"], "PNG"), "a wide one", "alt 1"),
         (JPEG, "a photo", "alt 2"),
         (_encoded(IMAGES["square"], "PNG"), "", "alt 3"),
         (_encoded(IMAGES["square"], "PNG")[:40], "truncated", "alt 4"),
         (_encoded(IMAGES["square"], "PNG"), "malformed", "alt 5"),
         (_encoded(IMAGES["last"], "PNG"), "the last one", "alt 6")]
TEST = [(_encoded(IMAGES["wide"], "PNG"), "test caption", "test alt")]
MALFORMED = 5


class TinyCaptions(tfds.core.GeneratorBasedBuilder):
  """Images with a caption, an alt text and a label; examples kept in generation order."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, disable_shuffling=True,
                                 features=tfds.features.FeaturesDict({
                                     "image": tfds.features.Image(shape=(None, None, 3)),
                                     "caption": tfds.features.Text(),
                                     "alt": tfds.features.Text(), "label": np.int64}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(TRAIN), "test": self._generate_examples(TEST)}

  def _generate_examples(self, rows):
    for i, (image, caption, alt) in enumerate(rows):
      yield i, {"image": image, "caption": caption, "alt": alt, "label": i}


def _corrupt(path, index):
  """Replaces record `index` of an ArrayRecord file with bytes that are no tf.Example."""
  reader = array_record_module.ArrayRecordReader(str(path))
  rows = [reader.read() for _ in range(reader.num_records())]
  reader.close()
  rows[index] = b"\xff not a serialized example"
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for row in rows:
    writer.write(row)
  writer.close()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """The prepared dataset's version directory (dataset_info.json + array_record shards)."""
  builder = TinyCaptions(data_dir=str(tmp_path_factory.mktemp("tfds")),
                         file_format="array_record")
  builder.download_and_prepare()
  assert "tensorflow" not in sys.modules   # prepared and read without TensorFlow
  directory = str(builder.data_dir)
  (shard,) = [f for f in os.listdir(directory) if f.startswith("tiny_captions-train.")]
  _corrupt(os.path.join(directory, shard), MALFORMED)
  return directory


def _expected(array, size):
  return np.asarray(image_decode.resize_and_crop(Image.fromarray(array), size))


def _records(out, split="train"):
  _, count, read = precompute.read_split(str(out), split)
  got = list(read)
  assert len(got) == count
  return got


def test_tfds_round_trips_good_examples_and_names_bad_ones(dataset, tmp_path):
  out = tmp_path / "records"
  summary = tfds_source.write_tfds(dataset, str(out), "train", image_size=8,
                                   text_key="caption", examples_per_unit=3)
  assert (summary.written, summary.skipped) == (4, 3)
  assert len(summary.files) == 3       # [0:3], [3:6] (nothing good), [6:7]
  problems = "\n".join(summary.problems)
  for where in ("train[3]: no caption", "train[4]: unreadable image",
                "train[5]: malformed example"):
    assert f"{dataset} {where}" in problems, where
  got = _records(out)
  assert [r.segments[0].text for r in got] == ["a red square", "a wide one", "a photo",
                                               "the last one"]
  assert [r.meta["index"] for r in got] == [0, 1, 2, 6]
  assert {(r.meta["dataset"], r.meta["split"], r.meta["prompt_segments"]) for r in got} == {
      ("tiny_captions/1.0.0", "train", 1)}
  assert [(r.meta["width"], r.meta["height"]) for r in got] == [(8, 8), (16, 10), (9, 12),
                                                                (9, 9)]
  photo = np.asarray(Image.open(io.BytesIO(JPEG)).convert("RGB"))   # JPEG is lossy
  for record, original in zip(got, [IMAGES["square"], IMAGES["wide"], photo, IMAGES["last"]]):
    np.testing.assert_array_equal(record.segments[1].to_array(), _expected(original, 8))


def test_records_read_back_as_caption_prompt_then_target_image(dataset, tmp_path):
  out = tmp_path / "records"
  sources.prepare("tfds", str(out), sources.SourceOptions(
      source_dir=dataset, image_size=8, text_key="caption"))
  record = _records(out)[1]
  layout = examples.SequenceLayout(max_length=32, max_images=1, grid=(2, 2),
                                   image_shape=(8, 8, 3), vision_start_id=257,
                                   vision_end_id=258, image_pad_id=259, pad_id=0)
  tokenizer = text.ByteTokenizer()
  arrays = examples.InterleavedExample(layout, tokenizer.ids)(record)
  caption = tokenizer.ids("a wide one")
  n = len(caption)
  np.testing.assert_array_equal(arrays["ids"][:n], caption)
  assert arrays["prompt_text"][:n].all() and not arrays["text_target"][:n].any()
  assert arrays["text_target"][n] and arrays["text_target"][n + 5]
  assert not arrays["prompt_text"][n:].any() and arrays["valid"].sum() == n + 6
  assert arrays["image_target"][0] and arrays["image_valid"][0]
  np.testing.assert_array_equal(arrays["images"][0], _expected(IMAGES["wide"], 8))


def test_two_workers_write_the_same_records(dataset, tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  options = dict(image_size=4, text_key="caption", examples_per_unit=2)
  tfds_source.write_tfds(dataset, str(one), "train", workers=1, **options)
  summary = tfds_source.write_tfds(dataset, str(two), "train", workers=2, **options)
  assert len(summary.files) == 4
  first, second = _records(one), _records(two)
  assert len(first) == 4
  assert [r.meta for r in first] == [r.meta for r in second]
  assert [r.segments for r in first] == [r.segments for r in second]


def test_features_are_found_by_type_or_named_and_errors_list_them(dataset, tmp_path):
  features = tfds.features.FeaturesDict({"img": tfds.features.Image(),
                                         "words": tfds.features.Text(), "n": np.int64})
  assert tfds_source.feature_keys(features, None, None, "here") == ("img", "words")
  with pytest.raises(ValueError, match=r"several \(alt, caption\) found; name it with "
                                       r"--text_key: .* has alt \(Text\), caption \(Text\), "
                                       r"image \(Image\), label \(Tensor\)$"):
    tfds_source.write_tfds(dataset, str(tmp_path / "out"), "train")
  with pytest.raises(ValueError, match="feature 'n' is Tensor, not an Image"):
    tfds_source.feature_keys(features, "n", None, "here")
  with pytest.raises(ValueError, match="no split 'validation': it has train, test"):
    tfds_source.write_tfds(dataset, str(tmp_path / "out"), "validation", text_key="alt")
  with pytest.raises(FileNotFoundError, match="no dataset_info.json"):
    tfds_source.write_tfds(str(tmp_path), str(tmp_path / "out"), "train")


def test_prepare_data_command_reads_the_named_split_and_features(dataset, tmp_path):
  out = tmp_path / "cli"
  assert "tfds" in sources.available()
  assert cli.run(["starflow2", "prepare-data", "--source", "tfds", "--source_dir", dataset,
                  "--out", str(out), "--split", "test", "--image_size", "4",
                  "--image_key", "image", "--text_key", "alt"]) == 0
  with open(out / "test_summary.json") as f:
    assert json.load(f)["written"] == 1
  (record,) = _records(out, "test")
  assert record.segments[0].text == "test alt" and record.meta["split"] == "test"
  np.testing.assert_array_equal(record.segments[1].to_array(), _expected(IMAGES["wide"], 4))
