"""What the trainer trains: the `Task` protocol and the tasks by name (`config.task`).

A task owns its model, its losses and its held-out metrics; the trainer owns everything else
(mesh, state, data order, checkpoints, logging) and reaches the task only through this
protocol (big_vision-style plug-ins).
"""

from typing import Any, Callable, Protocol

import jax
import ml_collections
import numpy as np

from starflow2_jax.training import caption_task
from starflow2_jax.training import dinov2_task
from starflow2_jax.training import fae_task
from starflow2_jax.training import pretzel_task

Params = Any      # a pytree of arrays
Batch = dict      # name -> array, as the example transform makes them (batched)


class Task(Protocol):
  """The trainer's view of a task."""

  config: ml_collections.ConfigDict

  @property
  def positions_per_example(self) -> int:
    """Sequence positions one example costs (for throughput figures)."""

  def example_transform(self) -> Callable[[Any], dict]:
    """Decoded record -> example arrays (`data_pipelines.examples`); raises
    `pipeline.RecordMismatchError` for records the task cannot use (they are skipped)."""

  def dummy_batch(self, batch: int = 1) -> Batch:
    """A zero batch of the training shapes (initialisation, benchmarks)."""

  def init_params(self, rng: jax.Array) -> Params:
    """Freshly initialised parameters."""

  def warm_start(self, params: Params) -> Params:
    """Fresh parameters with whatever the config says to load put in (earlier stages, VLM)."""

  def loss(self, params: Params, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict]:
    """(scalar loss, metrics) of one training batch."""

  def eval_metrics(self, params: Params, batch: Batch, rng: jax.Array) -> dict:
    """Held-out metrics of one batch (averaged over batches by the trainer)."""

  def sample_captions(self, params: Params, captions: list, rng: jax.Array,
                      guidance_weight: float | None = None) -> np.ndarray:
    """uint8 images [B, H, W, C], one for each caption."""

  def sample_grid(self, params: Params, rng: jax.Array) -> tuple | None:
    """(grid image, …) of samples for TensorBoard and the workdir; None if it draws none."""


TASKS = {
    "caption_to_image": caption_task.CaptionToImageTask,
    "dinov2_pretrain": dinov2_task.Dinov2PretrainTask,
    "fae": fae_task.FAETask,
    "pretzel": pretzel_task.PretzelTask,
}


def build_task(config) -> Task:
  """The task `config.task` names, built from `config`."""
  try:
    task_cls = TASKS[config.task]
  except KeyError:
    raise ValueError(f"config.task={config.task!r} is not one of {sorted(TASKS)}") from None
  return task_cls(config)
