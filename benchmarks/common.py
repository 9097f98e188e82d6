"""Shared timing helpers for the benchmark scripts."""

import time

import jax


def compiled_flops(jitted, *args):
  """FLOPs of one call as counted by XLA's cost analysis (None if unavailable)."""
  cost = jitted.lower(*args).compile().cost_analysis()
  if isinstance(cost, list):
    cost = cost[0] if cost else {}
  return cost.get("flops") if cost else None


def time_calls(fn, *args, repeats=5, warmup=1):
  """Median wall time of `fn(*args)` in seconds, after `warmup` calls (compilation)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2]
