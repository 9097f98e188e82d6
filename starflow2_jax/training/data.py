"""From the config's `data` section to per-process batches (numpy) for the trainer.

The record format and the Grain pipeline live in `data_pipelines/`, and records are written
by `starflow2 prepare-data` alone; this module only chooses files, seeds and this process's
share.

Two ways to share the training batches among processes (`data.elastic`):
- default: each process reads its own records (`[process_index::process_count]`) and Grain's
  iterator position is checkpointed per process; a run resumes with the same process count.
- elastic: batch k is a pure function of (seed, k) whatever the process count; each process
  decodes its rows of it (`pipeline.elastic_batched`) and the data position is the step, so
  a run resumes exactly with any number of processes. With one process and no skipped
  record it yields the default's batches.
"""

import functools
import os
import shlex

import jax

from data_pipelines import mixture
from data_pipelines import pipeline
from data_pipelines import writers
from starflow2_jax import sharding
from starflow2_jax.training import distributed


def records_dir(config, workdir):
  """The records directory of `config.data` (`dir`, or `<workdir>/data`), checked to hold the
  train and test splits. Training never writes records: when they are missing the error says
  which `starflow2 prepare-data` command creates them."""
  cfg = config.data
  data_dir = cfg.dir or os.path.join(workdir, "data")
  train_splits = () if cfg.get("mixture") else (cfg.train_split,)  # a mixture's: checked apart
  for split in (*train_splits, cfg.test_split):
    try:
      writers.find_split_files(data_dir, split)
    except FileNotFoundError as e:
      command = ["starflow2", "prepare-data", f"--source={cfg.get('source', 'SOURCE')}",
                 f"--out={data_dir}"]
      if cfg.get("source_dir"):
        command.append(f"--source_dir={cfg.source_dir}")
      raise FileNotFoundError(
          f"{e}\nconfig.data names records that do not exist yet; create them with:\n  "
          f"{shlex.join(command)}") from None
  return data_dir


def _per_process_batch(batch_size):
  if batch_size % jax.process_count():
    raise ValueError(f"batch size {batch_size} is not divisible by {jax.process_count()} processes")
  return batch_size // jax.process_count()


def mixture_components(config, data_dir):
  """The checked components of `config.data.mixture` (docs/data_mixtures.md); [] without one."""
  return mixture.parse_mixture(config.data.get("mixture") or [], data_dir)


def is_elastic(config):
  """Whether batch k is a pure function of (seed, k) for any process count (`data.elastic`)."""
  return bool(config.data.get("elastic", False))


def train_examples(config, task, data_dir, process_index=0, process_count=1, skip_counter=None):
  """The training examples of a process's records in their seeded order, endless (None =
  skipped): of the weighted `data.mixture` when the config has one, else `data.train_split`."""
  options = dict(seed=config.seed, process_index=process_index, process_count=process_count,
                 skip_counter=skip_counter)
  components = mixture_components(config, data_dir)
  if components:
    return mixture.mixed_examples(components, task.example_transform(), **options)
  paths = writers.find_split_files(data_dir, config.data.train_split)
  return pipeline.example_dataset(paths, task.example_transform(), shuffle=True, **options)


def train_dataset(config, task, data_dir, skip_counter=None, start_step=0, rows=None):
  """An endless, shuffled dataset of this process's training batches.

  Default: batches of this process's records, checkpointable (a Grain iterator position).
  Elastic (`data.elastic`): this process's `rows` (default: an even share, see
  `pipeline.process_rows`) of global batches `start_step`, `start_step + 1`, …
  """
  threads = config.data.read_threads
  if is_elastic(config):
    rows = rows or pipeline.process_rows(config.train.batch_size, jax.process_index(),
                                         jax.process_count())
    return pipeline.elastic_batched(train_examples(config, task, data_dir,
                                                   skip_counter=skip_counter),
                                    batch_size=config.train.batch_size, rows=rows,
                                    start_step=start_step, read_threads=threads)
  if start_step:
    raise ValueError("without data.elastic the position comes from a checkpointed iterator")
  examples = train_examples(config, task, data_dir, jax.process_index(), jax.process_count(),
                            skip_counter)
  return pipeline.batched(examples, batch_size=_per_process_batch(config.train.batch_size),
                          read_threads=threads)


class TrainBatches:
  """This process's training batches, and what a checkpoint keeps of their position.

  Default: one Grain iterator, whose position Orbax saves and restores with the state
  (`checkpointed`). Elastic: the position is the step, nothing is saved (`checkpointed` is
  None), and `start(step)` opens the batches at that step, this process's rows of each
  global batch being where the batch sharding on `mesh` puts its data.
  """

  def __init__(self, config, task, data_dir, mesh, rules):
    self.elastic = is_elastic(config)
    rows = (distributed.process_rows(sharding.batch_sharding(mesh, rules),
                                     config.train.batch_size) if self.elastic else None)
    self._dataset = functools.partial(train_dataset, config, task, data_dir, rows=rows)
    self.checkpointed = None if self.elastic else iter(self._dataset())

  def start(self, step):
    """The iterator whose next batch is batch `step` (in the default mode: once restored)."""
    return iter(self._dataset(start_step=step)) if self.elastic else self.checkpointed


def mixture_counter(config, data_dir):
  """A MixtureCounter for the training batches: pops `mixture_source` and gives the realised
  proportions per logging window (a pass-through without a mixture)."""
  return mixture.MixtureCounter([c.name for c in mixture_components(config, data_dir)])


def eval_batches(config, task, data_dir, split=None, num_examples=None):
  """The first `num_examples` (default `eval.num_examples`) examples of `split` (default
  `data.test_split`), in order, in full batches."""
  cfg = config.eval
  batch = _per_process_batch(cfg.batch_size)
  paths = writers.find_split_files(data_dir, split or config.data.test_split)
  ds = pipeline.make_dataset(
      paths, task.example_transform(), batch_size=batch, seed=config.seed, shuffle=False,
      num_epochs=1, process_index=jax.process_index(), process_count=jax.process_count())
  num_batches = (num_examples or cfg.num_examples) // cfg.batch_size
  if not num_batches:
    raise ValueError(f"{num_examples or cfg.num_examples} held-out examples make no batch of "
                     f"config.eval.batch_size={cfg.batch_size}")
  for i, b in enumerate(ds):
    if i >= num_batches:
      break
    yield b
