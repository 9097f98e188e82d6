"""Record sources: what `starflow2 prepare-data --source NAME` converts into records.

Writing records is this module's job alone (training only reads them). A source is a function

    write(out_dir, options: SourceOptions) -> {split: writers.WriteSummary}

Built in (BUILT_IN, one module each, imported when used): `image_folder` (a folder of images
plus a JSONL of captions), `webdataset` (tar shards), `parquet`, `llava` (conversation JSON),
`editing` (source, instruction, edited triplets), `interleaved` (documents of text and
images) and `tfds` (a TFDS dataset prepared on disk). Other sources plug in
through the `starflow2.record_sources` entry-point group of an installed distribution — this
repository's demos register their Fashion-MNIST sources there (setup.py), so the library
never imports them.
"""

import dataclasses
import importlib
import importlib.metadata
import logging
import os

from data_pipelines import writers

ENTRY_POINT_GROUP = "starflow2.record_sources"


@dataclasses.dataclass(frozen=True)
class SourceOptions:
  """What a source may read (each source uses the fields it needs and says which it lacks).

  source_dir: its input directory (tar shards, Parquet files, images, a TFDS dataset).
  annotations: a file describing the input (image_folder's caption JSONL, LLaVA's
    conversation JSON, an editing or interleaved JSONL).
  split: the split to write.
  image_size: the square size images are resized and centre-cropped to (None: kept).
  workers: processes converting input units at once.
  image_key, text_key: the columns or features holding image and text (Parquet, TFDS).
  """
  source_dir: str | None = None
  annotations: str | None = None
  split: str = "train"
  image_size: int | None = None
  workers: int = 1
  image_key: str | None = None
  text_key: str | None = None


def require_options(options, source, *names):
  """The named option values; a ValueError naming the source and the missing flags."""
  missing = [n for n in names if not getattr(options, n)]
  if missing:
    raise ValueError(f"the {source} source needs " + ", ".join(f"--{n}" for n in missing))
  return [getattr(options, n) for n in names]


# name -> "module:function(out_dir, options) -> {split: WriteSummary}", imported when used.
BUILT_IN = {
    "image_folder": "data_pipelines.image_folder:source",
    "webdataset": "data_pipelines.webdataset:source",
    "parquet": "data_pipelines.parquet:source",
    "llava": "data_pipelines.llava:source",
    "editing": "data_pipelines.editing:source",
    "interleaved": "data_pipelines.interleaved:source",
    "tfds": "data_pipelines.tfds_source:source",
}


def _load(target):
  module, _, function = target.partition(":")
  return getattr(importlib.import_module(module), function)


def available():
  """{name: loader} of every source: the built-in ones and the registered entry points."""
  found = {ep.name: ep.load for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
  found.update({name: (lambda target=target: _load(target)) for name, target in BUILT_IN.items()})
  return found


def prepare(name, out_dir, options=SourceOptions(), skip_if_present=()):
  """Writes source `name`'s records to `out_dir`; returns {split: WriteSummary}.

  `skip_if_present`: splits that, when all already exist in `out_dir`, mean the records were
  written before (a resumed run) — nothing is written then and {} is returned."""
  sources = available()
  if name not in sources:
    raise ValueError(f"unknown record source {name!r}: one of {sorted(sources)} (sources "
                     f"register under the {ENTRY_POINT_GROUP!r} entry points)")
  if skip_if_present and all(_has_split(out_dir, s) for s in skip_if_present):
    logging.info("records for %s already in %s", ", ".join(skip_if_present), out_dir)
    return {}
  os.makedirs(out_dir, exist_ok=True)
  return sources[name]()(out_dir, options)


def prepare_from_config(data_cfg, skip_if_present=()):
  """`prepare` for what a config's `data` section names: its `source`, `source_dir`, `dir`."""
  options = SourceOptions(source_dir=data_cfg.get("source_dir") or None)
  return prepare(data_cfg.source, data_cfg.dir, options, skip_if_present)


def _has_split(out_dir, split):
  try:
    writers.find_split_files(out_dir, split)
    return True
  except FileNotFoundError:
    return False
