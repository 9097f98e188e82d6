"""Grain input pipeline over interleaved-record ArrayRecord shards.

Built from `grain.MapDataset` index transformations, so the batch at each position is a
pure function of (seed, position) and the iterator state is just a position: `get_state`
/ `set_state` (and Orbax, via `grain.checkpoint.CheckpointSave`) resume exactly. Reading
is in-process (optionally with threads); worker processes need absl flags to be parsed
and are slower on few cores anyway.

Records that cannot be decoded, or do not fit the example transform, are skipped rather
than fatal: each bad record is logged once, naming its file and index, and counted in a
SkipCounter.
"""

import bisect
import logging
import os
import threading

import grain
import numpy as np
from array_record.python import array_record_module

from data_pipelines import records


class RecordMismatchError(ValueError):
  """A well-formed record that does not fit the example transform (it is skipped)."""


class SkipCounter:
  """Thread-safe tally of skipped records; each record is logged and counted once."""

  def __init__(self):
    self._lock = threading.Lock()
    self._reasons = {}

  def add(self, where, reason):
    """Notes that record `where` (e.g. "file.array_record record 7") was skipped."""
    with self._lock:
      if where in self._reasons:
        return
      self._reasons[where] = reason
    logging.warning("skipping %s: %s", where, reason)

  @property
  def count(self):
    """Number of distinct records skipped so far."""
    with self._lock:
      return len(self._reasons)

  @property
  def reasons(self):
    """{record location: reason}, a copy."""
    with self._lock:
      return dict(self._reasons)


def _num_records(path):
  """Records in one ArrayRecord file, with errors that name the file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"ArrayRecord file {path!r} does not exist")
  try:
    reader = array_record_module.ArrayRecordReader(path)
    count = reader.num_records()
    reader.close()
  except RuntimeError as e:  # array_record reports bad files as RuntimeError
    raise ValueError(f"{path!r} is not a readable ArrayRecord file: {e}") from e
  return count


class _RecordLocator:
  """Turns a global record index over several shards into "file record i" for messages."""

  def __init__(self, paths):
    self._paths = list(paths)
    self._ends = []
    total = 0
    for path in self._paths:
      total += _num_records(path)
      self._ends.append(total)

  def __len__(self):
    return self._ends[-1] if self._ends else 0

  def __call__(self, index):
    index %= len(self)  # Grain passes indices of later epochs past the end.
    shard = bisect.bisect_right(self._ends, index)
    start = self._ends[shard - 1] if shard else 0
    return f"{self._paths[shard]} record {index - start}"


def _with_index(index, data):
  return index, data


def _is_example(example):
  return example is not None


class _DecodeAndTransform:
  """Decodes an (index, bytes) pair and applies the transform; None marks a skipped record."""

  def __init__(self, transform, locate, skips):
    self._transform = transform
    self._locate = locate
    self._skips = skips

  def __call__(self, keyed):
    index, data = keyed
    try:
      return self._transform(records.decode_record(data))
    except (records.MalformedRecordError, RecordMismatchError) as e:
      self._skips.add(self._locate(index), str(e))
      return None


def make_dataset(paths, transform, *, batch_size, seed, shuffle=True, num_epochs=None,
                 process_index=0, process_count=1, drop_remainder=True, skip_counter=None,
                 read_threads=2):
  """A batched, checkpointable grain.IterDataset of `transform(record)` examples.

  Pipeline: ArrayRecord source -> this process's records (`[process_index::process_count]`)
  -> seeded shuffle, reshuffled each epoch -> repeat -> decode + transform -> drop skipped
  records -> batch. Shuffling and sharding happen on record indices, before decoding.

  Args:
    paths: ArrayRecord shard paths (see `writers.find_split_files`).
    transform: callable InterleavedRecord -> example (a dict of arrays); raise
      RecordMismatchError (or records.MalformedRecordError) to skip a record.
    batch_size: examples per batch (per process).
    seed: shuffle seed; the same seed gives the same batches.
    shuffle: whether to shuffle.
    num_epochs: passes over the data; None repeats forever.
    process_index: this process's index among `process_count` data-loading processes.
    process_count: number of processes; each sees a disjoint share of the records.
    drop_remainder: drop a final partial batch (only matters when num_epochs is set).
    skip_counter: a SkipCounter to count skipped records in; a new one if None.
    read_threads: threads decoding records in this process (0 = in the calling thread).

  Returns:
    A grain.IterDataset; `iter(ds)` gives an iterator with `get_state`/`set_state`.
  """
  ds = example_dataset(paths, transform, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                       process_index=process_index, process_count=process_count,
                       skip_counter=skip_counter)
  return batched(ds, batch_size=batch_size, drop_remainder=drop_remainder,
                 read_threads=read_threads)


def example_dataset(paths, transform, *, seed, shuffle=True, num_epochs=None, process_index=0,
                    process_count=1, skip_counter=None):
  """The front half of `make_dataset`: a grain.MapDataset of `transform(record)` examples.

  Source -> this process's records -> seeded shuffle -> repeat -> decode + transform, all
  index transformations, so element k is a pure function of (seed, k); a skipped record is
  None (`batched` drops it). Shared with `mixture.make_mixture_dataset`, which mixes several
  of these before batching. Arguments as in `make_dataset`.
  """
  paths = [str(p) for p in paths]
  if not paths:
    raise ValueError("make_dataset needs at least one ArrayRecord path")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  locate = _RecordLocator(paths)
  if len(locate) < process_count:
    raise ValueError(f"{len(locate)} records in {paths} cannot feed {process_count} processes")
  skips = skip_counter if skip_counter is not None else SkipCounter()
  decode = _DecodeAndTransform(transform, locate, skips)

  ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths))
  ds = ds.map_with_index(_with_index)
  ds = ds[process_index::process_count]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  return ds.map(decode)


def batched(ds, *, batch_size, drop_remainder=True, read_threads=2):
  """The back half of `make_dataset`: a MapDataset of examples (None = skipped) -> a
  batched, checkpointable grain.IterDataset whose state is a position in `ds`."""
  ds = ds.filter(_is_example)
  read_options = grain.ReadOptions(num_threads=read_threads,
                                   prefetch_buffer_size=max(2 * batch_size, 16))
  ds = ds.to_iter_dataset(read_options)
  return ds.batch(batch_size, drop_remainder=drop_remainder)
