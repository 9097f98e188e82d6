"""A TFDS dataset already prepared on disk (array_record format) -> captioned records.

The source directory is the prepared dataset's version directory, the one holding
`dataset_info.json`, `features.json` and the `<name>-<split>.array_record-…` shards
(e.g. `~/tensorflow_datasets/NAME/CONFIG/VERSION`). It is opened with
`tfds.builder_from_directory` and read through `builder.as_data_source(split)` — random
access into the ArrayRecord shards with TFDS's NumPy deserialisation, so TensorFlow is not
needed. The image feature (`image_key`, else the dataset's one top-level `Image` feature)
is read undecoded and decoded as `image_decode.decode_image` says; the text feature
(`text_key`, else the one top-level `Text` feature) is the caption.

Each run of `EXAMPLES_PER_UNIT` examples of the split is one conversion unit
(`conversion.py`: parallel, resumable), read in batches of `BATCH_EXAMPLES`. A record is the
caption (the prompt) then the image, meta `dataset`, `split`, `index` (in the split), the
original `width` and `height` and `prompt_segments` 1 (`parquet.captioned_record`). Bad
input — a malformed (undeserialisable) example, an unreadable or truncated image, a missing
or empty caption — is counted and skipped, named by the directory, split and index; a run
of examples with nothing good still gets its (empty) records shard.
"""

import dataclasses
import os

from google.protobuf import message
import tensorflow_datasets as tfds

from data_pipelines import conversion
from data_pipelines import parquet

EXAMPLES_PER_UNIT = 1000
BATCH_EXAMPLES = 64


@dataclasses.dataclass(frozen=True)
class ExampleRange:
  """One unit: examples [first, last) of `split` of the dataset in `dataset_dir`."""
  dataset_dir: str
  split: str
  first: int
  last: int
  image_key: str
  text_key: str
  image_size: int | None


def open_builder(dataset_dir):
  """The TFDS builder of a prepared dataset's version directory."""
  if not os.path.isfile(os.path.join(dataset_dir or "", "dataset_info.json")):
    raise FileNotFoundError(f"{dataset_dir!r} is not a prepared TFDS dataset: no "
                            "dataset_info.json (give the version directory, e.g. "
                            "~/tensorflow_datasets/NAME/CONFIG/VERSION)")
  return tfds.builder_from_directory(dataset_dir)


def feature_keys(features, image_key, text_key, where):
  """(image feature, text feature) of a FeaturesDict; ValueError naming the features."""
  names = sorted(features.keys())   # a FeaturesDict's order varies between runs
  types = {name: type(features[name]).__name__ for name in names}
  of_type = lambda cls: [name for name in names if isinstance(features[name], cls)]
  image = parquet.pick_key("image", image_key, of_type(tfds.features.Image), types, where)
  text = parquet.pick_key("text", text_key, of_type(tfds.features.Text), types, where)
  if not isinstance(features[image], tfds.features.Image):
    raise ValueError(f"{where}: feature {image!r} is {types[image]}, not an Image feature")
  return image, text


def _raw_examples(builder, unit):
  """(index, serialized example) of the unit's examples, read in batches."""
  data = builder.as_data_source(
      unit.split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  for start in range(unit.first, unit.last, BATCH_EXAMPLES):
    indices = list(range(start, min(start + BATCH_EXAMPLES, unit.last)))
    yield from zip(indices, data.__getitems__(indices))


def read_range(unit):
  """One ExampleRange's records (and Skips), in index order."""
  builder = open_builder(unit.dataset_dir)
  features = builder.info.features
  # Images stay encoded (decode_image decodes them); the rest is NumPy-deserialised.
  decoders = {name: tfds.decode.SkipDecoding() for name, feature in features.items()
              if isinstance(feature, tfds.features.Image)}
  meta = {"dataset": builder.info.full_name, "split": unit.split}
  for index, raw in _raw_examples(builder, unit):
    where = f"{unit.dataset_dir} {unit.split}[{index}]"
    try:
      example = features.deserialize_example_np(raw, decoders=decoders)
    except (message.DecodeError, ValueError) as e:
      yield conversion.Skip(f"{where}: malformed example ({type(e).__name__}: {e})")
      continue
    try:
      yield parquet.captioned_record(example[unit.text_key], example[unit.image_key],
                                     unit.image_size, {**meta, "index": index})
    except parquet.BadSample as e:
      yield conversion.Skip(f"{where}: {e}")


def _units(dataset_dir, split, image_size, image_key, text_key, examples_per_unit):
  """The split's ExampleRanges of `examples_per_unit` examples (the last may be shorter)."""
  builder = open_builder(dataset_dir)
  info = builder.info
  if split not in info.splits:
    raise ValueError(f"{dataset_dir} has no split {split!r}: it has {', '.join(info.splits)}")
  image, text = feature_keys(info.features, image_key, text_key, dataset_dir)
  try:
    builder.as_data_source(split)
  except NotImplementedError as e:
    raise ValueError(f"{dataset_dir} is not stored as array_record (prepare it with "
                     "file_format='array_record')") from e
  count = info.splits[split].num_examples
  ranges = [(first, min(first + examples_per_unit, count))
            for first in range(0, count, examples_per_unit)]
  return [conversion.Unit(f"{info.full_name} {split}[{first}:{last}]",
                          ExampleRange(dataset_dir, split, first, last, image, text, image_size))
          for first, last in ranges]


def write_tfds(dataset_dir, out_dir, split, image_size=None, workers=1, image_key=None,
               text_key=None, examples_per_unit=EXAMPLES_PER_UNIT):
  """Writes split `split` of the prepared TFDS dataset in `dataset_dir` as split `split` of
  `out_dir`, one records shard per `examples_per_unit` examples (see `conversion.convert`:
  parallel, resumable); returns the WriteSummary (also saved as JSON next to the shards)."""
  units = _units(dataset_dir, split, image_size, image_key, text_key, examples_per_unit)
  return conversion.convert(units, read_range, out_dir, split, workers, what="example ranges")


def source(out_dir, options):
  """`prepare-data --source tfds`: --source_dir (the version directory), --split (read and
  written), --image_size, --image_key, --text_key."""
  from data_pipelines import sources   # the registry imports this module lazily
  (source_dir,) = sources.require_options(options, "tfds", "source_dir")
  return {options.split: write_tfds(source_dir, out_dir, options.split, options.image_size,
                                    options.workers, options.image_key, options.text_key)}
