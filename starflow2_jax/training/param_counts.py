"""Parameter counts of any config's task, built abstractly (`jax.eval_shape`: nothing allocated).

    python -m starflow2_jax.training.param_counts \
        --config experiments/starflow2.py:stage=3,size=paper

Prints each top-level part's count, the parameters the stage trains (its
`optimizer.trainable` patterns) and the total. The paper preset: docs/pretzel.md.
"""

import jax
import numpy as np
from absl import app
from ml_collections import config_flags

from starflow2_jax import sharding
from starflow2_jax.training import plan
from starflow2_jax.training import tasks


def abstract_params(config):
  """The task's parameter tree as ShapeDtypeStructs."""
  task = tasks.build_task(config)
  return sharding.strip_axis_names(jax.eval_shape(task.init_params, jax.random.key(0)))


def param_counts(config):
  """{part: count} for the top-level parts, plus `trainable` and `total`."""
  params = abstract_params(config)
  size = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
  counts = {name: size(sub) for name, sub in params.items()}
  counts["trainable"], frozen = plan.parameter_counts(params, config.optimizer.trainable)
  counts["total"] = counts["trainable"] + frozen
  return counts


def main(argv):
  del argv
  for name, count in param_counts(_CONFIG.value).items():
    print(f"{name:>14}: {count / 1e9:7.3f}B  ({count:,})")


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", None, "An experiment config file.")
  app.run(main)
