"""Weighted mixtures of record splits, mixed deterministically by Grain.

Each component is `pipeline.example_dataset` over one split (this process's records, shuffled
with its own seed, repeated forever, decoded); `grain.MapDataset.mix` interleaves them by
weight, and `pipeline.batched` batches the mixture. Every step is an index transformation,
so the batch at each position is a pure function of (seed, position), the iterator state is
a position, and resume is exact, as for a single split (`mixed_examples`, the mixture before
batching, also feeds `pipeline.elastic_batched`: batches independent of the process count).
Each example carries the index of its component as int32 `mixture_source`; `MixtureCounter`
pops it before the batch reaches the model and turns it into the realised proportions the
trainer logs. docs/data_mixtures.md describes the config.
"""

import dataclasses
import math
import numbers

import grain
import numpy as np

from data_pipelines import pipeline
from data_pipelines import writers

SOURCE_KEY = "mixture_source"
_KEYS = ("name", "dir", "split", "weight")


@dataclasses.dataclass(frozen=True)
class MixtureComponent:
  """One split of a mixture: its name (for logs), its shard paths and its weight (>= 0)."""

  name: str
  paths: tuple
  weight: float


def _entry_dict(entry, where):
  if not hasattr(entry, "items"):
    raise ValueError(f"{where} is {entry!r}: each component is a dict with keys {_KEYS}")
  entry = dict(entry.items())
  unknown = sorted(set(entry) - set(_KEYS))
  if unknown:
    raise ValueError(f"{where} has unknown keys {unknown}: the keys are {_KEYS}")
  for key in ("split", "weight"):
    if key not in entry:
      raise ValueError(f"{where}.{key} is missing")
  return entry


def _weight(value, where):
  """The weight as a float: a finite number >= 0 (0 leaves the component out)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
    raise ValueError(f"{where}.weight is {value!r}: a weight is a finite number >= 0")
  if value < 0:
    raise ValueError(f"{where}.weight is {value!r}, negative: a weight is a finite number >= 0")
  return float(value)


def _component(entry, where, default_dir):
  entry = _entry_dict(entry, where)
  split = entry["split"]
  data_dir = entry.get("dir") or default_dir
  try:
    paths = writers.find_split_files(data_dir, split)
  except (FileNotFoundError, ValueError) as e:
    raise type(e)(f"{where} (split {split!r}, dir {data_dir!r}): {e}") from None
  return MixtureComponent(str(entry.get("name") or split), tuple(paths),
                          _weight(entry["weight"], where))


def parse_mixture(entries, default_dir, key="config.data.mixture"):
  """Checks a mixture config and finds its shards; [] for an empty one.

  Args:
    entries: a list of dicts {name (default: split), dir ("" = `default_dir`), split,
      weight (>= 0; 0 leaves the component out but keeps its index and name)}.
    default_dir: the run's records directory.
    key: the config key of `entries`, named in every error.

  Returns:
    A list of MixtureComponent, in config order (the order defines `mixture_source`).

  Raises:
    ValueError, FileNotFoundError: naming the offending `key[i].field` (and, for missing
      records, the file pattern looked for).
  """
  components = [_component(entry, f"{key}[{i}]", default_dir) for i, entry in enumerate(entries)]
  names = [c.name for c in components]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ValueError(f"{key} names {repeated} more than once: give each component its own name")
  if components and not sum(c.weight for c in components) > 0:
    raise ValueError(f"{key}: the weights sum to 0; give at least one component a positive weight")
  return components


class _WithSource:
  """The example transform, plus the component index as int32 `mixture_source`."""

  def __init__(self, transform, source):
    self._transform = transform
    self._source = np.int32(source)

  def __call__(self, record):
    return {**self._transform(record), SOURCE_KEY: self._source}


def component_seed(seed, index):
  """Component `index`'s shuffle seed: independent of the others', a function of both."""
  return int(np.random.SeedSequence((seed, index)).generate_state(1)[0])


def make_mixture_dataset(components, transform, *, batch_size, seed, process_index=0,
                         process_count=1, skip_counter=None, read_threads=2):
  """An endless, batched, checkpointable grain.IterDataset mixing `components` by weight.

  Each component with a positive weight is `pipeline.example_dataset` over its shards
  (shuffled with `component_seed(seed, i)`, repeated forever, so one with few records simply
  cycles); `grain.MapDataset.mix` interleaves them so that every run of Grain's period of
  consecutive examples holds each component in proportion to its weight. Then skipped
  records are dropped and the rest batched, as in `pipeline.make_dataset`, whose other
  arguments these are (one SkipCounter serves all components).

  Returns:
    A grain.IterDataset of batches with the transform's fields plus int32 `mixture_source`
    (the component's index in `components`).
  """
  mixed = mixed_examples(components, transform, seed=seed, process_index=process_index,
                         process_count=process_count, skip_counter=skip_counter)
  return pipeline.batched(mixed, batch_size=batch_size, read_threads=read_threads)


def mixed_examples(components, transform, *, seed, process_index=0, process_count=1,
                   skip_counter=None):
  """The front half of `make_mixture_dataset`: a grain.MapDataset of examples mixed by
  weight (None = skipped), for `pipeline.batched` or `pipeline.elastic_batched`."""
  if not components or not sum(c.weight for c in components) > 0:
    raise ValueError("a mixture needs at least one component with a positive weight")
  skips = skip_counter if skip_counter is not None else pipeline.SkipCounter()
  parts, weights = [], []
  for i, component in enumerate(components):
    if component.weight > 0:
      parts.append(pipeline.example_dataset(
          component.paths, _WithSource(transform, i), seed=component_seed(seed, i),
          process_index=process_index, process_count=process_count, skip_counter=skips))
      weights.append(component.weight)
  return grain.MapDataset.mix(parts, weights) if len(parts) > 1 else parts[0]


def source_counts(sources, num_sources):
  """How many of `sources` (component indices, any shape) equal each of 0 … num_sources - 1."""
  return np.bincount(np.asarray(sources).reshape(-1), minlength=num_sources)[:num_sources]


class MixtureCounter:
  """Counts each component's examples in the batches of a logging window.

  `pop` takes `mixture_source` out of a host batch (the model never sees it) and counts it;
  `fractions` gives {name: realised fraction} since the last call. Without components it
  passes batches through and has nothing to report.
  """

  def __init__(self, names):
    self._names = list(names)
    self._counts = np.zeros(len(self._names), np.int64)

  def pop(self, batch):
    """`batch` without `mixture_source`, whose values are counted."""
    if not self._names:
      return batch
    batch = dict(batch)
    self._counts += source_counts(batch.pop(SOURCE_KEY), len(self._names))
    return batch

  def fractions(self):
    """{name: fraction of the window's examples}; {} if nothing was counted. Resets."""
    total = int(self._counts.sum())
    if not total:
      return {}
    values = {name: float(count / total) for name, count in zip(self._names, self._counts)}
    self._counts[:] = 0
    return values
