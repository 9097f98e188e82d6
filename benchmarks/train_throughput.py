"""Flow train-step throughput: tokens/s and achieved GFLOP/s, for the demo config and a
wider one (experiments/fashion_mnist.py presets "" and "wide").

    python benchmarks/train_throughput.py [--presets ,wide] [--repeats 5] [--batch_size 0]

Tokens are latent elements plus conditioning-context positions that the deep block reads.
FLOPs come from XLA's cost analysis of the compiled step (forward, backward and AdamW).
"""

import argparse

import flax.linen as nn
import jax
import numpy as np

from benchmarks import common
from experiments import fashion_mnist
from starflow2_jax import sharding
from starflow2_jax.training import state as state_lib
from starflow2_jax.training import tasks
from starflow2_jax.training import trainer


def benchmark(preset, repeats, batch_size=0):
  config = fashion_mnist.get_config(preset)
  if batch_size:
    config.train.batch_size = batch_size
  task = tasks.build_task(config)
  mesh, rules = sharding.mesh_and_rules(config.mesh)
  batch_size = config.train.batch_size
  h, w = config.data.image_size
  rng = np.random.default_rng(0)
  ids, mask = task.tokenize([config.sample.captions[i % 10] for i in range(batch_size)])
  batch = dict(image=rng.integers(0, 256, (batch_size, h, w, config.data.channels), np.uint8),
               caption_ids=ids, caption_mask=mask, label=np.zeros(batch_size, np.int32))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    optimizer, schedule, _, shardings = trainer.plan_state(config, task, mesh, rules)
    state = state_lib.create_state(task.init_params, optimizer, shardings, jax.random.key(0))
    step = jax.jit(trainer.make_train_step(task, optimizer, schedule, 0))
    batch = sharding.global_batch(batch, mesh, rules)
    flops = common.compiled_flops(step, state, batch)
    seconds = common.time_calls(lambda s, b: step(s, b)[1]["loss"], state, batch, repeats=repeats)
  tokens = batch_size * (task.latent.num_tokens + config.data.max_caption_len + 1)
  params = sum(x.size for x in jax.tree.leaves(state.params))
  return dict(preset=preset or "demo", params=params, batch=batch_size, tokens_per_step=tokens,
              step_seconds=seconds, tokens_per_second=tokens / seconds,
              gflops_per_second=(flops / seconds / 1e9) if flops else float("nan"))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--presets", default=",wide")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--batch_size", type=int, default=0, help="0: the config's")
  args = parser.parse_args()
  print(f"devices: {jax.devices()}")
  print(f"{'preset':>8} {'params':>10} {'batch':>6} {'tokens/step':>12} {'step s':>8} "
        f"{'tokens/s':>10} {'GFLOP/s':>8}")
  for preset in args.presets.split(","):
    r = benchmark(preset, args.repeats, args.batch_size)
    print(f"{r['preset']:>8} {r['params']:>10,} {r['batch']:>6} {r['tokens_per_step']:>12,} "
          f"{r['step_seconds']:>8.3f} {r['tokens_per_second']:>10,.0f} "
          f"{r['gflops_per_second']:>8.1f}")


if __name__ == "__main__":
  main()
