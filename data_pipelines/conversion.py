"""Parallel, resumable conversion of input units into the shards of one records split.

Every converter (`webdataset.py`, `parquet.py`, …) cuts its input into units — a tar shard,
a Parquet file, a run of conversation-JSON entries — and says how to read one unit as
records. This module does the rest, the same for all of them:

- unit i of n becomes shard `{split}-{i:05d}-of-{n:05d}.array_record`, so the records keep
  the input's order whatever the number of workers;
- units are converted in `workers` processes (spawned: the parent may hold JAX threads);
- each shard is written under a temporary name and renamed only when complete, after its
  summary (written, skipped, problems) is saved beside it in `.progress/`; a killed
  conversion rerun with the same input and settings keeps the shards already done and
  converts the rest (a unit whose name or source — paths, image size, keys — changed is
  converted again),
  so the result is the same as an uninterrupted run's;
- the split's summary (`{split}_summary.json`) is the sum of the units' summaries.

A unit's reader is a picklable function `read(source) -> iterator of InterleavedRecord |
Skip`: yielding `Skip(problem)` counts one skipped input, named by `problem` (its file and
index); an exception escaping the reader is a bug and stops the conversion.
"""

import concurrent.futures
import dataclasses
import json
import logging
import multiprocessing
import os
from typing import Any, Callable

import tqdm

from data_pipelines import writers

PROGRESS_DIR = ".progress"


@dataclasses.dataclass(frozen=True)
class Skip:
  """One skipped input; `problem` names its file and index and says why."""
  problem: str


@dataclasses.dataclass(frozen=True)
class Unit:
  """One piece of input: `name` for messages and resume checks, `source` for the reader
  (picklable: a path, or a (path, first, last) range)."""
  name: str
  source: Any


def _progress_path(out_dir, shard):
  return os.path.join(out_dir, PROGRESS_DIR, shard + ".json")


def _done(out_dir, shard, unit):
  """The unit's saved summary if its shard was completed from this same unit — same name,
  same source (paths, image size, keys), its files unchanged (size, mtime) — else None."""
  path = _progress_path(out_dir, shard)
  if not (os.path.exists(path) and os.path.exists(os.path.join(out_dir, shard))):
    return None
  with open(path) as f:
    saved = json.load(f)
  if (saved.get("unit") != unit.name or saved.get("source") != repr(unit.source)
      or saved.get("files") != _file_stamps(unit.source)):
    return None
  return writers.WriteSummary(saved["written"], saved["skipped"], saved["problems"], [shard])


def _file_stamps(source):
  """[[path, size, mtime_ns], …] of the files a unit's source names: a file replaced or
  rewritten under the same name makes its unit convert again."""
  if isinstance(source, str):
    if not os.path.isfile(source):
      return []
    stat = os.stat(source)
    return [[source, stat.st_size, stat.st_mtime_ns]]
  if isinstance(source, (tuple, list)):
    return [stamp for item in source for stamp in _file_stamps(item)]
  return []


def _convert_unit(read, unit, out_dir, shard):
  """Writes one unit's records as `shard` (atomically); returns its WriteSummary."""
  summary = writers.WriteSummary(files=[shard])

  def records():
    for item in read(unit.source):
      if isinstance(item, Skip):
        summary.skip(item.problem)
      else:
        summary.written += 1
        yield item

  writers.write_shard(records(), os.path.join(out_dir, shard), before_rename=lambda: _save(
      out_dir, shard, unit, summary))
  return summary


def _save(out_dir, shard, unit, summary):
  path = _progress_path(out_dir, shard)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  payload = dict(unit=unit.name, source=repr(unit.source), files=_file_stamps(unit.source),
                 written=summary.written, skipped=summary.skipped,
                 problems=summary.problems)
  with open(path + ".partial", "w") as f:
    json.dump(payload, f)
  os.replace(path + ".partial", path)


def convert(units, read: Callable, out_dir, split, workers=1, what="records"):
  """Converts `units` into the shards of `split` in `out_dir`; returns the WriteSummary
  (also saved as `{split}_summary.json`).

  Args:
    units: the input, a sequence of Unit in the order records should keep.
    read: a picklable function, unit.source -> iterator of InterleavedRecord or Skip.
    out_dir: the records directory (created).
    split: the split name, e.g. "train".
    workers: processes converting units at once (1: in this process).
    what: what the progress bar counts, e.g. "tar shards".
  """
  units = list(units)
  if not units:
    raise ValueError(f"nothing to convert for split {split!r}: no input units")
  if workers < 1:
    raise ValueError(f"workers must be >= 1, got {workers}")
  writers.check_split_name(split)
  os.makedirs(out_dir, exist_ok=True)
  shards = [writers.shard_name(split, i, len(units)) for i in range(len(units))]
  summaries = [_done(out_dir, shard, unit) for shard, unit in zip(shards, units)]
  todo = [i for i, s in enumerate(summaries) if s is None]
  if len(todo) < len(units):
    logging.info("%s: %d of %d units already converted (kept)", split, len(units) - len(todo),
                 len(units))
  bar = tqdm.tqdm(total=len(units), initial=len(units) - len(todo), unit=" " + what,
                  desc=f"{split}", dynamic_ncols=True, mininterval=1.0)
  with bar:
    for i, summary in _run(todo, units, shards, read, out_dir, workers):
      summaries[i] = summary
      bar.update(1)
      bar.set_postfix(records=sum(s.written for s in summaries if s), refresh=False)
  writers.remove_other_shards(out_dir, split, shards)
  total = writers.WriteSummary(files=shards)
  for s in summaries:
    total.written += s.written
    total.skipped += s.skipped
    total.problems += s.problems
  writers.save_summary(total, out_dir, split)
  return total


def _run(todo, units, shards, read, out_dir, workers):
  """Yields (unit index, summary) as units finish, in this process or in `workers`."""
  if workers == 1 or len(todo) <= 1:
    for i in todo:
      yield i, _convert_unit(read, units[i], out_dir, shards[i])
    return
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
    futures = {pool.submit(_convert_unit, read, units[i], out_dir, shards[i]): i for i in todo}
    try:
      for future in concurrent.futures.as_completed(futures):
        yield futures[future], future.result()
    except BaseException:
      for future in futures:
        future.cancel()
      raise


def default_workers():
  """One worker per CPU this process may use."""
  return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
