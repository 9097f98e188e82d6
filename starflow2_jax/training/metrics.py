"""Metrics: clu aggregation on device, TensorBoard event files, a progress bar.

TensorBoard files are written with tensorboardX (clu's own writers import TensorFlow).
Only process 0 writes or prints.
"""

import functools

import jax
import numpy as np
import tensorboardX
import tqdm
from clu import metrics as clu_metrics


@functools.lru_cache(maxsize=None)
def averages(names):
  """A clu Collection class that averages each named scalar over the steps merged."""
  return clu_metrics.Collection.create(
      **{name: clu_metrics.Average.from_output(name) for name in names})


class MetricAccumulator:
  """Merges per-step metric dicts (on device, no host sync) until `compute()`."""

  def __init__(self):
    self._collection = None

  def add(self, step_metrics):
    single = averages(tuple(sorted(step_metrics))).single_from_model_output(**step_metrics)
    self._collection = single if self._collection is None else self._collection.merge(single)

  def compute(self):
    """Host floats of the averages since the last call; resets the accumulator."""
    if self._collection is None:
      return {}
    values = {k: float(v) for k, v in jax.device_get(self._collection.compute()).items()}
    self._collection = None
    return values


class MetricWriter:
  """TensorBoard scalars and images under `logdir` (process 0 only)."""

  def __init__(self, logdir):
    self._writer = tensorboardX.SummaryWriter(logdir) if jax.process_index() == 0 else None

  def scalars(self, step, values, prefix=""):
    if self._writer is not None:
      for name, value in values.items():
        self._writer.add_scalar(prefix + name, value, step)

  def image(self, step, name, image_hwc):
    if self._writer is not None:
      self._writer.add_image(name, np.asarray(image_hwc), step, dataformats="HWC")

  def flush(self):
    if self._writer is not None:
      self._writer.flush()

  def close(self):
    if self._writer is not None:
      self._writer.close()


def progress_bar(start_step, total_steps):
  """A tqdm bar that shows steps/s, the ETA and the latest loss (process 0 only)."""
  return tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                   mininterval=2.0, disable=jax.process_index() != 0)
