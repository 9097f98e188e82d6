"""The trainer: one function that reads top to bottom, the same for every task and stage.

    record -> batch -> jitted, sharded step -> metrics, samples and checkpoints

Resume is exact: the batch at step k comes from the checkpointed iterator position (with
`data.elastic`, from k alone, so the process count may change) and the step's randomness is
fold_in(seed, k), so a run stopped and resumed ends bit-identical to an uninterrupted one.
With several processes (`distributed`), each feeds its rows of the global batch, all save
and restore the checkpoints, and only process 0 writes logs, TensorBoard, samples and
summary.json. SIGTERM saves a checkpoint and returns; the last step is always saved.
A step with a non-finite loss or gradient changes nothing but the step counter; too many in
a row save the (last good) state and return, as SIGTERM does.
"""

import json
import logging
import os
import signal
import time
from typing import NamedTuple

import flax.linen as nn
import jax
import ml_collections
import optax

from starflow2_jax import image_io
from starflow2_jax import sharding
from starflow2_jax import tree_paths
from starflow2_jax.evaluation import evaluators
from starflow2_jax.training import accumulation
from starflow2_jax.training import checkpointing
from starflow2_jax.training import data as data_lib
from starflow2_jax.training import metrics as metrics_lib
from starflow2_jax.training import optimizer as optimizer_lib
from starflow2_jax.training import state as state_lib
from starflow2_jax.training import tasks


CONFIG_FILE = "config.json"


class TrainResult(NamedTuple):
  summary: dict
  state: state_lib.TrainState
  task: object


class StatePlan(NamedTuple):
  optimizer: object
  schedule: object
  abstract: object    # the state's ShapeDtypeStructs, with shardings
  shardings: object


def plan_state(config, task, mesh, rules):
  """The optimizer and the abstract, sharded train state of `task` on `mesh`.

  Call inside `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`.
  """
  optimizer, schedule = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
  abstract, shardings = state_lib.abstract_state(task.init_params, optimizer, mesh, rules)
  return StatePlan(optimizer, schedule, abstract, shardings)


class _StopSignal:
  """Turns SIGTERM into a flag the loop checks between steps (so we save, then exit)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: leave signals alone
      self._previous = None
    return self

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint, then stopping")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class NonfiniteSteps:
  """Counts the steps the train step skipped for a non-finite loss or gradient, in all and
  in a row (in this call of `train`); `limit` in a row stop the run (0: never)."""

  def __init__(self, limit):
    self.limit, self.total, self.in_a_row = limit, 0, 0

  def skipped(self, step, flag, step_metrics):
    """Whether `step` was skipped, from its `nonfinite` flag (a host sync); warns if so."""
    if not float(flag):
      self.in_a_row = 0
      return False
    self.total += 1
    self.in_a_row += 1
    logging.warning("step %d skipped: non-finite loss (%s) or gradient norm (%s); %d in a row, "
                    "%d in all", step, float(step_metrics.get("loss", float("nan"))),
                    float(step_metrics["grad_norm"]), self.in_a_row, self.total)
    return True

  @property
  def limit_reached(self):
    return self.limit > 0 and self.in_a_row >= self.limit


def stop_reason(stop, deadline, nonfinite):
  """Why the loop stops after this step ("nonfinite", "sigterm", "time_limit"), or None."""
  if nonfinite.limit_reached:
    return "nonfinite"
  if stop.requested:
    return "sigterm"
  if deadline is not None and time.time() > deadline:
    return "time_limit"
  return None


def log_stop(step, reason, nonfinite):
  """A warning for a requested stop; an error for one forced by non-finite steps."""
  if reason != "nonfinite":
    logging.warning("stopping at step %d (%s)", step, reason)
    return
  logging.error("stopping at step %d: %d steps in a row had a non-finite loss or gradient "
                "(train.max_nonfinite_steps=%d); the checkpoint of step %d holds the state from "
                "before them (skipped steps only advance the step counter)", step,
                nonfinite.in_a_row, nonfinite.limit, step)


def frozen_without_gradient(params, trainable):
  """`params` with every leaf outside the `trainable` patterns behind `stop_gradient`: their
  gradients are symbolic zeros, so autodiff skips the backward work that only they need
  (e.g. the shallow blocks' backward pass in stage 2)."""
  labels = tree_paths.trainable_labels(params, tuple(trainable))
  return jax.tree.map(lambda p, label: p if label == "train" else jax.lax.stop_gradient(p),
                      params, labels)


def keep_if(condition, new, old):
  """`new` where the scalar `condition` holds, else `old`, leaf by leaf (bitwise `old`)."""
  return jax.tree.map(lambda n, o: jax.numpy.where(condition, n, o), new, old)


def make_train_step(task, optimizer, schedule, seed, trainable=(".*",)):
  """(state, batch) -> (state, metrics): one optimizer step on `task.loss`; only parameters
  matching the `trainable` patterns are differentiated.

  A step whose loss or gradient norm is not finite is skipped: params and opt_state stay
  bitwise as they were (the optimizer's own count too, so its learning-rate schedule lags
  `state.step` by the number of skipped steps), while `state.step` still advances, so that
  step k keeps batch k and fold_in(seed, k). metrics["nonfinite"] is 1.0 for a skipped step.

  With `train.microbatches` = K > 1 the loss, metrics and gradient are accumulated over K
  microbatches (`accumulation`), equal to the full batch's up to float32 summation order.
  """
  loss_and_grad = accumulation.loss_and_grad(
      task, lambda params: frozen_without_gradient(params, trainable))

  def train_step(state, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    (loss, step_metrics), grads = loss_and_grad(state.params, batch, rng)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jax.numpy.isfinite(loss) & jax.numpy.isfinite(grad_norm)
    params, opt_state = keep_if(finite, (params, opt_state), (state.params, state.opt_state))
    step_metrics = dict(step_metrics, learning_rate=schedule(state.step), grad_norm=grad_norm,
                        nonfinite=jax.numpy.where(finite, 0.0, 1.0))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), step_metrics
  return train_step


def evaluate(eval_step, params, batches, mesh, rules, seed):
  """Averages a task's eval metrics over the held-out batches."""
  acc = metrics_lib.MetricAccumulator()
  for i, batch in enumerate(batches):
    rng = jax.random.fold_in(jax.random.key(seed + 1), i)
    acc.add(eval_step(params, sharding.global_batch(batch, mesh, rules), rng))
  return acc.compute()


def held_out_metrics_fn(config, task, eval_step, params, data_dir, mesh, rules):
  """`held_out_metrics(split=None, num_examples=None)` for evaluators: the task's eval
  metrics averaged over the first examples of a records split (default: the config's)."""
  def held_out_metrics(split=None, num_examples=None):
    batches = data_lib.eval_batches(config, task, data_dir, split, num_examples)
    with nn.logical_axis_rules(rules):
      return evaluate(eval_step, params, batches, mesh, rules, config.seed)
  return held_out_metrics


def save_samples(task, params, step, workdir, writer, seed):
  """The task's sample grid as PNG and in TensorBoard; None if the task draws no images."""
  grid = task.sample_grid(params, jax.random.fold_in(jax.random.key(seed + 2), step))
  if grid is None:
    return None
  grid = grid[0]
  writer.image(step, "samples", grid)
  path = os.path.join(workdir, "samples", f"step_{step:07d}.png")
  return image_io.save_png(grid, path) if jax.process_index() == 0 else path


def train(config, workdir):
  """Trains `config.task` in `workdir`, resuming from its latest checkpoint.

  Returns the summary (also written to `<workdir>/summary.json`), the final state and the
  task, so that callers (the demo, tests) can go on evaluating without a reload.

  A run stops early, saving a checkpoint at the step it reached, on SIGTERM, at
  `train.time_limit_minutes`, or after `train.max_nonfinite_steps` (default 10; 0: never)
  skipped steps in a row (see `make_train_step`); it then returns normally, with
  `stopped_early` true and `stop_reason` "sigterm", "time_limit" or "nonfinite" (an error is
  logged for the last). Skipped steps leave the state unchanged, so after a "nonfinite" stop
  the state returned and checkpointed is the last good one, under the step number reached.
  `nonfinite_steps` counts the steps skipped in this call (each is logged as a warning and
  written to TensorBoard as train/nonfinite_steps); they are left out of the train averages.
  """
  os.makedirs(workdir, exist_ok=True)
  start_time = time.time()
  cfg_train = config.train
  if jax.process_index() == 0:
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      f.write(config.to_json(indent=2))

  # ---- Task, mesh and input pipeline -------------------------------------------------
  task = tasks.build_task(config)
  mesh, rules = sharding.mesh_and_rules(config.mesh)
  data_dir = data_lib.records_dir(config, workdir)
  train_batches = data_lib.TrainBatches(config, task, data_dir, mesh, rules)
  mixture_counter = data_lib.mixture_counter(config, data_dir)     # realised proportions

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    # ---- Optimizer and sharded state (abstract first) --------------------------------
    optimizer, schedule, abstract, shardings = plan_state(config, task, mesh, rules)

    # ---- Resume or initialise ---------------------------------------------------------
    checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                              keep=cfg_train.keep_checkpoints,
                                              kept_elsewhere=kept_elsewhere(task))
    if checkpointer.latest_step() is not None:
      state = checkpointer.restore(abstract, train_batches.checkpointed)
      logging.info("resumed from step %d", int(state.step))
    else:
      state = state_lib.create_state(task.init_params, optimizer, shardings,
                                     jax.random.key(config.seed))
      state = state.replace(params=task.warm_start(state.params))   # e.g. an earlier stage
    train_iter = train_batches.start(int(state.step))

    # ---- Compiled steps ---------------------------------------------------------------
    batch_sharding = sharding.batch_sharding(mesh, rules)
    replicated = sharding.replicated(mesh)
    train_step = jax.jit(make_train_step(task, optimizer, schedule, config.seed,
                                         config.optimizer.trainable),
                         in_shardings=(shardings, batch_sharding),
                         out_shardings=(shardings, replicated), donate_argnums=(0,))
    eval_step = jax.jit(task.eval_metrics, in_shardings=(shardings.params, batch_sharding, replicated),
                        out_shardings=replicated)

    # ---- Loop ---------------------------------------------------------------------------
    writer = metrics_lib.MetricWriter(os.path.join(workdir, "tensorboard"))
    step = int(state.step)
    train_acc = metrics_lib.MetricAccumulator()
    last_train, last_evals = {}, {}
    bar = metrics_lib.progress_bar(step, cfg_train.steps)
    deadline = (start_time + 60 * cfg_train.time_limit_minutes
                if cfg_train.time_limit_minutes > 0 else None)
    nonfinite = NonfiniteSteps(cfg_train.get("max_nonfinite_steps", 10))
    reason = None

    # ---- Evaluators (config.evals; the held-out metrics alone by default) --------------
    evals = evaluators.select(config)

    def run_evals(step, final=False, names=None):
      due = evaluators.due(evals, step, final)
      due = {n: e for n, e in due.items() if names is None or e["type"] in names}
      if not due:
        return {}
      held_out = held_out_metrics_fn(config, task, eval_step, state.params, data_dir, mesh,
                                     rules)
      context = evaluators.EvalContext(config, task, state.params, step, workdir, data_dir,
                                       held_out)
      # Without the logical axis rules: evaluators draw batches of any size (300 captions
      # on 8 devices), which the activations' batch sharding could not split.
      with nn.logical_axis_rules(()):
        return evaluators.run(due, context, writer)

    with _StopSignal() as stop:
      while step < cfg_train.steps:
        batch = sharding.global_batch(mixture_counter.pop(next(train_iter)), mesh, rules)
        state, step_metrics = train_step(state, batch)
        step += 1
        if nonfinite.skipped(step, step_metrics.pop("nonfinite"), step_metrics):
          writer.scalars(step, dict(nonfinite_steps=nonfinite.total), prefix="train/")
        else:                                # a skipped step's NaNs stay out of the averages
          train_acc.add(step_metrics)
        bar.update(1)
        if step % cfg_train.log_every == 0 or step == cfg_train.steps:
          writer.scalars(step, mixture_counter.fractions(), prefix="data/mixture/")
          window = train_acc.compute()       # empty if every step since the last log was skipped
          if window:
            last_train = window
            writer.scalars(step, last_train, prefix="train/")
            bar.set_postfix(loss=f"{last_train['loss']:.4f}")
        if step < cfg_train.steps:
          last_evals = {**last_evals, **run_evals(step)}   # each entry's latest result
        if cfg_train.sample_every and step % cfg_train.sample_every == 0:
          save_samples(task, state.params, step, workdir, writer, config.seed)
        reason = stop_reason(stop, deadline, nonfinite)
        if step % cfg_train.checkpoint_every == 0 or reason:
          checkpointer.save(step, state, train_batches.checkpointed)
        if reason:
          log_stop(step, reason, nonfinite)
          break
    stopped_early = reason is not None
    bar.close()
    if checkpointer.latest_step() != step:                    # the last step, always
      checkpointer.save(step, state, train_batches.checkpointed, force=True)
    checkpointer.wait()
    checkpointer.close()
    if not last_train:
      last_train = train_acc.compute()

    # ---- Final evaluation, samples and summary ----------------------------------------
    # A run stopped early still reports held-out metrics, without slow evaluators.
    if not stopped_early:
      last_evals = {**last_evals, **run_evals(step, final=True)}
    elif "bpd" not in last_evals:
      last_evals = {**last_evals, **run_evals(step, final=True, names=("bpd",))}
    last_eval = last_evals.get("bpd", {})
    sample_path = (save_samples(task, state.params, step, workdir, writer, config.seed)
                   if cfg_train.get("final_samples", True) else None)
    writer.flush()
    writer.close()

  summary = dict(
      step=step, train_loss=last_train.get("loss"), train_nll=last_train.get("nll"),
      test_bpd=last_eval.get("pixel_bpd"), test_nll=last_eval.get("nll"),
      eval=last_eval, evals=last_evals, stopped_early=stopped_early, stop_reason=reason,
      nonfinite_steps=nonfinite.total, wall_seconds=time.time() - start_time,
      samples=sample_path and os.path.relpath(sample_path, workdir))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return TrainResult(summary, state, task)


def load_config(workdir):
  """The config a run in `workdir` was trained with (written there by `train`)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: is {workdir} a training workdir? "
                            "Pass --config to say which config to use.")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def kept_elsewhere(task):
  """The parameters a task keeps out of its checkpoints ({name: (source, load)}; e.g. a
  frozen VLM read back from its converted checkpoint), or {}."""
  return task.kept_elsewhere() if hasattr(task, "kept_elsewhere") else {}


def restore_params(config, workdir, step=None):
  """(task, params, step) from the latest (or given) checkpoint of a training workdir,
  placed on the config's mesh; the optimizer state is read as well but not kept."""
  task = tasks.build_task(config)
  mesh, rules = sharding.mesh_and_rules(config.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = plan_state(config, task, mesh, rules).abstract
    checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                              async_save=False,
                                              kept_elsewhere=kept_elsewhere(task))
    state = checkpointer.restore(abstract, step=step)
    checkpointer.close()
  return task, state.params, int(state.step)
