"""Tests for the Grain pipeline: shapes, determinism, exact resumption, sharding, skipping;
single-process batches pinned to today's order; elastic batches (`elastic_batched`): the
default's batches with one process, batch k the same for any process count, skipped records
replaced alike."""

import itertools
import logging
import os

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from array_record.python import array_record_module

from data_pipelines import examples
from data_pipelines import pipeline
from data_pipelines import records
import fake_data as testing
from data_pipelines import text
from data_pipelines import writers

NUM_RECORDS = 20
IMAGE_SHAPE = (8, 8, 3)


@pytest.fixture(name="paths")
def _paths(tmp_path):
  return writers.write_records(
      testing.caption_image_records(NUM_RECORDS, IMAGE_SHAPE), tmp_path, "train", num_shards=3)


def _transform(max_caption_len=12):
  return examples.CaptionImageExample(IMAGE_SHAPE, max_caption_len)


def _dataset(paths, **kwargs):
  kwargs = {"batch_size": 3, "seed": 7, **kwargs}
  return pipeline.make_dataset(paths, _transform(), **kwargs)


def _labels(batches):
  return [b["label"].tolist() for b in batches]


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _assert_batches_equal(actual, expected):
  assert len(actual) == len(expected)
  for a, e in zip(actual, expected):
    assert sorted(a) == sorted(e)
    for key in e:
      np.testing.assert_array_equal(a[key], e[key], err_msg=key)


# The single-process batches of `_dataset(paths)` (seed 7, batches of 3) as the pipeline
# made them when the demos' published figures were trained: they must never change.
TODAYS_LABELS = [[12, 19, 9], [1, 6, 7], [18, 10, 3], [14, 4, 17], [2, 8, 0], [16, 13, 11],
                 [15, 5, 11], [5, 10, 14], [7, 8, 16], [6, 19, 4]]


def test_single_process_batches_keep_todays_order(paths):
  for kwargs in ({}, dict(process_index=0, process_count=1), dict(read_threads=0)):
    assert _labels(_take(iter(_dataset(paths, **kwargs)), 10)) == TODAYS_LABELS


def test_batches_have_expected_shapes_and_dtypes(paths):
  batch = next(iter(_dataset(paths, batch_size=4)))
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      "image": ((4, *IMAGE_SHAPE), np.uint8),
      "caption_ids": ((4, 12), np.int32),
      "caption_mask": ((4, 12), np.bool_),
      "label": ((4,), np.int32),
  }
  for image, ids, label in zip(batch["image"], batch["caption_ids"], batch["label"]):
    assert (image == label).all()
    assert text.ByteTokenizer().decode(ids) == f"item {label}"


def test_same_seed_gives_same_batches_and_epochs_reshuffle(paths):
  first = _labels(_take(iter(_dataset(paths, batch_size=1)), 2 * NUM_RECORDS))
  again = _labels(_take(iter(_dataset(paths, batch_size=1)), 2 * NUM_RECORDS))
  other = _labels(_take(iter(_dataset(paths, batch_size=1, seed=8)), NUM_RECORDS))
  assert first == again
  assert other != first[:NUM_RECORDS]
  epoch0, epoch1 = first[:NUM_RECORDS], first[NUM_RECORDS:]
  assert sorted(epoch0) == sorted(epoch1) == [[i] for i in range(NUM_RECORDS)]
  assert epoch0 != epoch1


def test_unshuffled_finite_dataset_keeps_order_and_remainder(paths):
  ds = _dataset(paths, shuffle=False, num_epochs=1, batch_size=8, drop_remainder=False)
  labels = _labels(ds)
  assert [len(b) for b in labels] == [8, 8, 4]
  assert sorted(sum(labels, [])) == list(range(NUM_RECORDS))


@pytest.mark.parametrize("consumed", [2, 6])  # mid-epoch; past the epoch boundary at 20/3 batches
def test_get_state_set_state_resumes_exactly(paths, consumed):
  ds = _dataset(paths)
  iterator = iter(ds)
  _take(iterator, consumed)
  state = iterator.get_state()
  expected = _labels(_take(iterator, 6))
  resumed = iter(_dataset(paths))
  resumed.set_state(state)
  assert _labels(_take(resumed, 6)) == expected


def test_process_shards_are_disjoint_and_cover_the_data(paths):
  seen = []
  for index in range(3):
    ds = _dataset(paths, num_epochs=1, batch_size=1, drop_remainder=False,
                  process_index=index, process_count=3)
    seen.append({label for batch in _labels(ds) for label in batch})
  assert all(a.isdisjoint(b) for a, b in itertools.combinations(seen, 2))
  assert set().union(*seen) == set(range(NUM_RECORDS))


def _write_mixed_records(tmp_path):
  """One shard of good records (labels 0-3) and four bad ones: [good 0, not msgpack, wrong
  image size, good 1, two texts, undecodable PNG, good 2, good 3]. Returns its path."""
  good = testing.caption_image_records(4, IMAGE_SHAPE)
  wrong_size = testing.caption_image_records(1, (4, 4, 3))[0]
  two_texts = records.InterleavedRecord(
      (records.TextSegment("a"), records.TextSegment("b"), good[0].segments[1]), {})
  bad_png = records.InterleavedRecord((records.TextSegment("c"), records.ImageSegment(b"junk")), {})
  payloads = [records.encode_record(good[0]), b"\x00not msgpack", records.encode_record(wrong_size),
              records.encode_record(good[1]), records.encode_record(two_texts),
              records.encode_record(bad_png)] + [records.encode_record(r) for r in good[2:]]
  path = str(tmp_path / "mixed-00000-of-00001.array_record")
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for payload in payloads:
    writer.write(payload)
  writer.close()
  return path


def test_malformed_and_mismatched_records_are_skipped_and_counted(tmp_path, caplog):
  path = _write_mixed_records(tmp_path)
  skips = pipeline.SkipCounter()
  ds = pipeline.make_dataset([path], _transform(), batch_size=1, seed=0, num_epochs=2,
                             skip_counter=skips)
  with caplog.at_level(logging.WARNING):
    labels = sorted(label for batch in _labels(ds) for label in batch)
  assert labels == [0, 0, 1, 1, 2, 2, 3, 3]
  assert skips.count == 4  # each bad record counted and logged once, though read in both epochs
  assert sorted(r.getMessage() for r in caplog.records if "skipping" in r.getMessage()) == sorted(
      f"skipping {where}: {reason}" for where, reason in skips.reasons.items())
  reasons = skips.reasons
  assert set(reasons) == {f"{path} record {i}" for i in (1, 2, 4, 5)}
  assert "not valid msgpack" in reasons[f"{path} record 1"]
  assert "image shape (4, 4, 3)" in reasons[f"{path} record 2"]
  assert "one text and one image" in reasons[f"{path} record 4"]
  assert "undecodable PNG" in reasons[f"{path} record 5"]


def test_label_defaults_to_minus_one():
  record = records.InterleavedRecord(testing.caption_image_records(1, IMAGE_SHAPE)[0].segments, {})
  assert _transform()(record)["label"] == -1


def test_orbax_round_trips_iterator_state_with_async_saves(paths, tmp_path):
  iterator = iter(_dataset(paths))
  _take(iterator, 4)
  options = ocp.CheckpointManagerOptions(
      enable_async_checkpointing=True, preservation_policy=ocp.checkpoint_managers.LatestN(2))
  with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as manager:
    manager.save(4, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"w": np.arange(3.0)}),
        data_iter=grain.checkpoint.CheckpointSave(iterator)))
    expected = _labels(_take(iterator, 5))  # advancing during the async save must not leak in
    manager.wait_until_finished()
    resumed = iter(_dataset(paths))
    manager.restore(4, args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointRestore(resumed)))
  assert _labels(_take(resumed, 5)) == expected
  assert os.path.exists(tmp_path / "ckpt" / "4" / "data_iter")


def test_make_dataset_rejects_bad_arguments(paths, tmp_path):
  with pytest.raises(ValueError, match="at least one"):
    pipeline.make_dataset([], _transform(), batch_size=1, seed=0)
  with pytest.raises(ValueError, match="process_index 2"):
    _dataset(paths, process_index=2, process_count=2)
  with pytest.raises(FileNotFoundError, match="absent.array_record"):
    _dataset([str(tmp_path / "absent.array_record")])
  (tmp_path / "junk.array_record").write_bytes(b"junk")
  with pytest.raises(ValueError, match="junk.array_record.*not a readable ArrayRecord"):
    _dataset([str(tmp_path / "junk.array_record")])


# ---- elastic batches: batch k is a pure function of (seed, k) -------------------------------

def _elastic(paths, process_index=0, process_count=1, *, batch_size=4, shuffle=True, seed=7,
             **kwargs):
  """Process `process_index`'s rows of the elastic global batches of `paths`."""
  examples = pipeline.example_dataset(paths, _transform(), seed=seed, shuffle=shuffle,
                                      skip_counter=kwargs.pop("skip_counter", None))
  rows = pipeline.process_rows(batch_size, process_index, process_count)
  return pipeline.elastic_batched(examples, batch_size=batch_size, rows=rows, **kwargs)


def _global_batches(paths, process_count, start_step, count, **kwargs):
  """Global batches start_step … start_step + count - 1, each the concatenation of every
  process's rows (how `sharding.global_batch` assembles them)."""
  parts = [_take(iter(_elastic(paths, p, process_count, start_step=start_step, **kwargs)), count)
           for p in range(process_count)]
  return [{key: np.concatenate([rows[key] for rows in batch_rows]) for key in batch_rows[0]}
          for batch_rows in zip(*parts)]


def test_elastic_batches_are_the_default_batches_with_one_process(paths):
  expected = _take(iter(_dataset(paths, batch_size=4)), 12)    # 48 examples: into epoch 3
  _assert_batches_equal(_take(iter(_elastic(paths)), 12), expected)
  _assert_batches_equal(_take(iter(_elastic(paths, read_threads=0, start_step=5)), 7),
                        expected[5:])


@pytest.mark.parametrize("process_count", [2, 4])
def test_elastic_batch_k_is_the_same_for_any_process_count(paths, process_count):
  expected = _take(iter(_elastic(paths)), 12)
  for start in (0, 7):                                        # from scratch; resumed at step 7
    _assert_batches_equal(_global_batches(paths, process_count, start, 12 - start),
                          expected[start:])
  shares = [_take(iter(_elastic(paths, p, process_count)), 1)[0]["label"]
            for p in range(process_count)]
  assert all(len(share) == 4 // process_count for share in shares)
  assert len(set(np.concatenate(shares).tolist())) == 4       # the processes' rows differ


def test_elastic_skipped_record_is_replaced_by_the_next_good_one(tmp_path):
  """Unshuffled, the slots hold [0, bad, bad, 1, bad, bad, 2, 3] and again: each bad slot
  takes the next decodable record, for every process count; the default drops and shifts."""
  paths = [_write_mixed_records(tmp_path)]
  expected = [[0, 1, 1, 1], [2, 2, 2, 3], [0, 1, 1, 1], [2, 2, 2, 3]]
  for process_count in (1, 2, 4):
    skips = pipeline.SkipCounter()
    batches = _global_batches(paths, process_count, 0, 4, shuffle=False, skip_counter=skips)
    assert _labels(batches) == expected
    assert skips.count == 4
  assert _labels(_global_batches(paths, 2, 3, 1, shuffle=False)) == expected[3:]
  default = pipeline.make_dataset(paths, _transform(), batch_size=4, seed=7, shuffle=False)
  assert _labels(_take(iter(default), 2)) == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_elastic_rejects_bad_rows(paths):
  with pytest.raises(ValueError, match="not divisible by 3 processes"):
    pipeline.process_rows(4, 0, 3)
  with pytest.raises(ValueError, match="process_index 2"):
    pipeline.process_rows(4, 2, 2)
  examples = pipeline.example_dataset(paths, _transform(), seed=7)
  with pytest.raises(ValueError, match=r"rows \(3, 2\)"):
    pipeline.elastic_batched(examples, batch_size=4, rows=(3, 2))
