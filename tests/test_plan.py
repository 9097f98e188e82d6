"""`starflow2 plan`: a stage's train step compiled ahead of time for 8 simulated devices.

Claims: the command prints one JSON object with every figure; the total is argument + output
+ temp − alias; the argument bytes hold exactly one device's share of the state (counted here
from the partition specs, not from the plan's code) plus at most its share of the batch, and
the donated state is aliased whole; the sharded fraction and the analytic FLOPs match
independent counts; XLA's per-device FLOPs are one device's share of the step's; a mesh that
does not multiply to the device count is refused; and going from fsdp=4 to fsdp=1 raises the
argument bytes by exactly the sharded state's 3/4 that each device then holds as well.
"""

import json
import math
import re
import subprocess
import sys

import flax.linen as nn
import jax
import pytest

from experiments import fashion_mnist_stages
from starflow2_jax import cli
from starflow2_jax import sharding
from starflow2_jax.training import plan
from starflow2_jax.training import tasks
from starflow2_jax.training import trainer

CONFIG = "experiments/fashion_mnist_stages.py:stage1-tiny"
MESH = dict(data=2, fsdp=4, tensor=1)
KEYS = ("devices", "mesh", "per_device_bytes", "argument_bytes", "output_bytes", "temp_bytes",
        "alias_bytes", "flops_per_step", "flops_per_device", "analytic_flops_per_step",
        "sharded_fraction", "step_seconds", "compile_seconds")


@pytest.fixture(scope="module")
def cli_report():
  """What CI shows: the command, run as a user runs it, on the tiny stage 1 over 8 devices."""
  result = subprocess.run(
      [sys.executable, "-m", "starflow2_jax.cli", "plan", f"--config={CONFIG}", "--devices=8",
       "--mesh=data=2,fsdp=4", "--chip=h100", "--mfu=0.5", "--json"],
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout)


def abstract_state(config, sizes):
  """The abstract, sharded train state of `config` on a mesh of this process's 8 devices."""
  mesh = sharding.make_mesh(sizes)
  rules = sharding.rules_from_config(config.mesh.rules)
  task = tasks.build_task(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return task, trainer.plan_state(config, task, mesh, rules).abstract


def split_over(spec, sizes):
  """How many ways each dimension of a leaf is split, from its partition spec."""
  return [math.prod(sizes[a] for a in ((axes,) if isinstance(axes, str) else axes))
          if axes is not None else 1 for axes in spec]


def share_bytes(tree, sizes):
  """Bytes one device holds of a sharded abstract tree, from the specs and the mesh sizes."""
  total = 0
  for x in jax.tree.leaves(tree):
    ways = split_over(x.sharding.spec, sizes) + [1] * (len(x.shape) - len(x.sharding.spec))
    assert all(n % w == 0 for n, w in zip(x.shape, ways)), (x.shape, ways)
    total += math.prod(n // w for n, w in zip(x.shape, ways)) * x.dtype.itemsize
  return total


def is_split(x, sizes):
  return math.prod(split_over(x.sharding.spec, sizes)) > 1


def test_plan_prints_every_figure_as_json(cli_report):
  r = cli_report
  assert set(KEYS) <= set(r), set(KEYS) - set(r)
  assert r["devices"] == 8 and r["mesh"] == MESH and r["platform"] == "cpu"
  assert r["per_device_bytes"] == (r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"]
                                   - r["alias_bytes"])
  assert r["temp_bytes"] > 0 and r["compile_seconds"] > 0
  assert r["step_seconds"] == pytest.approx(
      r["analytic_flops_per_step"] / (8 * plan.CHIPS["h100"] * 0.5), rel=1e-12)


def test_argument_bytes_are_one_devices_share_of_state_and_batch(cli_report):
  config = fashion_mnist_stages.get_config("stage1-tiny")
  task, state = abstract_state(config, MESH)
  state_share = share_bytes(state, MESH)
  batch = jax.eval_shape(lambda: task.dummy_batch(config.train.batch_size))
  batch_share = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(batch)) // (2 * 4)
  assert cli_report["alias_bytes"] == state_share           # the donated state, aliased whole
  assert state_share <= cli_report["argument_bytes"] <= state_share + batch_share
  # not trivially so: a replicated state would not fit under the bound
  assert share_bytes(jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=sharding.replicated(x.sharding.mesh)), state), MESH) \
      > cli_report["argument_bytes"]


def test_sharded_fraction_and_analytic_flops_match_independent_counts(cli_report):
  config = fashion_mnist_stages.get_config("stage1-tiny")
  _, state = abstract_state(config, MESH)
  leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
  param_bytes = lambda keep: sum(x.size * x.dtype.itemsize for _, x in leaves if keep(x))
  fraction = param_bytes(lambda x: is_split(x, MESH)) / param_bytes(lambda x: True)
  assert 0.5 < fraction < 1
  assert cli_report["sharded_fraction"] == pytest.approx(fraction, rel=1e-12)

  name = lambda path: "/".join(str(k.key) for k in path)
  trained = sum(x.size for path, x in leaves
                if any(re.fullmatch(p, name(path)) for p in config.optimizer.trainable))
  frozen = sum(x.size for _, x in leaves) - trained
  tokens = config.train.batch_size * config.data.max_length
  assert trained > 0 and frozen > 0
  assert cli_report["analytic_flops_per_step"] == 6 * trained * tokens + 2 * frozen * tokens
  # XLA's count of the same step is of the same size (attention and the loss come on top) ...
  assert 0.5 < cli_report["flops_per_step"] / cli_report["analytic_flops_per_step"] < 2
  # ... and the compiled program's count is one device's share of it (plus replicated work).
  assert 1 <= 8 * cli_report["flops_per_device"] / cli_report["flops_per_step"] < 1.25


def test_a_mesh_that_does_not_multiply_to_the_devices_is_refused(capsys):
  status = cli.run(["starflow2", "plan", f"--config={CONFIG}", "--devices=8",
                    "--mesh=data=2,fsdp=2"])
  err = capsys.readouterr().err
  assert status == 2
  assert "data=2,fsdp=2,tensor=1 does not multiply to --devices 8" in err
  status = cli.run(["starflow2", "plan", f"--config={CONFIG}", "--devices=8",
                    "--mesh=data=2,pipeline=4"])
  assert status == 2 and "expected axis=size items" in capsys.readouterr().err


def test_mesh_sizes_fill_in_one_free_axis():
  assert plan.mesh_sizes({"data": -1, "fsdp": 2}, 8) == dict(data=4, fsdp=2, tensor=1)
  assert plan.parse_mesh("fsdp=8") == {"fsdp": 8}
  with pytest.raises(ValueError, match="does not multiply"):
    plan.mesh_sizes({"data": -1, "fsdp": 3}, 8)


def test_sharding_over_fsdp_divides_the_sharded_state(cli_report):
  """fsdp=1 (data=8) against the command's fsdp=4: each device then holds the sharded
  state whole, 3/4 of it more; the batch per device is the same (16 over 8 either way)."""
  config = fashion_mnist_stages.get_config("stage1-tiny")
  replicated = plan.plan(config, 8, dict(data=8))
  _, state = abstract_state(config, MESH)
  sharded_state = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)
                      if is_split(x, MESH))
  assert replicated["sharded_fraction"] == 0
  assert sharded_state > 0
  assert (replicated["argument_bytes"] - cli_report["argument_bytes"]
          == sharded_state * 3 // 4)
  assert replicated["per_device_bytes"] > cli_report["per_device_bytes"]


def test_scanned_layers_keep_each_devices_share_of_the_state(cli_report):
  """The same stage with its layers scanned (stacked on a layer axis that is never split)
  compiles on the mesh, and each device holds exactly the share of the state it held
  unrolled: the stacked leaves are split as their layers were."""
  config = fashion_mnist_stages.get_config("stage1-tiny")
  config.model.scan_layers = True
  r = plan.plan(config, 8, MESH)
  _, state = abstract_state(config, MESH)
  assert "layers" in state.params["vlm"] and "layer_0" not in state.params["vlm"]
  assert r["scan_layers"] is True and cli_report["scan_layers"] is False
  assert r["alias_bytes"] == share_bytes(state, MESH) == cli_report["alias_bytes"]
  assert r["sharded_fraction"] == pytest.approx(cli_report["sharded_fraction"], rel=1e-12)


@pytest.mark.slow
def test_stage3_plan():
  """Stage 3 (the skips, the adapter and the flow train; ~35 s to compile here)."""
  config = fashion_mnist_stages.get_config("stage3-tiny")
  r = plan.plan(config, 8, MESH)
  _, state = abstract_state(config, MESH)
  assert r["alias_bytes"] == share_bytes(state, MESH)
  assert r["per_device_bytes"] == (r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"]
                                   - r["alias_bytes"])
  assert 0.5 < r["flops_per_step"] / r["analytic_flops_per_step"] < 2
