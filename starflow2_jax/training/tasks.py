"""Tasks by name: `config.task` picks what the trainer trains (big_vision-style plug-ins)."""

from starflow2_jax.training import caption_to_image
from starflow2_jax.training import pretzel_stages

TASKS = {
    "caption_to_image": caption_to_image.CaptionToImageTask,
    "pretzel": pretzel_stages.PretzelTask,
}


def build_task(config):
  try:
    task_cls = TASKS[config.task]
  except KeyError:
    raise ValueError(f"config.task={config.task!r} is not one of {sorted(TASKS)}") from None
  return task_cls(config)
