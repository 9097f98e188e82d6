"""Tests for weighted data mixtures: realised proportions within 1% of the weights over 10k
examples, determinism, exact resume mid-mixture (iterator state and Orbax), the counter the
trainer logs from, config errors that name the key, and `config.data.mixture` end to end;
the single-process order pinned; elastic mixtures (`data.elastic`): the default's batches
with one process, batch k the same for any process count."""

import itertools

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from data_pipelines import examples
from data_pipelines import mixture
from data_pipelines import pipeline
from data_pipelines import records
from data_pipelines import writers
import fake_data as testing
from starflow2_jax.training import data as data_lib

IMAGE_SHAPE = (4, 4, 3)
# Component i's records carry labels 100_000·i + j, so a label tells its component. Very
# different lengths; not tinier, since Grain's index_shuffle takes milliseconds per index
# below ~100 records (its cycle-walking), against microseconds from ~10k.
SIZES = {"understand": 600, "generate": 3000, "interleaved": 11000}
SPAN = 100_000
WEIGHTS = (0.5, 0.3, 0.2)    # the shortest component gets the largest weight: it cycles most


def _component_records(component, count):
  return [records.InterleavedRecord(r.segments, {"label": SPAN * component + i})
          for i, r in enumerate(testing.caption_image_records(count, IMAGE_SHAPE))]


@pytest.fixture(scope="module", name="dirs")
def _dirs(tmp_path_factory):
  """{"data": the run's records dir (understand, generate), "other": interleaved}."""
  root = tmp_path_factory.mktemp("mixture")
  for i, (split, size) in enumerate(SIZES.items()):
    folder = root / ("other" if split == "interleaved" else "data")
    writers.write_records(_component_records(i, size), folder, split, num_shards=2)
  return {"data": str(root / "data"), "other": str(root / "other")}


def _entries(dirs, weights=WEIGHTS):
  return [dict(name="und", split="understand", weight=weights[0]),
          dict(split="generate", dir="", weight=weights[1]),           # name defaults to split
          dict(name="inter", split="interleaved", dir=dirs["other"], weight=weights[2])]


def _dataset(dirs, weights=WEIGHTS, **kwargs):
  components = mixture.parse_mixture(_entries(dirs, weights), dirs["data"])
  kwargs = {"batch_size": 4, "seed": 3, "read_threads": 0, **kwargs}
  return mixture.make_mixture_dataset(
      components, examples.CaptionImageExample(IMAGE_SHAPE, 12), **kwargs)


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _assert_batches_equal(actual, expected):
  assert len(actual) == len(expected)
  for a, e in zip(actual, expected):
    assert sorted(a) == sorted(e)
    for key in e:
      np.testing.assert_array_equal(a[key], e[key], err_msg=key)


@pytest.mark.parametrize("weights", [WEIGHTS, (1.0, 2.5, 6.5)])
def test_proportions_over_10k_examples_are_within_1_percent(dirs, weights):
  counter = mixture.MixtureCounter(["und", "generate", "inter"])
  labels = [[] for _ in SIZES]
  for batch in _take(iter(_dataset(dirs, weights, batch_size=250)), 40):   # 10,000 examples
    sources = batch[mixture.SOURCE_KEY]
    assert sources.dtype == np.int32
    np.testing.assert_array_equal(batch["label"] // SPAN, sources)   # tagged with its component
    for source, label in zip(sources, batch["label"]):
      labels[source].append(label % SPAN)
    assert mixture.SOURCE_KEY not in counter.pop(batch)
  fractions = counter.fractions()
  shares = np.asarray(weights) / sum(weights)
  assert list(fractions) == ["und", "generate", "inter"]
  np.testing.assert_allclose(list(fractions.values()), shares, rtol=0, atol=0.01)
  # Each component reads its records evenly: the short one cycles through all of them, eight
  # times over (len(seen) = 5000 from 600 records), the long one meets each at most once.
  for seen, size in zip(labels, SIZES.values()):
    counts = np.bincount(seen, minlength=size)
    assert len(counts) == size and counts.max() - counts.min() <= 1, counts


# The first batches of `_dataset(dirs)` as the pipeline made them before elastic batching
# existed: the single-process order must never change.
TODAYS_LABELS = [[507, 100208, 326, 102708], [543, 206180, 567, 100147],
                 [337, 210357, 530, 102253]]


def test_single_process_mixture_keeps_todays_order(dirs):
  assert [b["label"].tolist() for b in _take(iter(_dataset(dirs)), 3)] == TODAYS_LABELS


def _elastic(dirs, rows=None, start_step=0):
  components = mixture.parse_mixture(_entries(dirs), dirs["data"])
  mixed = mixture.mixed_examples(components, examples.CaptionImageExample(IMAGE_SHAPE, 12),
                                 seed=3)
  return pipeline.elastic_batched(mixed, batch_size=4, rows=rows, start_step=start_step,
                                  read_threads=0)


def test_elastic_mixture_batch_k_is_the_same_for_any_process_count(dirs):
  expected = _take(iter(_dataset(dirs)), 8)                 # the default, one process
  _assert_batches_equal(_take(iter(_elastic(dirs)), 8), expected)
  for start in (0, 5):
    halves = [_take(iter(_elastic(dirs, pipeline.process_rows(4, p, 2), start)), 8 - start)
              for p in range(2)]
    joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*halves)]
    _assert_batches_equal(joined, expected[start:])


def test_same_seed_gives_same_batches(dirs):
  first = _take(iter(_dataset(dirs)), 8)
  _assert_batches_equal(_take(iter(_dataset(dirs)), 8), first)
  other = _take(iter(_dataset(dirs, seed=4)), 8)
  labels, other_labels = (np.concatenate([b["label"] for b in bs]) for bs in (first, other))
  assert not np.array_equal(other_labels, labels)              # records reshuffled …
  np.testing.assert_array_equal(other_labels // SPAN, labels // SPAN)   # … not the interleaving


@pytest.mark.parametrize("consumed", [1, 301])  # the 600-record component mid-epoch; past it
def test_get_state_set_state_resumes_mid_mixture_exactly(dirs, consumed):
  iterator = iter(_dataset(dirs))
  head = _take(iterator, consumed)
  state = iterator.get_state()
  expected = _take(iterator, 6)
  resumed = iter(_dataset(dirs))
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 6), expected)
  assert not np.array_equal(expected[0]["label"], head[0]["label"])   # the position matters


def test_orbax_round_trips_mixture_iterator(dirs, tmp_path):
  iterator = iter(_dataset(dirs))
  _take(iterator, 5)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    expected = _take(iterator, 4)
    resumed = iter(_dataset(dirs))
    manager.restore(5, args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointRestore(resumed)))
  _assert_batches_equal(_take(resumed, 4), expected)


def test_counter_pops_sources_and_gives_window_fractions():
  counter = mixture.MixtureCounter(["a", "b", "c"])
  image = np.zeros((4, 2))
  batch = counter.pop({"image": image, mixture.SOURCE_KEY: np.array([0, 2, 2, 2], np.int32)})
  assert set(batch) == {"image"} and batch["image"] is image
  counter.pop({"image": image, mixture.SOURCE_KEY: np.array([2, 0, 2, 2], np.int32)})
  assert counter.fractions() == {"a": 0.25, "b": 0.0, "c": 0.75}
  assert counter.fractions() == {}                                   # a new window
  counter.pop({mixture.SOURCE_KEY: np.array([1], np.int32)})
  assert counter.fractions() == {"a": 0.0, "b": 1.0, "c": 0.0}
  unmixed = {"image": image}
  no_mixture = mixture.MixtureCounter([])
  assert no_mixture.pop(unmixed) is unmixed and no_mixture.fractions() == {}


def test_zero_weight_leaves_a_component_out_but_keeps_indices(dirs):
  counter = mixture.MixtureCounter(["und", "generate", "inter"])
  for batch in _take(iter(_dataset(dirs, (1.0, 0.0, 1.0))), 10):
    np.testing.assert_array_equal(batch["label"] // SPAN, batch[mixture.SOURCE_KEY])
    counter.pop(batch)
  assert counter.fractions() == {"und": 0.5, "generate": 0.0, "inter": 0.5}


def _broken(index, **changes):
  def entries(dirs):
    out = _entries(dirs)
    out[index] = {k: v for k, v in {**out[index], **changes}.items() if v is not None}
    return out
  return entries


@pytest.mark.parametrize("make_entries, error, match", [
    (_broken(2, weight=-0.1), ValueError, r"config\.data\.mixture\[2\]\.weight is -0\.1, negative"),
    (_broken(0, weight="half"), ValueError, r"config\.data\.mixture\[0\]\.weight is 'half'"),
    (_broken(1, weight=float("nan")), ValueError, r"config\.data\.mixture\[1\]\.weight is nan"),
    (_broken(1, weight=None), ValueError, r"config\.data\.mixture\[1\]\.weight is missing"),
    (_broken(0, split=None), ValueError, r"config\.data\.mixture\[0\]\.split is missing"),
    (_broken(1, wieght=1.0), ValueError, r"config\.data\.mixture\[1\] has unknown keys \['wieght'\]"),
    (_broken(1, split="edit"), FileNotFoundError,
     r"config\.data\.mixture\[1\] \(split 'edit'.*edit-NNNNN-of-NNNNN\.array_record"),
    (_broken(2, dir="/nonexistent/records"), FileNotFoundError,
     r"config\.data\.mixture\[2\] .*/nonexistent/records.*interleaved-NNNNN-of-NNNNN"),
    (_broken(2, name="und"), ValueError, r"config\.data\.mixture names \['und'\] more than once"),
    (lambda dirs: [dict(e, weight=0) for e in _entries(dirs)], ValueError, "weights sum to 0"),
    (lambda dirs: ["understand"], ValueError, r"config\.data\.mixture\[0\] is 'understand'"),
])
def test_config_errors_name_the_key(dirs, make_entries, error, match):
  with pytest.raises(error, match=match):
    mixture.parse_mixture(make_entries(dirs), dirs["data"])


class _CaptionTask:
  def example_transform(self):
    return examples.CaptionImageExample(IMAGE_SHAPE, 12)


def _config(dirs, entries):
  c = ml_collections.ConfigDict()
  c.seed = 3
  c.data = dict(dir=dirs["data"], train_split="absent", test_split="generate", read_threads=0,
                mixture=entries)
  c.train = dict(batch_size=10)
  return c


def test_config_data_mixture_feeds_training_batches(dirs, tmp_path):
  config = _config(dirs, _entries(dirs))
  data_dir = data_lib.records_dir(config, str(tmp_path))   # train_split "absent" is not needed
  batch = next(iter(data_lib.train_dataset(config, _CaptionTask(), data_dir)))
  counter = data_lib.mixture_counter(config, data_dir)
  assert set(counter.pop(batch)) == {"image", "caption_ids", "caption_mask", "label"}
  assert counter.fractions() == {"und": 0.5, "generate": 0.3, "inter": 0.2}
  config.data.mixture = []                                  # no mixture: the train split
  with pytest.raises(FileNotFoundError, match="split 'absent'"):
    data_lib.records_dir(config, str(tmp_path))
  assert data_lib.mixture_counter(config, data_dir).fractions() == {}


def test_config_data_elastic_feeds_the_same_training_batches(dirs, tmp_path):
  config = _config(dirs, _entries(dirs))
  data_dir = data_lib.records_dir(config, str(tmp_path))
  expected = _take(iter(data_lib.train_dataset(config, _CaptionTask(), data_dir)), 4)
  config.data.elastic = True
  elastic = data_lib.train_dataset(config, _CaptionTask(), data_dir)
  _assert_batches_equal(_take(iter(elastic), 4), expected)
  second_half = data_lib.train_dataset(config, _CaptionTask(), data_dir, start_step=2,
                                       rows=(5, 10))
  _assert_batches_equal(_take(iter(second_half), 2),
                        [{k: v[5:] for k, v in b.items()} for b in expected[2:]])
  config.data.elastic = False
  with pytest.raises(ValueError, match="checkpointed iterator"):
    data_lib.train_dataset(config, _CaptionTask(), data_dir, start_step=2)
