"""Tests for the trainer: sharding-invariant steps, exact resume, SIGTERM, frozen parameters.

All runs use `experiments/fashion_mnist.get_config("tiny")` on fake Fashion-MNIST records
(64 train / 32 test random images) with cheap sampling settings. JAX's persistent
compilation cache is switched on for this module (in a temporary directory), so the
repeated `trainer.train` calls of one config compile once.
"""

import glob
import json
import math
import os
import signal

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from demos import fashion_mnist
import fake_data as testing
from experiments import fashion_mnist as fashion_mnist_experiment
from starflow2_jax import sharding
from starflow2_jax import tree_paths
from starflow2_jax.training import checkpointing
from starflow2_jax.training import data as data_lib
from starflow2_jax.training import metrics as metrics_lib
from starflow2_jax.training import optimizer as optimizer_lib
from starflow2_jax.training import state as state_lib
from starflow2_jax.training import tasks
from starflow2_jax.training import trainer

try:
  from tests import helpers
except ImportError:  # tests/ is on sys.path (pytest's rootdir-less "prepend" import mode)
  import helpers

STEPS = 3
DEEP_ONLY = ("flow/deep/.*",)


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  with helpers.persistent_compilation_cache(tmp_path_factory.mktemp("jax_cache")):
    yield


@pytest.fixture(scope="module", name="records_dir")
def _records_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("fashion_mnist")
  testing.write_fake_fashion_mnist(str(root / "idx"), num_train=64, num_test=32)
  fashion_mnist.write_fashion_mnist(str(root / "idx"), str(root / "records"))
  return str(root / "records")


def _config(records_dir, **train):
  c = fashion_mnist_experiment.get_config("tiny")
  c.data.dir = records_dir
  c.latent.patch_size = 7                    # 16 tokens of 49: short sampling loops
  c.sample.per_class = 1
  c.sample.denoise_steps = -1                # no Tweedie denoising in the test samples
  c.sample.captions = list(c.sample.captions[:2])
  c.eval.update(batch_size=8, num_examples=8)
  c.train.update(steps=STEPS, batch_size=8, log_every=1, eval_every=0, checkpoint_every=100,
                 time_limit_minutes=0.0)
  c.train.update(**train)
  return c


def _host(tree):
  return jax.device_get(tree)


def _first_batches(config, task, count):
  it = iter(data_lib.train_dataset(config, task, config.data.dir))
  return [next(it) for _ in range(count)]


def _train_steps(config, mesh, batches, initial_state=None):
  """The trainer's own pieces (abstract state, sharded init, jitted step) on `mesh`.
  `initial_state` (host arrays) replaces `create_state`, placed into this mesh's shardings.
  Returns (initial state, final state, per-step metrics), all on the host."""
  task = tasks.build_task(config)
  rules = sharding.rules_from_config(config.mesh.rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    optimizer, schedule, _, shardings = trainer.plan_state(config, task, mesh, rules)
    if initial_state is None:
      state = state_lib.create_state(task.init_params, optimizer, shardings,
                                     jax.random.key(config.seed))
      initial_state = _host(state)
    else:
      state = jax.device_put(initial_state, shardings)
    step = jax.jit(trainer.make_train_step(task, optimizer, schedule, config.seed,
                                           config.optimizer.trainable),
                   in_shardings=(shardings, sharding.batch_sharding(mesh, rules)),
                   out_shardings=(shardings, sharding.replicated(mesh)))
    metrics = []
    for batch in batches:
      state, step_metrics = step(state, sharding.global_batch(batch, mesh, rules))
      metrics.append(_host(step_metrics))
    return initial_state, _host(state), metrics


# ---------------------------------------------------------------------------------------
# a. Sharding does not change the maths.
# ---------------------------------------------------------------------------------------

def test_tiny_config_state_shards_over_tensor_axis(records_dir):
  config = _config(records_dir)
  task = tasks.build_task(config)
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  rules = sharding.rules_from_config(config.mesh.rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    plan = trainer.plan_state(config, task, mesh, rules)
    state = state_lib.create_state(task.init_params, plan.optimizer, plan.shardings,
                                   jax.random.key(0))
  embedding = state.params["caption_embed"]["embedding"]
  assert embedding.shape == (config.model.vocab_size, 32)
  assert embedding.sharding.spec[0] == "tensor"


@pytest.fixture(scope="module", name="meshes")
def _meshes(records_dir):
  """STEPS steps from the same initial state (made by `create_state` on the 8-device mesh)
  on a data=2, fsdp=2, tensor=2 mesh and on a one-device mesh.
  Returns (config, batches, initial state, {mesh name: (final state, metrics)})."""
  config = _config(records_dir)
  batches = _first_batches(config, tasks.build_task(config), STEPS)
  eight = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  one = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  assert eight.devices.size == 8 and one.devices.size == 1
  initial, state_8, metrics_8 = _train_steps(config, eight, batches)
  _, state_1, metrics_1 = _train_steps(config, one, batches, initial_state=initial)
  return config, batches, initial, {"one": (state_1, metrics_1), "eight": (state_8, metrics_8)}


def test_sharded_training_matches_single_device(meshes):
  _, _, _, runs = meshes
  (state_1, metrics_1), (state_8, metrics_8) = runs["one"], runs["eight"]
  losses_1 = [float(m["loss"]) for m in metrics_1]
  losses_8 = [float(m["loss"]) for m in metrics_8]
  assert all(math.isfinite(v) for v in losses_1)
  np.testing.assert_allclose(losses_8, losses_1, rtol=0, atol=1e-5)
  assert len(set(losses_1)) == STEPS                  # different batches, moving params
  np.testing.assert_allclose([float(m["grad_norm"]) for m in metrics_8],
                             [float(m["grad_norm"]) for m in metrics_1], rtol=1e-4)
  for p1, p8 in zip(jax.tree.leaves(state_1.params), jax.tree.leaves(state_8.params)):
    np.testing.assert_allclose(p8, p1, rtol=0, atol=1e-5)


def test_sharded_state_is_really_sharded(meshes):
  """The 8-device run's parameters were split over fsdp and tensor (so the equality above
  is a statement about sharded computation)."""
  config = meshes[0]
  task = tasks.build_task(config)
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  rules = sharding.rules_from_config(config.mesh.rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shardings = trainer.plan_state(config, task, mesh, rules).shardings
  specs = {tuple(s.spec) for s in jax.tree.leaves(shardings.params)}
  flat_axes = {axis for spec in specs for entry in spec
               for axis in (entry if isinstance(entry, tuple) else (entry,))}
  assert {"fsdp", "tensor"} <= flat_axes


# ---------------------------------------------------------------------------------------
# b. Stop and resume: bitwise the same as an uninterrupted run; outputs are written.
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module", name="uninterrupted")
def _uninterrupted(records_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  return workdir, trainer.train(_config(records_dir), workdir)


def _assert_same_state(a, b):
  assert int(a.step) == int(b.step)
  assert helpers.tree_bits(_host(a.params)) == helpers.tree_bits(_host(b.params))
  assert helpers.tree_bits(_host(a.opt_state)) == helpers.tree_bits(_host(b.opt_state))


def test_resume_is_bitwise_identical(records_dir, uninterrupted, tmp_path):
  """The first run stops after its first step through `train.time_limit_minutes` (so the
  learning-rate schedule, which depends on `train.steps`, is the same in all runs); the
  second call resumes it in the same workdir."""
  _, reference = uninterrupted
  workdir = str(tmp_path / "resumed")
  first = trainer.train(_config(records_dir, time_limit_minutes=1e-9), workdir)
  assert first.summary["stopped_early"] is True
  assert first.summary["step"] == 1
  assert checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == 1

  second = trainer.train(_config(records_dir), workdir)
  assert second.summary["stopped_early"] is False
  assert second.summary["step"] == STEPS
  _assert_same_state(second.state, reference.state)
  assert second.summary["train_loss"] != first.summary["train_loss"]


def test_run_writes_summary_samples_and_events(uninterrupted):
  workdir, result = uninterrupted
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["step"] == STEPS
  for key in ("train_loss", "test_bpd"):
    assert math.isfinite(summary[key]), key
  assert summary["stopped_early"] is False
  assert summary == json.loads(json.dumps(result.summary))

  sample = os.path.join(workdir, summary["samples"])
  assert sample.endswith(".png") and os.path.isfile(sample)
  # 2 captions x (1 plain + 1 guided) tiles of 28x28 with 2-px gaps, greyscale.
  with Image.open(sample) as image:
    assert image.size == (2 * 30, 2 * 30)
    assert image.mode == "L"

  events = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  assert events
  content = b"".join(open(path, "rb").read() for path in events)
  for tag in (b"train/loss", b"eval/bpd/pixel_bpd", b"samples"):
    assert tag in content, tag
  assert checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == STEPS


# ---------------------------------------------------------------------------------------
# c. SIGTERM: checkpoint at the step it arrived, return stopped_early.
# ---------------------------------------------------------------------------------------

def test_sigterm_saves_and_stops(records_dir, uninterrupted, tmp_path, monkeypatch):
  """SIGTERM is sent to this process from the progress bar's update after step 2, i.e.
  from inside the training loop (deterministic, unlike a timer thread)."""
  make_bar = metrics_lib.progress_bar
  sent = []

  def progress_bar(start_step, total_steps):
    bar = make_bar(start_step, total_steps)
    update = bar.update

    def update_then_signal(n=1):
      update(n)
      if bar.n == 2 and not sent:
        # Never let SIGTERM hit the default handler (it would kill the test process).
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        sent.append(bar.n)
        os.kill(os.getpid(), signal.SIGTERM)

    bar.update = update_then_signal
    return bar

  monkeypatch.setattr(metrics_lib, "progress_bar", progress_bar)
  handler_before = signal.getsignal(signal.SIGTERM)
  workdir = str(tmp_path / "sigterm")
  result = trainer.train(_config(records_dir), workdir)

  assert sent == [2]
  assert result.summary["stopped_early"] is True
  assert result.summary["step"] == 2
  assert int(result.state.step) == 2
  assert signal.getsignal(signal.SIGTERM) == handler_before        # handler restored
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert checkpointer.latest_step() == 2
  checkpointer.close()
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["stopped_early"] is True
  # The state returned is the one checkpointed at step 2, two thirds of the way to the
  # uninterrupted run's end (resuming from such a checkpoint is the test above).
  assert helpers.tree_bits(_host(result.state.params)) != helpers.tree_bits(
      _host(uninterrupted[1].state.params))


# ---------------------------------------------------------------------------------------
# d. Frozen parameters.
# ---------------------------------------------------------------------------------------

def _step_gradients(config, state, batch):
  """The gradient that the trainer's step (as `trainer.train` builds it, with
  `config.optimizer.trainable`) takes at `state`: of the task's loss through
  `trainer.frozen_without_gradient`, with that step's rng. On the host."""
  task = tasks.build_task(config)
  trainable = config.optimizer.trainable

  def loss(params, batch, step):
    rng = jax.random.fold_in(jax.random.key(config.seed), step)
    return task.loss(trainer.frozen_without_gradient(params, trainable), batch, rng)[0]

  return _host(jax.jit(jax.grad(loss))(state.params, batch, state.step))


def _check_frozen(config, batch, initial_params, final_state):
  """Frozen leaves stay bitwise and get exactly zero gradient; every trainable (flow/deep)
  leaf gets a non-zero one (AdamW's weight decay moves trainable leaves without any
  gradient, so "they changed" alone would prove nothing)."""
  params = _host(final_state.params)
  assert "deep" in params["flow"]            # the pattern below names a real subtree
  changed, frozen = 0, 0
  for (path, before), after in zip(jax.tree_util.tree_flatten_with_path(initial_params)[0],
                                   jax.tree.leaves(params)):
    name = tree_paths.path_name(path)
    if name.startswith("flow/deep/"):
      changed += int(helpers.bits(after) != helpers.bits(before))
    else:
      frozen += 1
      assert helpers.bits(after) == helpers.bits(before), name
  assert frozen > 10 and changed > 10

  # The gradient at the final parameters, on the last batch. (At a fresh start the deep
  # block's zero-initialised head gives every deep leaf upstream of it an exactly zero
  # gradient; after a step the head is non-zero and every trainable leaf has one.)
  grads = _step_gradients(config, final_state, batch)
  for path, grad in jax.tree_util.tree_flatten_with_path(grads)[0]:
    name = tree_paths.path_name(path)
    if name.startswith("flow/deep/"):
      assert np.any(grad != 0), f"trainable {name} has no gradient"
    else:
      assert not np.any(grad), f"frozen {name} has a gradient"

  # No optimizer moments for frozen parameters: every array in the optimizer state is a
  # scalar (step counts) or a moment of a flow/deep parameter.
  deep_sizes = [leaf.size for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
                if tree_paths.path_name(path).startswith("flow/deep/")]
  opt_leaves = jax.tree_util.tree_flatten_with_path(_host(final_state.opt_state))[0]
  moments = [(tree_paths.path_name(p), leaf) for p, leaf in opt_leaves if np.ndim(leaf) > 0]
  assert moments
  for name, _ in moments:
    assert "flow/deep/" in name, name
  assert sum(leaf.size for _, leaf in moments) == 2 * sum(deep_sizes)   # mu and nu


def test_frozen_parameters_stay_bitwise_in_sharded_training(records_dir):
  config = _config(records_dir)
  config.optimizer.trainable = DEEP_ONLY
  batches = _first_batches(config, tasks.build_task(config), 2)
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  initial_state, state, _ = _train_steps(config, mesh, batches)
  _check_frozen(config, batches[-1], initial_state.params, state)


def test_optimizer_freezes_parameters(meshes):
  """The optimizer alone (no mesh, no shardings): its step differentiates every parameter
  (no `trainable` given), so only the optimizer's trainable set keeps the frozen ones
  bitwise. Starts from the freshly initialised parameters of the mesh runs."""
  config, batches, initial_state, _ = meshes
  initial_params = initial_state.params
  config = config.copy_and_resolve_references()
  config.optimizer.trainable = DEEP_ONLY
  task = tasks.build_task(config)
  optimizer, schedule = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
  params = jax.tree.map(jax.numpy.asarray, initial_params)
  state = state_lib.TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                               opt_state=optimizer.init(params))
  step = jax.jit(trainer.make_train_step(task, optimizer, schedule, config.seed))
  for batch in batches[:2]:
    state, _ = step(state, batch)
  _check_frozen(config, batches[1], initial_params, state)
