"""From the config's `data` section to per-process batches (numpy) for the trainer.

Record writing, the record format and the Grain pipeline live in `data_pipelines/`; this
module only chooses files, seeds and this process's share.
"""

import logging
import os

import jax

from data_pipelines import fashion_mnist
from data_pipelines import fashion_mnist_stages
from data_pipelines import pipeline
from data_pipelines import writers

# How to create missing records, by `config.data.source`.
RECORD_SOURCES = {
    "fashion_mnist": lambda cfg, out_dir: fashion_mnist.write_fashion_mnist(cfg.source_dir, out_dir),
    "fashion_mnist_stages": lambda cfg, out_dir: fashion_mnist_stages.write_stage_records(
        cfg.source_dir, out_dir),
}


def prepare_data_dir(config, workdir):
  """The records directory; writes the records first if it holds none for the train split."""
  cfg = config.data
  data_dir = cfg.dir or os.path.join(workdir, "data")
  try:
    writers.find_split_files(data_dir, cfg.train_split)
    return data_dir
  except FileNotFoundError:
    if cfg.source not in RECORD_SOURCES:
      raise
  if jax.process_index() == 0:
    logging.info("writing %s records to %s", cfg.source, data_dir)
    RECORD_SOURCES[cfg.source](cfg, data_dir)
  return data_dir


def _per_process_batch(batch_size):
  if batch_size % jax.process_count():
    raise ValueError(f"batch size {batch_size} is not divisible by {jax.process_count()} processes")
  return batch_size // jax.process_count()


def train_dataset(config, task, data_dir, skip_counter=None):
  """An endless, shuffled, checkpointable dataset of this process's training batches."""
  paths = writers.find_split_files(data_dir, config.data.train_split)
  return pipeline.make_dataset(
      paths, task.example_transform(), batch_size=_per_process_batch(config.train.batch_size),
      seed=config.seed, shuffle=True, process_index=jax.process_index(),
      process_count=jax.process_count(), skip_counter=skip_counter,
      read_threads=config.data.read_threads)


def eval_batches(config, task, data_dir):
  """The first `eval.num_examples` held-out examples, in order, in full batches."""
  cfg = config.eval
  batch = _per_process_batch(cfg.batch_size)
  paths = writers.find_split_files(data_dir, config.data.test_split)
  ds = pipeline.make_dataset(
      paths, task.example_transform(), batch_size=batch, seed=config.seed, shuffle=False,
      num_epochs=1, process_index=jax.process_index(), process_count=jax.process_count())
  num_batches = cfg.num_examples // cfg.batch_size
  for i, b in enumerate(ds):
    if i >= num_batches:
      break
    yield b
