"""Multi-process training on loopback (CPU collectives) and elastic resume across process counts.

With `data.elastic`, batch k is a pure function of (seed, k), so:
- two processes (4 CPU devices each, `starflow2 train --coordinator_address … --num_processes
  2 --process_id i`) train with the same per-step losses (≤ 1e-5) and end with the same
  parameters (≤ 1e-6) as one process on the same 8-device mesh;
- a checkpoint written by two processes resumes in one, and one written by one process
  resumes in two, each continuing on the same examples: the same losses and parameters as
  the uninterrupted one-process run;
- only process 0 opens a TensorBoard file.
Also `distributed`: when it initializes (flags, config, cluster environment, never alone)
and which rows of a batch a process supplies.

The one-process runs are `trainer.train` in this process (8 simulated devices, conftest);
the two processes are one launch of tests/multihost_worker.py, which runs two commands.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import fake_data
import helpers
import multihost_worker
from demos import fashion_mnist
from starflow2_jax import cli
from starflow2_jax import sharding
from starflow2_jax.training import distributed
from starflow2_jax.training import trainer

ROOT = multihost_worker.ROOT
STEPS = 4
RESUMED_FROM = 2
LOSS_ATOL = 1e-5
PARAM_ATOL = 1e-6


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  """The two one-process runs compile the same steps once."""
  with helpers.persistent_compilation_cache(tmp_path_factory.mktemp("jax_cache")):
    yield


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _resume_dir(source, workdir):
  """`workdir` holding `source`'s checkpoints up to step RESUMED_FROM only."""
  checkpoints = os.path.join(workdir, "checkpoints")
  shutil.copytree(os.path.join(source, "checkpoints"), checkpoints)
  for step in os.listdir(checkpoints):
    if step.isdigit() and int(step) > RESUMED_FROM:
      shutil.rmtree(os.path.join(checkpoints, step))
  return workdir


def _launch_two_processes(out, commands, tmp):
  """Runs tests/multihost_worker.py as processes 0 and 1 of a run on 127.0.0.1; returns
  each process's results (one {status, losses} per command)."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_COMPILATION_CACHE_DIR=str(tmp / "worker_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  logs, processes = [], []
  for i in range(2):
    flags = ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
             "--process_id", str(i)]
    argv = [json.dumps(c + flags) for c in commands]
    logs.append(open(tmp / f"process{i}.log", "w+"))
    processes.append(subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests", "multihost_worker.py"), out, *argv],
        cwd=ROOT, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
  try:
    codes = [p.wait(timeout=400) for p in processes]
  finally:
    for p in processes:
      p.kill()
  tails = []
  for log in logs:
    log.seek(0)
    tails.append(log.read()[-3000:])
    log.close()
  assert codes == [0, 0], "\n\n".join(tails)
  results = []
  for i in range(2):
    with open(f"{out}.process{i}") as f:
      results.append(json.load(f))
  return results


def _losses(recorded):
  return {int(step): loss for step, loss in recorded.items()}


def _train_here(config, workdir):
  """`trainer.train` in this process: (losses by step, final params on the host)."""
  with multihost_worker.recorded_losses() as (losses, _):
    result = trainer.train(config, workdir)
  return dict(losses), jax.device_get(result.state.params)


@pytest.fixture(scope="module", name="runs")
def _runs(tmp_path_factory):
  """one: STEPS steps in one process; two: the same in two processes; one_to_two: one's
  step-2 checkpoint resumed in two processes; two_to_one: two's resumed in one."""
  tmp = tmp_path_factory.mktemp("multihost")
  fake_data.write_fake_fashion_mnist(str(tmp / "idx"), num_train=64, num_test=32)
  fashion_mnist.write_fashion_mnist(str(tmp / "idx"), str(tmp / "records"))
  overrides = [f"--config.data.dir={tmp / 'records'}", "--config.data.elastic=True"]
  config = multihost_worker.get_config()
  config.data.update(dir=str(tmp / "records"), elastic=True)
  work = {name: str(tmp / name) for name in ("one", "two", "one_to_two", "two_to_one")}

  runs = {"one": _train_here(config, work["one"])}
  _resume_dir(work["one"], work["one_to_two"])
  config_file = os.path.join(ROOT, "tests", "multihost_worker.py")
  commands = [["train", f"--config={config_file}", f"--workdir={work[name]}", *overrides]
              for name in ("two", "one_to_two")]
  per_process = _launch_two_processes(str(tmp / "results"), commands, tmp)
  assert [[r["tensorboard"] for r in p] for p in per_process] == [[1, 1], [0, 0]]
  for name, index in (("two", 0), ("one_to_two", 1)):
    losses = [_losses(p[index]["losses"]) for p in per_process]
    assert losses[0] == losses[1], f"{name}: the processes logged different losses"
    _, params, step = trainer.restore_params(config, work[name])   # all 8 devices, 1 process
    assert step == STEPS
    runs[name] = (losses[0], jax.device_get(params))
  _resume_dir(work["two"], work["two_to_one"])
  runs["two_to_one"] = _train_here(config, work["two_to_one"])
  return runs, work, config


def _assert_same_run(actual, desired, steps):
  (losses, params), (desired_losses, desired_params) = actual, desired
  assert sorted(losses) == list(steps)
  np.testing.assert_allclose([losses[s] for s in steps], [desired_losses[s] for s in steps],
                             rtol=0, atol=LOSS_ATOL)
  for a, d in zip(jax.tree.leaves(params), jax.tree.leaves(desired_params)):
    np.testing.assert_allclose(a, d, rtol=0, atol=PARAM_ATOL)


def test_two_processes_train_like_one(runs):
  runs, _, _ = runs
  _assert_same_run(runs["two"], runs["one"], range(1, STEPS + 1))
  losses = runs["one"][0]
  assert len(set(losses.values())) == STEPS          # distinct batches, moving parameters


def test_two_process_checkpoint_resumes_in_one_process(runs):
  runs, _, _ = runs
  _assert_same_run(runs["two_to_one"], runs["one"], range(RESUMED_FROM + 1, STEPS + 1))


def test_one_process_checkpoint_resumes_in_two_processes(runs):
  runs, _, _ = runs
  _assert_same_run(runs["one_to_two"], runs["one"], range(RESUMED_FROM + 1, STEPS + 1))


def test_resumed_parameters_are_not_the_checkpointed_ones(runs):
  """The resumed runs really trained: their end differs from where they started."""
  _, work, config = runs
  _, start, _ = trainer.restore_params(config, work["one_to_two"], step=RESUMED_FROM)
  _, end, _ = trainer.restore_params(config, work["one_to_two"])
  moved = [np.max(np.abs(np.asarray(a) - np.asarray(b)))
           for a, b in zip(jax.tree.leaves(end), jax.tree.leaves(start))]
  assert max(moved) > 100 * PARAM_ATOL


def test_two_process_run_writes_one_event_file_and_summary(runs):
  """Process 1 opened no TensorBoard file (checked in the fixture); process 0 wrote these."""
  _, work, _ = runs
  assert len(os.listdir(os.path.join(work["two"], "tensorboard"))) == 1
  with open(os.path.join(work["two"], "summary.json")) as f:
    summary = json.load(f)
  assert summary["step"] == STEPS and summary["stopped_early"] is False


# ---- distributed: when to initialize, which rows ------------------------------------------

SLURM = dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="node[1-2]", SLURM_PROCID="0",
             SLURM_LOCALID="0")


@pytest.mark.parametrize("environ, cluster", [
    ({}, None),
    (dict(SLURM, SLURM_NTASKS="1"), None),                 # a one-task job is a process alone
    (dict(SLURM, SLURM_NTASKS="4"), "slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, None),    # salloc shell, not a task of a step
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://h:1", "OMPI_COMM_WORLD_SIZE": "2"}, "openmpi"),
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://h:1", "OMPI_COMM_WORLD_SIZE": "1"}, None),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "t0"}, None),
    ({"MEGASCALE_NUM_SLICES": "2"}, "tpu"),
])
def test_cluster_from_environment(environ, cluster):
  assert distributed.cluster_from_environment(environ) == cluster


@pytest.fixture(name="calls")
def _calls(monkeypatch):
  """The calls `initialize` makes to jax.distributed.initialize (replaced: nothing joins)."""
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *args: calls.append(args))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  return calls


def test_initialize_explicit_auto_environment_and_alone(calls):
  explicit = distributed.Settings("10.0.0.1:1234", 4, 3)
  assert distributed.initialize(explicit, environ={}) == "explicit"
  assert distributed.initialize(distributed.Settings(distributed.AUTO), environ={}) == "auto"
  assert distributed.initialize(distributed.Settings(), dict(SLURM, SLURM_NTASKS="2")) == "slurm"
  assert distributed.initialize(distributed.Settings(), environ={}) is None
  assert distributed.initialize(distributed.Settings("h:1", 1, 0), environ={}) is None
  assert calls == [("10.0.0.1:1234", 4, 3), (), ()]


@pytest.mark.parametrize("settings, match", [
    (distributed.Settings("h:1", 2, None), "needs --num_processes and --process_id"),
    (distributed.Settings("h:1", 2, 2), r"--process_id 2 is not in \[0, 2\)"),
    (distributed.Settings("h", 2, 0), "not HOST:PORT"),
    (distributed.Settings(None, 2, 0), "need --coordinator_address"),
])
def test_initialize_rejects_incomplete_settings(calls, settings, match):
  with pytest.raises(ValueError, match=match):
    distributed.initialize(settings, environ={})
  assert not calls


def test_flags_override_the_config_section():
  config = multihost_worker.get_config()
  config.distributed = dict(coordinator_address="c:1", num_processes=2, process_id=0)
  assert distributed.settings(config, coordinator_address=None, num_processes=None,
                              process_id=1) == distributed.Settings("c:1", 2, 1)
  assert distributed.settings(None, coordinator_address="auto") == distributed.Settings("auto")
  config.distributed = dict(process_index=1)
  with pytest.raises(ValueError, match=r"unknown keys \['process_index'\]"):
    distributed.settings(config)


class _Sharding:
  """A stand-in batch sharding whose local devices hold the given [start, stop) rows."""

  def __init__(self, *spans):
    self._spans = spans

  def addressable_devices_indices_map(self, shape):
    return {i: (slice(*span),) for i, span in enumerate(self._spans)}


def test_process_rows():
  mesh = sharding.make_mesh(dict(data=4, fsdp=2, tensor=1))
  rules = sharding.rules_from_config(sharding.DEFAULT_RULES)
  assert distributed.process_rows(sharding.batch_sharding(mesh, rules), 16) == (0, 16)
  assert distributed.process_rows(_Sharding((4, 6), (6, 8), (4, 6)), 16) == (4, 8)
  assert distributed.process_rows(_Sharding((None, None)), 16) == (0, 16)   # replicated
  with pytest.raises(ValueError, match="not contiguous"):
    distributed.process_rows(_Sharding((0, 2), (4, 6)), 16)


@pytest.mark.parametrize("command", ["train", "eval"])
def test_train_and_eval_take_the_process_flags(calls, capsys, command):
  config = os.path.join(ROOT, "experiments", "fashion_mnist.py") + ":tiny"
  status = cli.run(["starflow2", command, f"--config={config}", "--workdir=unused",
                    "--num_processes=2", "--process_id=1"])
  err = capsys.readouterr().err
  assert status == 2 and "need --coordinator_address" in err and f"starflow2 {command}" in err
  assert not calls
