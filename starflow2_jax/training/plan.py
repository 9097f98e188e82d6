"""A memory and FLOP plan of a stage's train step before any hardware (`starflow2 plan`).

The train step is compiled ahead of time for N devices from abstract shapes only, as
MaxText's `train_compile` does: the state is `plan_state`'s ShapeDtypeStructs with their
shardings, the batch the task's zero batch as shapes, and `jit(...).lower(...).compile()`
allocates nothing. On a CPU the N devices are simulated
(`--xla_force_host_platform_device_count`). What comes out, per device:

  argument, output, temp and alias bytes   `compiled.memory_analysis()` of the partitioned
                                           program, which is one device's program
  per_device_bytes                         argument + output + temp − alias (MaxText's total:
                                           outputs aliasing donated arguments count once)
  flops_per_device                         `compiled.cost_analysis()`: the partitioned
                                           program, so one device's share (replicated work
                                           counted on every device)
  flops_per_step                           `lowered.cost_analysis()`: the whole step before
                                           partitioning, all devices together
  analytic_flops_per_step                  6·N_trained·T + 2·N_frozen·T, T the tokens of a
                                           step (global batch × sequence length)
  sharded_fraction                         parameter bytes not fully replicated / all
  step_seconds                             analytic FLOPs / (devices × chip peak × MFU)

The figures are those of the CPU compiler's program: a GPU or TPU compiler fuses, lays out
and schedules the same step differently (docs/plan.md says what that changes).
"""

import json
import math
import os
import subprocess
import sys
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from starflow2_jax import sharding
from starflow2_jax import tree_paths
from starflow2_jax.training import tasks
from starflow2_jax.training import trainer

# Dense (no 2:4 sparsity) bf16 peaks per chip, FLOP/s: NVIDIA's SXM data sheets, Google
# Cloud's TPU pages.
CHIPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "tpu-v5p": 459e12,
         "tpu-v4": 275e12}

# The planned program never runs, so the backend's code optimisation (LLVM's, on the CPU) is
# skipped: it changes neither the buffer assignment nor XLA's cost analysis, and it is about
# half of the compile time.
NEVER_RUN = {"xla_backend_optimization_level": 0}


# ---- the mesh ----------------------------------------------------------------------------

def parse_mesh(text):
  """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4}; axes not named are 1."""
  shape = {}
  for item in text.split(","):
    axis, _, size = item.partition("=")
    axis = axis.strip()
    if axis not in sharding.MESH_AXES or not size.strip().lstrip("-").isdigit():
      raise ValueError(f"--mesh {text!r}: expected axis=size items over "
                       f"{', '.join(sharding.MESH_AXES)} (e.g. data=2,fsdp=4)")
    shape[axis] = int(size)
  return shape


def mesh_sizes(shape, devices):
  """{axis: size} of a mesh shape (config.mesh.shape or --mesh) on `devices` devices, its
  one -1 (if any) filled in; a ValueError unless the sizes multiply to `devices`."""
  sizes = {axis: int(shape.get(axis, 1)) for axis in sharding.MESH_AXES}
  known = math.prod(s for s in sizes.values() if s != -1)
  free = [axis for axis, s in sizes.items() if s == -1]
  if len(free) == 1 and devices % known == 0:
    sizes[free[0]] = devices // known
  if math.prod(sizes.values()) != devices or min(sizes.values()) < 1:
    given = ",".join(f"{axis}={size}" for axis, size in sizes.items())
    raise ValueError(f"the mesh {given} does not multiply to --devices {devices}: give sizes "
                     "whose product is the device count (e.g. --mesh data=2,fsdp=4 for 8)")
  return sizes


# ---- the abstract step ---------------------------------------------------------------------

def abstract_batch(task, batch_size, batch_sharding):
  """The task's training batch as sharded ShapeDtypeStructs (the zero batch, not made)."""
  shapes = jax.eval_shape(lambda: task.dummy_batch(batch_size))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=batch_sharding),
                      shapes)


def compile_train_step(config, task, state_plan, mesh, rules):
  """(lowered, compiled, seconds): the train step as `trainer.train` jits it, compiled for
  the abstract state and batch. Call inside the mesh and the rules."""
  batch_sharding = sharding.batch_sharding(mesh, rules)
  step = jax.jit(trainer.make_train_step(task, state_plan.optimizer, state_plan.schedule,
                                         config.seed, config.optimizer.trainable),
                 in_shardings=(state_plan.shardings, batch_sharding),
                 out_shardings=(state_plan.shardings, sharding.replicated(mesh)),
                 donate_argnums=(0,))
  start = time.perf_counter()
  lowered = step.lower(state_plan.abstract,
                       abstract_batch(task, config.train.batch_size, batch_sharding))
  compiled = lowered.compile(compiler_options=NEVER_RUN)
  return lowered, compiled, time.perf_counter() - start


def xla_flops(cost):
  """The 'flops' of a cost analysis (a dict, or a list of one dict in older JAX)."""
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


# ---- counts from the abstract state ------------------------------------------------------

def _nbytes(shape, dtype):
  return math.prod(shape) * np.dtype(dtype).itemsize


def total_bytes(abstract_tree, keep=lambda x: True):
  """Bytes of the (kept) leaves of a tree of ShapeDtypeStructs, all devices together."""
  return sum(_nbytes(x.shape, x.dtype) for x in jax.tree.leaves(abstract_tree) if keep(x))


def per_device_bytes(abstract_tree):
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  return sum(_nbytes(x.sharding.shard_shape(x.shape), x.dtype)
             for x in jax.tree.leaves(abstract_tree))


def sharded_fraction(abstract_params):
  """The share of parameter bytes that is split over devices (not fully replicated)."""
  total = total_bytes(abstract_params)
  split = total_bytes(abstract_params, lambda x: not x.sharding.is_fully_replicated)
  return split / total if total else 0.0


def parameter_counts(abstract_params, trainable):
  """(trained, frozen) parameter counts under the `trainable` patterns."""
  labels = jax.tree.leaves(tree_paths.trainable_labels(abstract_params, tuple(trainable)))
  counts = {"train": 0, "freeze": 0}
  for x, label in zip(jax.tree.leaves(abstract_params), labels):
    counts[label] += math.prod(x.shape)
  return counts["train"], counts["freeze"]


def analytic_flops(trained, frozen, tokens):
  """6·N·T for the trained parameters (forward 2, backward 4) plus 2·N·T for the frozen
  ones, whose forward runs once and whose weight gradients are never formed."""
  return 6 * trained * tokens + 2 * frozen * tokens


# ---- the plan ------------------------------------------------------------------------------

def plan(config, devices, mesh_shape=None, chip="h100", mfu=0.4):
  """The plan (a dict, see the module docstring) of `config`'s train step on the first
  `devices` devices of this process, with `mesh_shape` (default config.mesh.shape)."""
  if len(jax.devices()) < devices:
    raise ValueError(f"{devices} devices asked for, this process has {len(jax.devices())}: "
                     "use `plan_in_subprocess` (or `starflow2 plan`), which simulates them")
  sizes = mesh_sizes(mesh_shape or config.mesh.shape, devices)
  mesh = sharding.make_mesh(sizes, jax.devices()[:devices])
  rules = sharding.rules_from_config(config.mesh.rules)
  task = tasks.build_task(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state_plan = trainer.plan_state(config, task, mesh, rules)
    lowered, compiled, seconds = compile_train_step(config, task, state_plan, mesh, rules)
  memory = compiled.memory_analysis()
  trained, frozen = parameter_counts(state_plan.abstract.params, config.optimizer.trainable)
  tokens = config.train.batch_size * task.positions_per_example
  flops = analytic_flops(trained, frozen, tokens)
  return dict(
      devices=devices, mesh=sizes, platform=jax.devices()[0].platform,
      per_device_bytes=(memory.argument_size_in_bytes + memory.output_size_in_bytes
                        + memory.temp_size_in_bytes - memory.alias_size_in_bytes),
      argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
      temp_bytes=memory.temp_size_in_bytes, alias_bytes=memory.alias_size_in_bytes,
      state_bytes_per_device=per_device_bytes(state_plan.abstract),
      parameter_bytes=total_bytes(state_plan.abstract.params),
      sharded_fraction=sharded_fraction(state_plan.abstract.params),
      trained_parameters=trained, frozen_parameters=frozen,
      batch_size=config.train.batch_size, sequence_length=task.positions_per_example,
      tokens_per_step=tokens,
      flops_per_step=xla_flops(lowered.cost_analysis()),
      flops_per_device=xla_flops(compiled.cost_analysis()),
      analytic_flops_per_step=flops,
      chip=chip, mfu=mfu, step_seconds=flops / (devices * CHIPS[chip] * mfu),
      remat=config.get("model", {}).get("remat"),
      scan_layers=bool(config.get("model", {}).get("scan_layers", False)),
      microbatches=config.train.get("microbatches", 1),
      compile_seconds=seconds)


# ---- a process with the devices -----------------------------------------------------------

def plan_in_subprocess(config, devices, mesh_shape=None, chip="h100", mfu=0.4):
  """`plan` in a fresh Python process that simulates `devices` CPU devices.

  The device count and the platform are fixed when JAX's backend first starts, which a
  caller (the CLI, a test, a notebook) may already have done with fewer devices, and merely
  asking (`jax.devices()`) would start it, on an accelerator host holding its memory. A
  fresh process with XLA_FLAGS and JAX_PLATFORMS=cpu set from the start always has the
  devices; it receives the resolved config (overrides included) as JSON on stdin and
  answers the plan as JSON on stdout.
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
  ).strip())
  request = json.dumps(dict(config=json.loads(config.to_json()), devices=devices,
                            mesh_shape=mesh_shape, chip=chip, mfu=mfu))
  result = subprocess.run([sys.executable, "-m", __name__], input=request, env=env,
                          capture_output=True, text=True, check=False)
  if result.returncode:
    raise RuntimeError(f"the planning process failed (exit {result.returncode}):\n"
                       f"{result.stderr[-4000:]}")
  sys.stderr.write(result.stderr)     # the compiler's warnings (e.g. SPMD rematerialisation)
  return json.loads(result.stdout.strip().splitlines()[-1])


def _serve_request():
  """The planning process: a request on stdin, the plan as one JSON line on stdout."""
  request = json.loads(sys.stdin.read())
  config = ml_collections.ConfigDict(request.pop("config"))
  print(json.dumps(plan(config, **request)))


# ---- the report ------------------------------------------------------------------------

def _size(num_bytes):
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(num_bytes) < 1024 or unit == "GiB":
      return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{num_bytes} B"
    num_bytes /= 1024


def table(report):
  """The plan as readable lines."""
  r = report
  mesh = ",".join(f"{axis}={size}" for axis, size in r["mesh"].items())
  rows = [
      ("devices", f"{r['devices']} ({r['platform']}), mesh {mesh}"),
      ("batch", f"{r['batch_size']} × {r['sequence_length']} = {r['tokens_per_step']:,} tokens "
                f"per step; remat {r['remat']}, scanned layers {r['scan_layers']}, "
                f"microbatches {r['microbatches']}"),
      ("per device", f"{_size(r['per_device_bytes'])} = argument {_size(r['argument_bytes'])} "
                     f"+ output {_size(r['output_bytes'])} + temp {_size(r['temp_bytes'])} "
                     f"− aliased {_size(r['alias_bytes'])}"),
      ("state per device", f"{_size(r['state_bytes_per_device'])} (parameters and optimizer)"),
      ("parameters", f"{r['trained_parameters']:,} trained + {r['frozen_parameters']:,} frozen "
                     f"= {_size(r['parameter_bytes'])}, {r['sharded_fraction']:.1%} of it "
                     "sharded"),
      ("FLOPs per step", f"{r['flops_per_step']:.3e} (XLA), {r['analytic_flops_per_step']:.3e} "
                         f"(6·N·T + 2·N_frozen·T); {r['flops_per_device']:.3e} per device"),
      ("step time", f"{r['step_seconds']:.3g} s on {r['devices']} × {r['chip']} at "
                    f"{r['mfu']:.0%} MFU"),
      ("compile", f"{r['compile_seconds']:.1f} s"),
  ]
  width = max(len(name) for name, _ in rows)
  return "\n".join(f"{name:>{width}}  {value}" for name, value in rows)


if __name__ == "__main__":
  _serve_request()
