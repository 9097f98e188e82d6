"""Record sources: what `starflow2 prepare-data --source NAME` converts into records.

Writing records is this module's job alone (training only reads them). A source is a function

    write(out_dir, options: SourceOptions) -> {split: writers.WriteSummary}

Built in: `image_folder` (a folder of images plus a JSONL of captions) and `webdataset` (tar
shards of image + caption samples, `webdataset.py`). Other sources plug in
through the `starflow2.record_sources` entry-point group of an installed distribution — this
repository's demos register their Fashion-MNIST sources there (setup.py), so the library
never imports them.
"""

import dataclasses
import importlib.metadata
import logging
import os

from data_pipelines import image_folder
from data_pipelines import webdataset
from data_pipelines import writers

ENTRY_POINT_GROUP = "starflow2.record_sources"


@dataclasses.dataclass(frozen=True)
class SourceOptions:
  """What a source may read: its input directory, a caption file, the split to write, and
  the square size images are resized and centre-cropped to (None: kept as they are)."""
  source_dir: str | None = None
  captions_jsonl: str | None = None
  split: str = "train"
  image_size: int | None = None


def _image_folder(out_dir, options):
  if not (options.source_dir and options.captions_jsonl):
    raise ValueError("the image_folder source needs source_dir (the images) and "
                     "captions_jsonl (one {\"file\", \"caption\"} per line)")
  return {options.split: image_folder.write_image_folder(
      options.source_dir, options.captions_jsonl, out_dir, options.split)}


def _webdataset(out_dir, options):
  if not options.source_dir:
    raise ValueError("the webdataset source needs source_dir (a folder of .tar shards)")
  return {options.split: webdataset.write_webdataset(options.source_dir, out_dir, options.split,
                                                     options.image_size)}


BUILT_IN = {"image_folder": _image_folder, "webdataset": _webdataset}


def available():
  """{name: loader} of every source: the built-in ones and the registered entry points."""
  found = {ep.name: ep.load for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
  found.update({name: (lambda fn=fn: fn) for name, fn in BUILT_IN.items()})
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
