"""Converting input units into record shards (`data_pipelines/conversion.py`): parallel workers
write the same records as one, a killed conversion resumes to the records of an uninterrupted
one without redoing finished units, and a changed input is converted again."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from data_pipelines import conversion
from data_pipelines import records
from data_pipelines import writers
from starflow2_jax.latents import precompute


def read_numbers(source):
  """A unit reader for the tests: records "<unit> <k>" with a small image, k < count; every
  third number of unit 1 is a named Skip."""
  unit, count = source
  for k in range(count):
    if unit == 1 and k % 3 == 0:
      yield conversion.Skip(f"unit {unit} item {k}: a bad one")
      continue
    pixels = np.full((2, 2), 10 * unit + k, np.uint8)
    yield records.InterleavedRecord(
        (records.TextSegment(f"{unit} {k}"), records.ImageSegment.from_array(pixels)),
        {"unit": unit, "k": k})


def _units(counts):
  return [conversion.Unit(f"unit-{i}", (i, n)) for i, n in enumerate(counts)]


def _split(out, split="train"):
  _, _, stream = precompute.read_split(str(out), split)
  return [(r.segments[0].text, r.segments[1].png, r.meta) for r in stream]


def test_units_become_shards_in_order_and_skips_are_counted(tmp_path):
  summary = conversion.convert(_units([3, 6, 0, 2]), read_numbers, str(tmp_path), "train")
  assert summary.written == 3 + 4 + 0 + 2 and summary.skipped == 2
  assert summary.problems == ["unit 1 item 0: a bad one", "unit 1 item 3: a bad one"]
  assert [os.path.basename(p) for p in writers.find_split_files(str(tmp_path), "train")] == [
      writers.shard_name("train", i, 4) for i in range(4)]
  assert [text for text, _, _ in _split(tmp_path)] == [
      "0 0", "0 1", "0 2", "1 1", "1 2", "1 4", "1 5", "3 0", "3 1"]


def test_parallel_workers_write_the_same_records_as_one(tmp_path):
  counts = [4, 7, 1, 5, 3]
  one = conversion.convert(_units(counts), read_numbers, str(tmp_path / "one"), "train")
  two = conversion.convert(_units(counts), read_numbers, str(tmp_path / "two"), "train",
                           workers=2)
  assert (one.written, one.skipped, one.problems) == (two.written, two.skipped, two.problems)
  assert _split(tmp_path / "one") == _split(tmp_path / "two")


def test_a_rerun_keeps_finished_units_and_redoes_changed_ones(tmp_path):
  conversion.convert(_units([2, 2, 2]), read_numbers, str(tmp_path), "train")
  shard = [os.path.join(tmp_path, writers.shard_name("train", i, 3)) for i in range(3)]
  before = [os.stat(p).st_mtime_ns for p in shard]
  time.sleep(0.01)
  units = _units([2, 2, 2])
  units[1] = conversion.Unit("unit-1-changed", (1, 5))          # another input for unit 1
  summary = conversion.convert(units, read_numbers, str(tmp_path), "train")
  after = [os.stat(p).st_mtime_ns for p in shard]
  assert after[0] == before[0] and after[2] == before[2]        # kept
  assert after[1] != before[1]                                  # converted again
  assert summary.written == 2 + 3 + 2
  units[2] = conversion.Unit("unit-2", (2, 1))                  # same name, another source
  assert conversion.convert(units, read_numbers, str(tmp_path), "train").written == 2 + 3 + 1
  # A different number of units replaces the split: no shard of the old count remains.
  conversion.convert(_units([1, 1]), read_numbers, str(tmp_path), "train")
  assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".array_record")) == [
      writers.shard_name("train", i, 2) for i in range(2)]


def test_a_rewritten_input_file_is_converted_again(tmp_path):
  """Same unit name and source, but the file the source names changed: not a finished unit."""
  source = tmp_path / "input.txt"
  source.write_text("3")
  units = [conversion.Unit("the file", str(source))]
  read = read_count_from_file
  assert conversion.convert(units, read, str(tmp_path / "out"), "train").written == 3
  source.write_text("5")
  os.utime(source, ns=(0, os.stat(source).st_mtime_ns + 10**9))
  assert conversion.convert(units, read, str(tmp_path / "out"), "train").written == 5


def read_count_from_file(path):
  """A unit reader for the tests: as many records as the file's number says."""
  with open(path) as f:
    count = int(f.read())
  yield from read_numbers((0, count))


_KILLED_RUN = """
import os, sys, time
sys.path.insert(0, {tests!r})
from data_pipelines import conversion
import test_data_conversion as t

def slow(source):
  if source[0] >= 2:
    time.sleep(60)           # unit 2 never finishes: the parent kills us here
  yield from t.read_numbers(source)

conversion.convert(t._units({counts!r}), slow, {out!r}, "train")
"""


def test_a_killed_conversion_resumes_to_the_uninterrupted_records(tmp_path):
  counts = [3, 4, 2, 5]
  out = tmp_path / "resumed"
  script = _KILLED_RUN.format(tests=os.path.dirname(__file__), counts=counts, out=str(out))
  process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)],
                             stderr=subprocess.DEVNULL)
  done = [out / writers.shard_name("train", i, 4) for i in (0, 1)]
  deadline = time.time() + 120
  while not all(p.exists() for p in done) and time.time() < deadline:
    time.sleep(0.05)
  time.sleep(0.3)                                    # well inside unit 2's sleep
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert all(p.exists() for p in done), "units 0 and 1 were not written before the kill"
  assert not (out / writers.shard_name("train", 2, 4)).exists()
  assert not (out / "train_summary.json").exists()
  kept = [os.stat(p).st_mtime_ns for p in done]

  conversion.convert(_units(counts), read_numbers, str(out), "train")
  conversion.convert(_units(counts), read_numbers, str(tmp_path / "whole"), "train")
  assert [os.stat(p).st_mtime_ns for p in done] == kept          # not converted again
  assert _split(out) == _split(tmp_path / "whole")
  leftovers = [f for f in os.listdir(out) if f.endswith(".partial")]
  assert leftovers == []


def test_bad_arguments_are_named(tmp_path):
  with pytest.raises(ValueError, match="no input units"):
    conversion.convert([], read_numbers, str(tmp_path), "train")
  with pytest.raises(ValueError, match="workers must be >= 1"):
    conversion.convert(_units([1]), read_numbers, str(tmp_path), "train", workers=0)
