"""Gradient accumulation over microbatches (`config.train.microbatches`) with `lax.scan`.

A step's batch is cut into K microbatches that run one after another, and the step's loss,
metrics and gradient are the sums of theirs: activation memory of B/K examples, the update of
B. The losses are masked means over the whole batch (over its target tokens, its target
images), so a microbatch's part is its *sum* over the *whole batch's* count, not its own mean:
averaging K per-microbatch means would weight an example by its own microbatch's count,
wrong whenever microbatches hold different numbers of targets. A task states its loss in
these pieces (`MicrobatchLoss`); with K = 1 (the default) a step is the task's plain `loss`,
bitwise as without accumulation.
"""

import functools
from typing import Protocol

import jax
import jax.numpy as jnp

KEY = "config.train.microbatches"


class MicrobatchLoss(Protocol):
  """A task's loss as shares of whole-batch sums (what a task needs for K > 1)."""

  def loss_inputs(self, batch, rng) -> dict:
    """The loss's per-example inputs [B, ...] (noised latents, t, caption dropout, weights),
    drawn for the whole batch: a microbatch's slice of them is exactly the full batch's."""

  def loss_totals(self, batch) -> dict:
    """The whole batch's denominators (target tokens, target images, examples)."""

  def loss_share(self, params, batch, inputs, totals) -> tuple:
    """(loss, metrics) of a slice of the batch: its sums over the whole batch's `totals`,
    so that the shares of the slices add up to the task's `loss` and metrics."""


def microbatches(config):
  """`config.train.microbatches` (default 1), checked: a positive integer that divides the
  batch each process loads (`train.batch_size` over the processes)."""
  k = config.train.get("microbatches", 1)
  if not isinstance(k, int) or isinstance(k, bool) or k < 1:
    raise ValueError(f"{KEY}={k!r} must be a positive integer")
  batch_size = config.train.get("batch_size")
  if batch_size and (batch_size // jax.process_count()) % k:
    raise ValueError(f"{KEY}={k} does not divide the batch per process "
                     f"(config.train.batch_size={batch_size} over {jax.process_count()} "
                     f"processes)")
  return k


def split(tree, k):
  """Leaves [B, ...] -> [k, B/k, ...], microbatch j holding examples j, j + k, j + 2k, …:
  strided, so that each spreads over the data-parallel devices as the batch does (with
  B/k a multiple of the devices, the reshape moves no data between them)."""
  def one(x):
    if x.shape[0] % k:
      raise ValueError(f"{KEY}={k} does not divide the batch of {x.shape[0]} examples")
    return jnp.moveaxis(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 1, 0)
  return jax.tree.map(one, tree)


def loss_and_grad(task, freeze):
  """(params, batch, rng) -> ((loss, metrics), grads) of `task.loss` at `freeze(params)`,
  accumulated over `config.train.microbatches`; with 1, `jax.value_and_grad` of `task.loss`
  itself (the same program as without accumulation)."""
  k = microbatches(task.config)
  if k == 1:
    return jax.value_and_grad(lambda params, batch, rng: task.loss(freeze(params), batch, rng),
                              has_aux=True)
  missing = [m for m in ("loss_inputs", "loss_totals", "loss_share") if not hasattr(task, m)]
  if missing:
    raise ValueError(f"{KEY}={k}, but task {task.config.task!r} has no microbatched loss "
                     f"(no {', '.join(missing)}: see `accumulation.MicrobatchLoss`); use 1")
  return functools.partial(accumulated_loss_and_grad, task, freeze, k)


def accumulated_loss_and_grad(task, freeze, k, params, batch, rng):
  """((loss, metrics), grads) as the sums of `k` microbatches' shares, in a `lax.scan`:
  the inputs and totals come from the whole batch first, then each microbatch adds its
  share and the share's gradient."""
  inputs = task.loss_inputs(batch, rng)
  totals = task.loss_totals(batch)
  share_and_grad = jax.value_and_grad(
      lambda p, micro: task.loss_share(freeze(p), *micro, totals), has_aux=True)

  def add_share(acc, micro):
    return jax.tree.map(jnp.add, acc, share_and_grad(params, micro)), None

  micro = split((batch, inputs), k)
  shapes = jax.eval_shape(share_and_grad, params, jax.tree.map(lambda x: x[0], micro))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  return jax.lax.scan(add_share, zeros, micro)[0]
