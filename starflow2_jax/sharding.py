"""Meshes, logical axis rules and the shardings of parameters, optimizer state and batches.

Model code names only logical axes ("embed", "heads", "mlp", "batch", …). A config's rules
table maps them onto the mesh axes ("data", "fsdp", "tensor"); changing the parallelism is
changing data, never model code.
"""

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Default rules (MaxText-style): batch over data and fsdp; weights sharded along their model
# width over fsdp and along heads / MLP / vocabulary over tensor; everything else replicated.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", None),   # grouped-query K/V heads (Qwen: 2–4) rarely divide the tensor axis
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("head_dim", None),
    ("latent", None),
    ("context", None),
    ("layers", None),     # a scanned stack's layer axis (layers/scan.py) is never split
)


def make_mesh(mesh_shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None):
  """A mesh over `devices` (default: all) with axes data × fsdp × tensor.

  One entry of `mesh_shape` may be -1: it takes whatever devices remain. Axis types are
  Auto, so sharding constraints inside jit stay hints to the partitioner.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = [int(mesh_shape.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh_shape {dict(mesh_shape)}: at most one axis may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh_shape {dict(mesh_shape)} does not divide {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh_shape {dict(mesh_shape)} -> {sizes} needs {int(np.prod(sizes))} "
                     f"devices, but {len(devices)} are available")
  device_grid = np.asarray(devices).reshape(sizes)
  return jax.sharding.Mesh(device_grid, MESH_AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def mesh_and_rules(mesh_config):
  """The mesh and the logical axis rules of a config's `mesh` section."""
  return make_mesh(mesh_config.shape), rules_from_config(mesh_config.rules)


def rules_from_config(rules) -> tuple:
  """Accepts the config's list of [logical, mesh axis or list of axes or None]."""
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in rules)


def _is_box(x):
  return isinstance(x, nn.meta.AxisMetadata)


def logical_shardings(abstract_boxed_tree, mesh, rules):
  """NamedShardings for a tree whose leaves carry logical names (from `jax.eval_shape`).

  Boxes that hold no array (optax's `MaskedNode`, the optimizer state of a frozen
  parameter) are unwrapped first, so the result matches `strip_axis_names` of the tree.
  """
  def drop_empty_box(x):
    return x.unbox(apply_constraint=False) if _is_box(x) and not jax.tree.leaves(x) else x
  tree = jax.tree.map(drop_empty_box, abstract_boxed_tree, is_leaf=_is_box)
  specs = nn.get_partition_spec(tree)
  return jax.tree.map(lambda spec: NamedSharding(mesh, nn.logical_to_mesh_axes(spec, rules)),
                      specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def strip_axis_names(boxed_tree):
  """The values of a tree of logically partitioned boxes, without applying constraints
  (`nn.unbox` would constrain, which fails on abstract values outside of `jit`)."""
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if _is_box(x) else x,
                      boxed_tree, is_leaf=_is_box)


def batch_sharding(mesh, rules):
  """Sharding of a batch's leading axis according to the "batch" rule."""
  spec = nn.logical_to_mesh_axes(("batch",), rules)
  return NamedSharding(mesh, spec)


def replicated(mesh):
  return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch, mesh, rules):
  """Assembles each process's share of a batch (numpy) into global, sharded arrays."""
  sharding = batch_sharding(mesh, rules)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
