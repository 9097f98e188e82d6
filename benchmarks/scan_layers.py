"""Compile time and step time of a Transformer's training gradient, unrolled versus scanned
(`model.scan_layers`, starflow2_jax/layers/scan.py), as the depth grows.

    python -m benchmarks.scan_layers [--depths 4,8,16,32] [--width 256] [--repeats 3]

For each depth it builds the flow's Transformer (pre-norm, `remat=full` as at scale) with
either layout, jits the gradient of a loss over a batch [4, 256, width], and prints the
seconds to lower + compile, the median step time, and the lowered program's size.
"""

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp

from benchmarks import common
from starflow2_jax.layers import transformer as transformer_lib


def measure(config, batch, length, repeats):
  """(compile seconds, step seconds, StableHLO lines) of one gradient step."""
  module = transformer_lib.Transformer(config)
  keys = jax.random.split(jax.random.key(0), 2)
  x = jax.random.normal(keys[0], (batch, length, config.width))
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  valid = jnp.ones((batch, length), bool)
  params = jax.jit(lambda k: module.init(k, x, positions, valid)["params"])(keys[1])
  grad = jax.jit(jax.grad(lambda p: jnp.mean(module.apply({"params": p}, x, positions,
                                                          valid)[0] ** 2)))
  start = time.perf_counter()
  lowered = grad.lower(params)
  compiled = lowered.compile()
  compile_seconds = time.perf_counter() - start
  step_seconds = common.time_calls(compiled, params, repeats=repeats)
  return compile_seconds, step_seconds, len(lowered.as_text().splitlines())


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--depths", default="4,8,16,32")
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  base = transformer_lib.TransformerConfig(width=args.width, num_layers=1,
                                           num_heads=args.width // 64, remat="full")
  print(f"Transformer width {args.width}, batch {args.batch} × {args.length}, remat full, "
        f"{jax.devices()[0].platform}")
  print("| layers | layout | compile | step | program lines |")
  print("|---|---|---|---|---|")
  for depth in [int(d) for d in args.depths.split(",")]:
    for scan in (False, True):
      config = dataclasses.replace(base, num_layers=depth, scan=scan)
      compile_s, step_s, lines = measure(config, args.batch, args.length, args.repeats)
      print(f"| {depth} | {'scanned' if scan else 'unrolled'} | {compile_s:.2f} s | "
            f"{step_s * 1e3:.1f} ms | {lines:,} |", flush=True)


if __name__ == "__main__":
  main()
