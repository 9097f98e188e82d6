"""Writes interleaved records to sharded ArrayRecord files, and finds them again.

Shards are named `{split}-{i:05d}-of-{n:05d}.array_record` and written with
`group_size:1`, so every record can be read on its own (cheap random access for
shuffling), and uncompressed (the PNGs inside already are). Each shard is written under a
temporary name and renamed only after every shard closed cleanly: a crash never leaves a
file that looks complete.
"""

import contextlib
import dataclasses
import json
import logging
import os
import re

from array_record.python import array_record_module

from data_pipelines import records as records_lib

# Records hold PNGs (already compressed): ArrayRecord's own compression would only cost time.
_WRITER_OPTIONS = "group_size:1,uncompressed"
_PARTIAL_SUFFIX = ".partial"


def shard_name(split, index, count):
  """The file name of shard `index` of `count` for `split`."""
  return f"{split}-{index:05d}-of-{count:05d}.array_record"


def _shard_pattern(split):
  return re.compile(re.escape(split) + r"-(\d{5})-of-(\d{5})\.array_record")


@dataclasses.dataclass
class WriteSummary:
  """What a writer did with its input: records written, skipped, and why they were skipped."""

  written: int = 0
  skipped: int = 0
  problems: list = dataclasses.field(default_factory=list)
  files: list = dataclasses.field(default_factory=list)

  def skip(self, problem):
    """Counts one skipped input and logs `problem` (which names the file and line)."""
    logging.warning("skipping input: %s", problem)
    self.skipped += 1
    self.problems.append(problem)


def save_summary(summary, out_dir, split):
  """Writes `summary` as `{split}_summary.json` in `out_dir`; returns the path."""
  path = os.path.join(out_dir, f"{split}_summary.json")
  partial = path + _PARTIAL_SUFFIX
  with open(partial, "w") as f:
    json.dump(dataclasses.asdict(summary), f, indent=2)
  os.replace(partial, path)
  return path


def _remove_quietly(paths):
  for path in paths:
    if os.path.exists(path):
      os.remove(path)


def _existing_shards(out_dir, split):
  pattern = _shard_pattern(split)
  return [os.path.join(out_dir, name) for name in os.listdir(out_dir) if pattern.fullmatch(name)]


def write_records(records, out_dir, split, num_shards=1):
  """Writes `records` round-robin over `num_shards` ArrayRecord shards of `split`.

  Rewriting a split replaces all of its previous shards (whatever their count), so the
  directory never mixes two versions of one split.

  Args:
    records: an iterable of InterleavedRecord; consumed once.
    out_dir: output directory, created if needed.
    split: split name used as the file-name prefix, e.g. "train".
    num_shards: number of shard files.

  Returns:
    The shard paths, in shard order.
  """
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  check_split_name(split)
  os.makedirs(out_dir, exist_ok=True)
  final = [os.path.join(out_dir, shard_name(split, i, num_shards)) for i in range(num_shards)]
  with _partial_writers(final) as shard_writers:
    for i, record in enumerate(records):
      shard_writers[i % num_shards].write(records_lib.encode_record(record))
  remove_other_shards(out_dir, split, final)
  return final


def write_shard(records, path, before_rename=None):
  """Writes `records` as the one ArrayRecord file `path`, atomically; returns the count.

  `before_rename` runs after every record is written and closed but before the file takes
  its final name (a converter saves its progress there, so a finished name means finished
  progress)."""
  count = 0
  with _partial_writers([path], before_rename) as (writer,):
    for record in records:
      writer.write(records_lib.encode_record(record))
      count += 1
  return count


@contextlib.contextmanager
def _partial_writers(final_paths, before_rename=None):
  """ArrayRecord writers on temporary names. On a clean exit they are closed,
  `before_rename` runs and each file takes its final name; on an error every temporary file
  is removed, so a crash never leaves a file that looks complete."""
  partial = [path + _PARTIAL_SUFFIX for path in final_paths]
  opened = []
  try:
    for path in partial:
      opened.append(array_record_module.ArrayRecordWriter(path, _WRITER_OPTIONS))
    yield opened
    for writer in opened:
      writer.close()
    if before_rename is not None:
      before_rename()
  except BaseException:
    for writer in opened:
      if writer.is_open():
        writer.close()
    _remove_quietly(partial)
    raise
  for src, dst in zip(partial, final_paths):
    os.replace(src, dst)


def check_split_name(split):
  if not split or os.sep in split:
    raise ValueError(f"split must be a non-empty name without {os.sep!r}, got {split!r}")


def remove_other_shards(out_dir, split, keep):
  """Deletes the shards of `split` in `out_dir` other than `keep` (names or paths): an
  earlier version of the split with another shard count."""
  keep = {os.path.basename(p) for p in keep}
  _remove_quietly(p for p in _existing_shards(out_dir, split) if os.path.basename(p) not in keep)


def find_split_files(data_dir, split):
  """The shard paths of `split` in `data_dir`, sorted; checks the shard set is complete.

  Raises:
    FileNotFoundError: no shards of `split` exist in `data_dir`.
    ValueError: the shards disagree on their count or some are missing.
  """
  expected = os.path.join(data_dir, f"{split}-NNNNN-of-NNNNN.array_record")
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"data dir {data_dir!r} does not exist (looked for {expected!r})")
  paths = sorted(_existing_shards(data_dir, split))
  if not paths:
    raise FileNotFoundError(
        f"no shards of split {split!r} in {data_dir!r}: expected files named {expected!r}")
  pattern = _shard_pattern(split)
  numbers = [pattern.fullmatch(os.path.basename(p)).groups() for p in paths]
  counts = {int(count) for _, count in numbers}
  indices = {int(index) for index, _ in numbers}
  if len(counts) != 1 or indices != set(range(counts.pop())):
    names = [os.path.basename(p) for p in paths]
    raise ValueError(f"incomplete or mixed shard set for split {split!r} in {data_dir!r}: {names}")
  return paths
