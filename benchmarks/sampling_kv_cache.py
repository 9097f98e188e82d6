"""Sampling time per image: the KV-cached inverse versus recomputing the prefix every step.

    python benchmarks/sampling_kv_cache.py [--lengths 49,196] [--batch 16]

Times the deep block's inverse (Next Gaussian Prediction over N latent elements after a
caption context), with the demo's deep-block size, at two sequence lengths N (7×7 and 14×14
patches of a 28×28 image).
"""

import argparse

import jax
import jax.numpy as jnp

from benchmarks import common
from starflow2_jax.flows import block as block_lib
from starflow2_jax.flows import decode
from starflow2_jax.layers import transformer as transformer_lib


def benchmark(num_elements, batch, context_len, repeats):
  deep = transformer_lib.TransformerConfig(width=128, num_layers=4, num_heads=4)
  block = block_lib.AffineFlowBlock(latent_dim=16, transformer=deep, context_dim=128)
  keys = jax.random.split(jax.random.key(0), 4)
  z = jax.random.normal(keys[0], (batch, num_elements, 16))
  t = jnp.full((batch,), 0.3)
  context = jax.random.normal(keys[1], (batch, context_len, 128))
  params = block.init(keys[2], z, t, context)["params"]
  # A trained-looking head, so the loop does real work (a zero head is the identity).
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(keys[3], p.shape), params)
  cached = jax.jit(lambda z: decode.invert_block(block, params, z, t, context))
  recompute = jax.jit(lambda z: decode.invert_block_recompute(block, params, z, t, context))
  t_cached = common.time_calls(cached, z, repeats=repeats)
  t_recompute = common.time_calls(recompute, z, repeats=repeats)
  max_diff = float(jnp.max(jnp.abs(cached(z) - recompute(z))))
  return t_cached / batch, t_recompute / batch, max_diff


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", default="49,196")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--context", type=int, default=25)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  print(f"devices: {jax.devices()}; batch {args.batch}, context {args.context} positions")
  print(f"{'N':>5} {'cached ms/img':>14} {'recompute ms/img':>17} {'speed-up':>9} {'max |diff|':>11}")
  for n in map(int, args.lengths.split(",")):
    cached, recompute, diff = benchmark(n, args.batch, args.context, args.repeats)
    print(f"{n:>5} {1e3 * cached:>14.2f} {1e3 * recompute:>17.2f} {recompute / cached:>8.1f}x "
          f"{diff:>11.1e}")


if __name__ == "__main__":
  main()
