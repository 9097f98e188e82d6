"""Tests for the trainer's failure handling: steps with a non-finite loss or gradient are
skipped (and too many in a row stop the run), and resuming passes over an unreadable latest
checkpoint.

The runs use test_trainer's tiny config, fake records and compilation cache, and one task
(so the train step compiles once): the caption task with NaNs injected at chosen steps. The
step reaches the loss only through its rng, fold_in(key(seed), step), so that is how the
injection recognises it.
"""

import contextlib
import functools
import glob
import json
import logging
import math
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from starflow2_jax import sharding
from starflow2_jax.training import checkpointing
from starflow2_jax.training import tasks
from starflow2_jax.training import trainer

try:
  from tests import helpers
  from tests.test_trainer import _compilation_cache, _config, _host, _records_dir  # noqa: F401
except ImportError:  # tests/ is on sys.path (pytest's rootdir-less "prepend" import mode)
  import helpers
  from test_trainer import _compilation_cache, _config, _host, _records_dir  # noqa: F401

# Steps by their 0-based `state.step`: summary step k is 0-based step k - 1.
NAN_LOSS = (1,)            # a NaN loss (with finite, zero gradients)
NAN_GRAD = (3, 4)          # a finite loss with NaN gradients, twice in a row
LIMIT = 2                  # so the run stops after 0-based step 4: summary step 5


@jax.custom_vjp
def _nan_gradient(x, bad):
  """`x`, with a NaN gradient where `bad`."""
  return x


_nan_gradient.defvjp(lambda x, bad: (x, bad),
                     lambda bad, g: (jnp.where(bad, jnp.nan, g), None))


class PoisonedTask:
  """`task` with a NaN loss at the NAN_LOSS steps and NaN gradients at the NAN_GRAD steps."""

  def __init__(self, task):
    self._task = task

  def __getattr__(self, name):
    return getattr(self._task, name)

  def _at(self, steps, rng):
    """Whether `rng` is the rng of one of `steps`."""
    seed = jax.random.key(self._task.config.seed)
    key = lambda step: jax.random.key_data(jax.random.fold_in(seed, step))
    hits = [jnp.all(jax.random.key_data(rng) == key(step)) for step in steps]
    return functools.reduce(jnp.logical_or, hits)

  def loss(self, params, batch, rng):
    loss, metrics = self._task.loss(params, batch, rng)
    loss = _nan_gradient(jnp.where(self._at(NAN_LOSS, rng), jnp.nan, loss),
                         self._at(NAN_GRAD, rng))
    return loss, dict(metrics, loss=loss)


def _poison(monkeypatch):
  """Makes `tasks.build_task`, which the trainer calls, build poisoned tasks."""
  build = tasks.build_task
  monkeypatch.setattr(tasks, "build_task", lambda config: PoisonedTask(build(config)))


@contextlib.contextmanager
def _warnings_logged():
  """The warning and error records logged inside the block (for module-scoped fixtures,
  which cannot use caplog)."""
  records = []
  handler = logging.Handler(logging.WARNING)
  handler.emit = records.append
  logging.getLogger().addHandler(handler)
  try:
    yield records
  finally:
    logging.getLogger().removeHandler(handler)


def _messages(records, level):
  return [r.getMessage() for r in records if r.levelno == level]


def _restore(config, workdir, steps):
  """{step: host state} of the given checkpoint steps of the run in `workdir`."""
  task = tasks.build_task(config)
  mesh, rules = sharding.mesh_and_rules(config.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = trainer.plan_state(config, task, mesh, rules).abstract
    checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
    states = {step: _host(checkpointer.restore(abstract, step=step)) for step in steps}
    checkpointer.close()
  return states


def _same(a, b):
  """Whether two states hold bitwise the same step, params and optimizer state."""
  return int(a.step) == int(b.step) and all(
      helpers.tree_bits(getattr(a, part)) == helpers.tree_bits(getattr(b, part))
      for part in ("params", "opt_state"))


def _same_but_step(a, b):
  return _same(a, b.replace(step=a.step))


@pytest.fixture(scope="module", name="nan_run")
def _nan_run(records_dir, tmp_path_factory):
  """The poisoned task trained for up to 6 steps, all checkpointed and kept, with train logs
  only at the end (so the summary's train loss averages every step the run applied).
  Returns (config, workdir, result, warning and error records)."""
  config = _config(records_dir, steps=6, checkpoint_every=1, keep_checkpoints=10,
                   log_every=100, final_samples=False, max_nonfinite_steps=LIMIT)
  workdir = str(tmp_path_factory.mktemp("nan_run"))
  with pytest.MonkeyPatch.context() as monkeypatch, _warnings_logged() as records:
    _poison(monkeypatch)
    result = trainer.train(config, workdir)
  return config, workdir, result, records


# ---------------------------------------------------------------------------------------
# a. Non-finite steps.
# ---------------------------------------------------------------------------------------

def test_nonfinite_steps_change_nothing_but_the_step(nan_run):
  """Summary steps 2 (NaN loss), 4 and 5 (NaN gradients) are skipped, 1 and 3 applied."""
  config, workdir, _, _ = nan_run
  states = _restore(config, workdir, range(1, 6))
  assert _same_but_step(states[2], states[1])
  assert helpers.tree_bits(states[3].params) != helpers.tree_bits(states[2].params)
  assert _same_but_step(states[4], states[3])
  assert _same_but_step(states[5], states[3])


def test_nonfinite_steps_are_counted_and_reported(nan_run):
  _, workdir, result, records = nan_run
  summary = result.summary
  assert summary["nonfinite_steps"] == 3
  assert math.isfinite(summary["train_loss"])      # step 2's NaN loss is not averaged in
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f) == json.loads(json.dumps(summary))
  skipped = [m for m in _messages(records, logging.WARNING) if "non-finite" in m]
  assert [m.split()[1] for m in skipped] == ["2", "4", "5"]
  events = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  assert b"train/nonfinite_steps" in b"".join(open(path, "rb").read() for path in events)


def test_too_many_nonfinite_steps_stop_with_the_last_good_state(nan_run):
  config, workdir, result, records = nan_run
  assert result.summary["step"] == 5 and result.summary["stopped_early"] is True
  assert result.summary["stop_reason"] == "nonfinite"
  [error] = _messages(records, logging.ERROR)
  assert "stopping at step 5" in error and "max_nonfinite_steps=2" in error
  states = _restore(config, workdir, (3, 5))
  assert checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == 5
  assert _same_but_step(states[5], states[3]) and int(states[5].step) == 5
  assert _same(_host(result.state), states[5])


@pytest.mark.parametrize("limit, reached", [(2, [False, False, False, True]), (0, [False] * 4)])
def test_nonfinite_limit_counts_skipped_steps_in_a_row(limit, reached):
  """Steps 1, 3 and 4 skipped: a limit of 2 is reached at step 4 (the applied step 2 resets
  the count); 0 never is."""
  counter = trainer.NonfiniteSteps(limit)
  got = []
  for step, flag in enumerate([1.0, 0.0, 1.0, 1.0], start=1):
    counter.skipped(step, flag, {"loss": 1.0, "grad_norm": math.nan})
    got.append(counter.limit_reached)
  assert got == reached and counter.total == 3


# ---------------------------------------------------------------------------------------
# b. An unreadable latest checkpoint.
# ---------------------------------------------------------------------------------------

def _truncate_state(step_dir):
  """Cuts every data file of the state saved in `step_dir` to half its size (one file would
  not do: some hold no value that a restore reads)."""
  for path in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def test_resume_passes_over_an_unreadable_latest_checkpoint(nan_run, tmp_path, monkeypatch,
                                                            caplog):
  """The stopped run above, its step 5 checkpoint truncated, resumes from step 4 (step 5 is
  skipped again, one in a row) and ends at step 6, having written step 5 anew: bitwise the
  checkpoint it lost."""
  config, workdir, first, _ = nan_run
  workdir = str(shutil.copytree(workdir, tmp_path / "run"))
  _truncate_state(os.path.join(workdir, "checkpoints", "5"))
  _poison(monkeypatch)
  with caplog.at_level(logging.WARNING):
    second = trainer.train(config, workdir)
  [warning] = [m for m in _messages(caplog.records, logging.WARNING) if "cannot be read" in m]
  assert warning.startswith("checkpoint step 5 in ") and workdir in warning
  assert second.summary["step"] == 6 and second.summary["stop_reason"] is None
  assert second.summary["nonfinite_steps"] == 1
  states = _restore(config, workdir, (5, 6))
  assert _same(states[5], _host(first.state))
  assert helpers.tree_bits(states[6].params) != helpers.tree_bits(states[5].params)


def _small_state(step):
  return {"w": jnp.arange(1000.0) * step, "b": jnp.full((3,), step, jnp.float32)}


@pytest.fixture(name="two_steps")
def _two_steps(tmp_path):
  """A checkpoint directory holding `_small_state(step)` at steps 1 and 2."""
  directory = str(tmp_path / "checkpoints")
  checkpointer = checkpointing.Checkpointer(directory, async_save=False)
  for step in (1, 2):
    checkpointer.save(step, _small_state(step))
  checkpointer.close()
  return directory


def test_restore_falls_back_only_without_a_step(two_steps, caplog):
  _truncate_state(os.path.join(two_steps, "2"))
  abstract = jax.eval_shape(_small_state, 0)
  checkpointer = checkpointing.Checkpointer(two_steps, async_save=False)
  with pytest.raises(Exception):                   # a step asked for is not replaced
    checkpointer.restore(abstract, step=2)
  with caplog.at_level(logging.WARNING):
    restored = checkpointer.restore(abstract)
  assert helpers.tree_bits(restored) == helpers.tree_bits(_small_state(1))
  [warning] = _messages(caplog.records, logging.WARNING)
  assert warning.startswith(f"checkpoint step 2 in {two_steps} cannot be read")
  assert checkpointer.latest_step() == 1

  checkpointer.save(2, _small_state(5))            # replaces the unreadable step 2
  assert helpers.tree_bits(checkpointer.restore(abstract)) == helpers.tree_bits(_small_state(5))
  checkpointer.close()


def test_restore_raises_when_no_step_can_be_read(two_steps):
  for step in ("1", "2"):
    _truncate_state(os.path.join(two_steps, step))
  checkpointer = checkpointing.Checkpointer(two_steps)
  with pytest.raises(checkpointing.CheckpointUnreadableError) as info:
    checkpointer.restore(jax.eval_shape(_small_state, 0))
  checkpointer.close()
  message = str(info.value)
  assert two_steps in message and "step 1: " in message and "step 2: " in message
