"""From the config's `data` section to per-process batches (numpy) for the trainer.

The record format and the Grain pipeline live in `data_pipelines/`, and records are written
by `starflow2 prepare-data` alone; this module only chooses files, seeds and this process's
share.
"""

import os
import shlex

import jax

from data_pipelines import mixture
from data_pipelines import pipeline
from data_pipelines import writers


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


def train_dataset(config, task, data_dir, skip_counter=None):
  """An endless, shuffled, checkpointable dataset of this process's training batches: of
  `data.train_split`, or of the weighted `data.mixture` when the config has one."""
  options = dict(batch_size=_per_process_batch(config.train.batch_size), seed=config.seed,
                 process_index=jax.process_index(), process_count=jax.process_count(),
                 skip_counter=skip_counter, read_threads=config.data.read_threads)
  components = mixture_components(config, data_dir)
  if components:
    return mixture.make_mixture_dataset(components, task.example_transform(), **options)
  paths = writers.find_split_files(data_dir, config.data.train_split)
  return pipeline.make_dataset(paths, task.example_transform(), shuffle=True, **options)


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
  for i, b in enumerate(ds):
    if i >= num_batches:
      break
    yield b
