"""Orbax checkpoints of the train state and the input pipeline's position, saved together.

Saving is asynchronous (training goes on while the state is written), keeps the last N
steps, and restores into any mesh: the target is the abstract state with its shardings.
"""

import os
import re

import grain
import jax
import orbax.checkpoint as ocp
from flax import traverse_util


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for (train state, data iterator) pairs."""

  def __init__(self, directory, keep=2, async_save=True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save,
        preservation_policy=ocp.checkpoint_managers.LatestN(keep))
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self):
    return self._manager.latest_step()

  def save(self, step, state, data_iterator=None, force=False):
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state, data_iterator=None, step=None):
    """Restores the state (into the shardings of `abstract_state`) and, in place, the
    iterator's position. Returns the state."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def wait(self):
    """Blocks until asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()


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
  saved = traverse_util.flatten_dict(checkpointer.metadata(path).item_metadata.tree["params"],
                                     sep="/")
  wanted = traverse_util.flatten_dict(params, sep="/")
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
