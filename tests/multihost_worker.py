"""One process of a multi-process `starflow2` run, for tests/test_multihost.py.

    python tests/multihost_worker.py OUT '["train", "--config", …]' '["train", …]'

Runs each command through the real command line (its `--coordinator_address
--num_processes --process_id` flags included) and writes, per command, the exit status and
the train losses the trainer logged, step by step, and the TensorBoard files it opened, to
`OUT.process<index>` (JSON). Every process records the losses, so the test can check that
all saw the same replicated metrics.

Also the config file those commands name (`get_config`): the tiny caption-to-image preset
made smaller still, so that two processes on two shared cores compile in seconds.
"""

import contextlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(preset=""):
  """experiments/fashion_mnist.py:tiny with one-layer, 16-wide streams, 4 steps of 8
  examples, a checkpoint every 2 steps, a loss logged every step and no samples."""
  del preset
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  from experiments import fashion_mnist
  c = fashion_mnist.get_config("tiny")
  c.latent.patch_size = 7
  c.model.caption_width = 16
  c.model.deep = dict(width=16, num_layers=1, num_heads=1, mlp_ratio=1.0)
  c.model.shallow = dict(width=16, num_layers=1, num_heads=1, mlp_ratio=1.0)
  c.model.num_shallow_blocks = 1
  c.eval.update(batch_size=8, num_examples=8)
  c.train.update(steps=4, batch_size=8, log_every=1, eval_every=0, checkpoint_every=2,
                 keep_checkpoints=3, final_samples=False)
  return c


@contextlib.contextmanager
def recorded_losses():
  """Yields {step: train loss}, filled by every `MetricWriter.scalars` call (on every
  process: the writer drops what process > 0 would write, the record keeps it), and
  {"tensorboard": how many TensorBoard files this process opened}."""
  from starflow2_jax.training import metrics
  losses, opened = {}, {"tensorboard": 0}
  scalars, summary_writer = metrics.MetricWriter.scalars, metrics.tensorboardX.SummaryWriter

  def record(self, step, values, prefix=""):
    if prefix == "train/" and "loss" in values:
      losses[int(step)] = float(values["loss"])
    return scalars(self, step, values, prefix)

  def open_writer(*args, **kwargs):
    opened["tensorboard"] += 1
    return summary_writer(*args, **kwargs)

  metrics.MetricWriter.scalars = record
  metrics.tensorboardX.SummaryWriter = open_writer
  try:
    yield losses, opened
  finally:
    metrics.MetricWriter.scalars = scalars
    metrics.tensorboardX.SummaryWriter = summary_writer


def main(argv):
  sys.path.insert(0, ROOT)
  import jax
  from starflow2_jax import cli
  out, commands = argv[1], [json.loads(a) for a in argv[2:]]
  results = []
  for command in commands:
    with recorded_losses() as (losses, opened):
      status = cli.run(["starflow2", *command])
    results.append(dict(status=status, losses=losses, **opened))
    if status:
      break
  with open(f"{out}.process{jax.process_index()}", "w") as f:
    json.dump(results, f)
  return max(r["status"] for r in results)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
