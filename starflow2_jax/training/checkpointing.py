"""Orbax checkpoints of the train state and the input pipeline's position, saved together.

Saving is asynchronous (training goes on while the state is written), keeps the last N
steps, and restores into any mesh: the target is the abstract state with its shardings.
Restoring the latest step falls back to earlier ones when it cannot be read (e.g. a file
truncated by a crash or a full disk). Parameters another checkpoint already holds (a frozen
VLM) can be left out and read back from there (`kept_elsewhere`).
"""

import json
import logging
import os
import re

import grain
import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from starflow2_jax.layers import scan


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for (train state, data iterator) pairs.

  `kept_elsewhere` ({top-level parameter name: (source, load)}) leaves those parameters out
  of every save — a frozen VLM that its converted checkpoint already holds — and `restore`
  reads them back with `load(abstract subtree)`; `source` (e.g. that checkpoint's path) is
  written to `kept_elsewhere.json` beside the steps, so a reader knows where they are."""

  def __init__(self, directory, keep=2, async_save=True, kept_elsewhere=None):
    self.directory = os.path.abspath(directory)
    self._elsewhere = dict(kept_elsewhere or {})
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save,
        preservation_policy=ocp.checkpoint_managers.LatestN(keep))
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._unreadable = {}     # step -> error, for the steps `restore` had to pass over

  def latest_step(self):
    """The newest step on disk, less those `restore` found unreadable."""
    return max(set(self._manager.all_steps()) - set(self._unreadable), default=None)

  def save(self, step, state, data_iterator=None, force=False):
    self._discard_unreadable()
    self._note_elsewhere()
    items = {"state": ocp.args.StandardSave(self._without_elsewhere(state))}
    if data_iterator is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state, data_iterator=None, step=None):
    """Restores the state (into the shardings of `abstract_state`) and, in place, the
    iterator's position. Returns the state.

    Without `step`, the newest step that can be read: one that fails is logged (a warning
    naming the step and the error) and the step before it tried, since resuming a little
    earlier beats not resuming; raises if none can be read. A given `step` is read or raises.
    """
    if step is not None:
      self._check_layout(step, abstract_state)
      return self._restore_step(step, abstract_state, data_iterator)
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    self._check_layout(steps[0], abstract_state)   # a config error, not an unreadable step
    errors = {}
    for step in steps:
      try:
        state = self._restore_step(step, abstract_state, data_iterator)
      except Exception as e:    # orbax and tensorstore raise bare Exceptions and ValueErrors
        errors[step] = e
        logging.warning("checkpoint step %d in %s cannot be read (%s); trying an earlier step",
                        step, self.directory, describe_error(e))
        continue
      self._unreadable.update(errors)
      return state
    lines = "\n".join(f"  step {s}: {describe_error(e)}" for s, e in errors.items())
    raise CheckpointUnreadableError(
        f"no checkpoint step in {self.directory} can be read:\n{lines}") from errors[steps[0]]

  def _restore_step(self, step, abstract_state, data_iterator):
    items = {"state": ocp.args.StandardRestore(self._without_elsewhere(abstract_state))}
    if data_iterator is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iterator)
    state = self._manager.restore(step, args=ocp.args.Composite(**items))["state"]
    if not self._elsewhere:
      return state
    loaded = {name: load(abstract_state.params[name])
              for name, (_, load) in self._elsewhere.items()}
    return state.replace(params=dict(state.params, **loaded))

  def _check_layout(self, step, abstract_state):
    """Refuses a checkpoint whose layer stacks are laid out otherwise than the model's
    (`model.scan_layers` switched since it was written); metadata that cannot be read is
    left to the restore to report."""
    if not hasattr(abstract_state, "params"):
      return
    path = os.path.join(self.directory, str(step), "state")
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)     # orbax's warnings about a damaged step: the
    try:                                    # restore below reports that step once
      saved = saved_params(path)
    except Exception:      # orbax raises bare Exceptions for what it cannot read
      return
    finally:
      absl_logger.setLevel(level)
    wanted = self._without_elsewhere(abstract_state).params
    _check_layer_layout(path, saved, traverse_util.flatten_dict(wanted, sep="/"))

  def _without_elsewhere(self, state):
    """`state` (or its abstract twin) without the parameters kept elsewhere."""
    if not self._elsewhere:
      return state
    return state.replace(params={k: v for k, v in state.params.items()
                                 if k not in self._elsewhere})

  def _note_elsewhere(self):
    if not self._elsewhere or jax.process_index() != 0:
      return
    path = os.path.join(self.directory, "kept_elsewhere.json")
    os.makedirs(self.directory, exist_ok=True)
    with open(path + ".partial", "w") as f:
      json.dump({name: source for name, (source, _) in self._elsewhere.items()}, f, indent=2)
    os.replace(path + ".partial", path)

  def _discard_unreadable(self):
    """Deletes the steps `restore` could not read before the first save after it: they are
    newer than the restored step, so orbax would skip saves below them, count them among
    the kept checkpoints, and refuse a save at the same step."""
    for step, error in sorted(self._unreadable.items()):
      logging.warning("deleting unreadable checkpoint step %d in %s (%s)", step, self.directory,
                      describe_error(error))
      self._manager.delete(step)
    self._unreadable.clear()

  def wait(self):
    """Blocks until asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()


class CheckpointUnreadableError(RuntimeError):
  """No step of a checkpoint directory could be restored."""


def describe_error(error):
  """One line per exception in the chain (tensorstore's outer messages dump whole specs,
  the cause says what is wrong: e.g. a byte range past the end of a truncated file)."""
  parts = []
  while error is not None and len(parts) < 4:
    lines = str(error).strip().splitlines() or [""]
    parts.append(f"{type(error).__name__}: {lines[0][:200]}")
    error = error.__cause__ or error.__context__
  return " <- ".join(parts)


def saved_params(path):
  """{"a/b/c": metadata} of the parameters in a saved train state (`<step>/state`)."""
  tree = ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree
  return traverse_util.flatten_dict(tree["params"], sep="/")


def _check_layer_layout(path, saved, wanted):
  """A stack saved unrolled and wanted scanned (or the reverse) would share no layer with
  the model (a warm start would silently keep fresh layers; a resume would find every step
  unreadable): an error naming the stacks instead."""
  saved_unrolled, saved_scanned = scan.stack_paths(saved)
  wanted_unrolled, wanted_scanned = scan.stack_paths(wanted)
  crossed = sorted((saved_unrolled & wanted_scanned) | (saved_scanned & wanted_unrolled))
  if crossed:
    raise ValueError(
        f"the checkpoint at {path} and the model lay out the layers of {crossed} differently "
        "(one unrolled as layer_0, layer_1, …, the other scanned as 'layers'): set "
        "config.model.scan_layers as in the run that wrote it (or convert the parameters "
        "with starflow2_jax.layers.scan.scanned_layout / unrolled_layout)")


def restore_params_subset(directory, params, step=None, reinitialise=()):
  """Warm start: `params` with every leaf that a trainer checkpoint also holds read from it,
  the rest kept (e.g. the skips a new stage adds).

  A leaf the checkpoint holds with another shape is an error naming every such path and both
  shapes, unless its path matches one of the `reinitialise` regexes (then it keeps its fresh
  init). Reads only the restored leaves, straight into the shardings of `params`. Returns
  (params, names restored); raises if the checkpoint shares no leaf with `params`.
  """
  manager = ocp.CheckpointManager(os.path.abspath(directory))
  step = manager.latest_step() if step is None else step
  manager.close()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {directory} to warm-start from")
  path = os.path.join(os.path.abspath(directory), str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  saved = saved_params(path)
  wanted = traverse_util.flatten_dict(params, sep="/")
  _check_layer_layout(path, saved, wanted)
  differ = [k for k, v in wanted.items()
            if k in saved and tuple(saved[k].shape) != tuple(v.shape)]
  unexpected = [k for k in differ if not any(re.fullmatch(p, k) for p in reinitialise)]
  if unexpected:
    lines = "\n".join(f"  {k}: checkpoint {tuple(saved[k].shape)}, model "
                      f"{tuple(wanted[k].shape)}" for k in unexpected)
    raise ValueError(f"the checkpoint at {path} holds {len(unexpected)} parameter(s) with "
                     f"other shapes than the model's:\n{lines}\nlist them in "
                     "config.init.reinitialise (regexes) to start them fresh instead")
  shared = {k: v for k, v in wanted.items() if k in saved and k not in differ}
  if not shared:
    raise ValueError(f"the checkpoint at {path} shares no parameter with the model")
  target = {"params": traverse_util.unflatten_dict(shared, sep="/")}
  restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True))
  merged = dict(wanted, **traverse_util.flatten_dict(restored["params"], sep="/"))
  merged = {k: jax.numpy.asarray(v, wanted[k].dtype) for k, v in merged.items()}
  return traverse_util.unflatten_dict(merged, sep="/"), sorted(shared)
