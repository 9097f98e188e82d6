"""Train-step throughput: tokens/s, achieved GFLOP/s and MFU, for experiment configs given
as `module:preset` of `experiments/` (default: the caption demo, its wide preset, and
STARFlow2's stages 1 and 3 at the demo size).

    python benchmarks/train_throughput.py [--configs fashion_mnist:,starflow2:stage=3,size=demo]
        [--repeats 5] [--batch_size 0] [--peak cpu|h100|h200|a100|tpu-v5p|tpu-v4]

MFU = the analytic model FLOPs of a step (6·N_trained·T + 2·N_frozen·T, as `starflow2 plan`
counts them) / step time / the peak: a chip's dense bf16 peak from `training/plan.py`'s
table, or on the CPU ("cpu", the default there) the best float32 matmul rate this machine
reaches (measured here, and printed).

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
from starflow2_jax.training import plan
from starflow2_jax.training import tasks
from starflow2_jax.training import trainer

DEFAULT_CONFIGS = ("fashion_mnist:,fashion_mnist:wide,starflow2:stage=1,size=demo,"
                   "starflow2:stage=3,size=demo")


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
  trained, frozen = plan.parameter_counts(state.params, config.optimizer.trainable)
  return dict(name=name, params=params, batch=batch_size, tokens_per_step=tokens,
              step_seconds=seconds, tokens_per_second=tokens / seconds,
              gflops_per_second=(flops / seconds / 1e9) if flops else float("nan"),
              model_flops_per_second=plan.analytic_flops(trained, frozen, tokens) / seconds)


def cpu_peak_flops(size=2048, repeats=5):
  """The best float32 matmul rate (FLOP/s) on this machine: what "cpu" MFU divides by."""
  a = jax.numpy.ones((size, size), jax.numpy.float32)
  seconds = common.time_calls(jax.jit(lambda x: x @ x), a, repeats=repeats)
  return 2 * size ** 3 / seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default=DEFAULT_CONFIGS)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--batch_size", type=int, default=0, help="0: the config's")
  parser.add_argument("--peak", default="cpu", choices=["cpu"] + sorted(plan.CHIPS))
  args = parser.parse_args()
  peak = cpu_peak_flops() if args.peak == "cpu" else plan.CHIPS[args.peak]
  print(f"devices: {jax.devices()}; MFU against {args.peak} = {peak / 1e9:,.1f} GFLOP/s")
  print(f"{'config':>27} {'params':>10} {'batch':>6} {'tokens/step':>12} {'step s':>8} "
        f"{'tokens/s':>10} {'GFLOP/s':>8} {'MFU':>6}")
  for name in _configs(args.configs):
    r = benchmark(name, args.repeats, args.batch_size)
    print(f"{r['name']:>27} {r['params']:>10,} {r['batch']:>6} {r['tokens_per_step']:>12,} "
          f"{r['step_seconds']:>8.3f} {r['tokens_per_second']:>10,.0f} "
          f"{r['gflops_per_second']:>8.1f} {r['model_flops_per_second'] / peak:>6.1%}")


def _configs(text):
  """"a:x,b:stage=1,size=demo" -> ["a:x", "b:stage=1,size=demo"]: a comma starts a new
  config only where a `module:` follows."""
  names = []
  for item in text.split(","):
    if ":" in item or not names:
      names.append(item)
    else:
      names[-1] += "," + item
  return names


if __name__ == "__main__":
  main()
