"""Grain input pipeline over interleaved-record ArrayRecord shards.

Built from `grain.MapDataset` index transformations, so the batch at each position is a
pure function of (seed, position) and the iterator state is just a position: `get_state`
/ `set_state` (and Orbax, via `grain.checkpoint.CheckpointSave`) resume exactly. Reading
is in-process (optionally with threads); worker processes need absl flags to be parsed
and are slower on few cores anyway.

Two back halves batch the same examples. `batched` (the default, `make_dataset`) batches
what each process reads of its own records, so batches depend on the process count and the
position is per process. `elastic_batched` cuts one global order into global batches and
gives each process its rows of them: batch k is a pure function of (seed, k) whatever the
number of processes, and the position is the step. With one process and no skipped record
both give the same batches.

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


# Consecutive skipped records after which `elastic_batched` gives up (the data is unusable).
MAX_CONSECUTIVE_SKIPS = 10_000


def process_rows(batch_size, process_index=0, process_count=1):
  """(start, stop): process `process_index`'s even share of the rows of a global batch."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if batch_size % process_count:
    raise ValueError(f"batch size {batch_size} is not divisible by {process_count} processes")
  share = batch_size // process_count
  return process_index * share, (process_index + 1) * share


class _SlotExample:
  """Row r of a process's share -> the example at its global slot, or the next one after it
  in the global order that decodes (skipped records are None)."""

  def __init__(self, examples, batch_size, rows):
    self._examples = examples
    self._batch_size = batch_size
    self._start, stop = rows
    self._share = stop - self._start

  def __call__(self, row):
    batch, offset = divmod(int(row), self._share)
    first = batch * self._batch_size + self._start + offset
    for slot in range(first, first + MAX_CONSECUTIVE_SKIPS):
      example = self._examples[slot]
      if example is not None:
        return example
    raise ValueError(f"{MAX_CONSECUTIVE_SKIPS} records in a row from slot {first} were "
                     "skipped (the warnings name them): no usable training data")


def elastic_batched(ds, *, batch_size, rows=None, start_step=0, read_threads=2):
  """The elastic back half: a MapDataset of examples in one global order (None = skipped) ->
  this process's rows of each global batch, as a grain.IterDataset from batch `start_step`.

  Global batch k is slots [k·batch_size, (k+1)·batch_size) of `ds`; this process decodes
  only its `rows` = (start, stop) of them (default: all). A skipped slot takes the next
  example of the global order that decodes (so that example appears twice), which every
  process count finds alike. Batch k is therefore a pure function of (seed, k): the data
  position is the step, and a run resumed at step k, with any number of processes, passes
  `start_step=k` and needs no iterator state. Without skipped records and with all rows,
  the batches are exactly `batched(ds)`'s.

  Args:
    ds: `example_dataset` (or a mixture of them) over all records: process_count=1.
    batch_size: the global batch size.
    rows: (start, stop), this process's rows of each global batch (see `process_rows`).
    start_step: the first global batch to yield.
    read_threads: threads decoding records in this process (0 = in the calling thread).
  """
  start, stop = rows or (0, batch_size)
  if not 0 <= start < stop <= batch_size:
    raise ValueError(f"rows {rows} are not a range within a batch of {batch_size}")
  share = stop - start
  num_batches = len(ds) // batch_size
  slots = grain.MapDataset.range(start_step * share, num_batches * share)
  read_options = grain.ReadOptions(num_threads=read_threads,
                                   prefetch_buffer_size=max(2 * share, 16))
  examples = slots.map(_SlotExample(ds, batch_size, (start, stop)))
  return examples.to_iter_dataset(read_options).batch(share, drop_remainder=True)
