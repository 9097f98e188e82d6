"""Train-step throughput: tokens/s and achieved GFLOP/s, for experiment configs given as
`module:preset` of `experiments/` (default: the caption demo, its wide preset, and the
STARFlow2 demo's stages 1–3).

    python benchmarks/train_throughput.py [--configs fashion_mnist:,fashion_mnist:wide]
        [--repeats 5] [--batch_size 0]

Tokens are the sequence positions each example occupies (for the caption flow: latent
elements plus the caption and start positions the deep block reads; for the Pretzel stages:
the padded interleaved length). The batch is the task's zero batch (same shapes and work as
real data). FLOPs come from XLA's cost analysis of the compiled step (forward, backward and
AdamW).
"""

import argparse
import importlib

import flax.linen as nn
import jax

from benchmarks import common
from starflow2_jax import sharding
from starflow2_jax.training import state as state_lib
from starflow2_jax.training import tasks
from starflow2_jax.training import trainer

DEFAULT_CONFIGS = ("fashion_mnist:,fashion_mnist:wide,fashion_mnist_stages:stage1,"
                   "fashion_mnist_stages:stage2,fashion_mnist_stages:stage3")


def load_config(name):
  module, _, preset = name.partition(":")
  return importlib.import_module(f"experiments.{module}").get_config(preset)


def benchmark(name, repeats, batch_size=0):
  config = load_config(name)
  if batch_size:
    config.train.batch_size = batch_size
  task = tasks.build_task(config)
  mesh, rules = sharding.mesh_and_rules(config.mesh)
  batch_size = config.train.batch_size
  batch = jax.tree.map(jax.device_get, task.dummy_batch(batch_size))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    optimizer, schedule, _, shardings = trainer.plan_state(config, task, mesh, rules)
    state = state_lib.create_state(task.init_params, optimizer, shardings, jax.random.key(0))
    step = jax.jit(trainer.make_train_step(task, optimizer, schedule, 0,
                                           config.optimizer.trainable))
    batch = sharding.global_batch(batch, mesh, rules)
    flops = common.compiled_flops(step, state, batch)
    seconds = common.time_calls(lambda s, b: step(s, b)[1]["loss"], state, batch, repeats=repeats)
  tokens = batch_size * task.positions_per_example
  params = sum(x.size for x in jax.tree.leaves(state.params))
  return dict(name=name, params=params, batch=batch_size, tokens_per_step=tokens,
              step_seconds=seconds, tokens_per_second=tokens / seconds,
              gflops_per_second=(flops / seconds / 1e9) if flops else float("nan"))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default=DEFAULT_CONFIGS)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--batch_size", type=int, default=0, help="0: the config's")
  args = parser.parse_args()
  print(f"devices: {jax.devices()}")
  print(f"{'config':>27} {'params':>10} {'batch':>6} {'tokens/step':>12} {'step s':>8} "
        f"{'tokens/s':>10} {'GFLOP/s':>8}")
  for name in args.configs.split(","):
    r = benchmark(name, args.repeats, args.batch_size)
    print(f"{r['name']:>27} {r['params']:>10,} {r['batch']:>6} {r['tokens_per_step']:>12,} "
          f"{r['step_seconds']:>8.3f} {r['tokens_per_second']:>10,.0f} "
          f"{r['gflops_per_second']:>8.1f}")


if __name__ == "__main__":
  main()
