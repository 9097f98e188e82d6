"""What every importer needs from a Hugging Face safetensors directory, model-agnostic.

The shard files (one file, or several listed in model.safetensors.index.json), every tensor's
name and shape from the headers alone (nothing is read), one check of those against the
expected table that reports every problem at once, and the small table entries (`Rule`) and
layout transforms the importers share.
"""

import dataclasses
import json
import pathlib

import numpy as np


@dataclasses.dataclass(frozen=True)
class Rule:
  """One on-disk tensor: its shape, and the Flax leaves made from it (path, transform)."""
  shape: tuple
  targets: tuple            # ((flax path tuple, fn: np.ndarray -> np.ndarray), ...)


def keep(w):
  return w


def transpose(w):
  return w.T


def heads_in(heads, head_dim):
  """Linear [heads·head_dim, D] -> einsum kernel [D, heads, head_dim] (or bias -> [heads, hd])."""
  return lambda w: w.T.reshape(-1, heads, head_dim) if w.ndim == 2 else w.reshape(heads, head_dim)


def heads_out(heads, head_dim):
  """Linear [D, heads·head_dim] -> einsum kernel [heads, head_dim, D]."""
  return lambda w: w.T.reshape(heads, head_dim, -1)


def chunk(i, parts, fn):
  """The i-th of `parts` equal pieces along axis 0 (a fused projection), then `fn`."""
  return lambda w: fn(np.split(w, parts, axis=0)[i])


def shard_files(hf_dir):
  """The safetensors files of `hf_dir`: those of the index when there is one, else *.safetensors."""
  hf_dir = pathlib.Path(hf_dir)
  index = hf_dir / "model.safetensors.index.json"
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
  else:
    files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
  if not files:
    raise FileNotFoundError(f"{hf_dir}: no *.safetensors files and no "
                            "model.safetensors.index.json")
  missing = [f for f in files if not (hf_dir / f).exists()]
  if missing:
    raise FileNotFoundError(f"{hf_dir}: shards listed in the index are missing: {missing}")
  return [hf_dir / f for f in files]


def read_headers(hf_dir, canonical_name=keep):
  """{canonical name: (file, on-disk name, shape)} from the shard headers only."""
  from safetensors import safe_open
  found, duplicates = {}, []
  for path in shard_files(hf_dir):
    with safe_open(str(path), framework="np") as f:
      for name in f.keys():
        canonical = canonical_name(name)
        if canonical in found:
          duplicates.append(f"{name} ({path.name} and {found[canonical][0].name})")
        found[canonical] = (path, name, tuple(f.get_slice(name).get_shape()))
  if duplicates:
    raise ValueError(f"{hf_dir}: tensors stored twice: {duplicates}")
  return found


class CheckpointMismatchError(ValueError):
  """The checkpoint's tensors do not match the config; the message lists every problem."""


def _where(name, found):
  """' (in FILE)' or ' (in FILE as STORED)' where the stored name is another spelling."""
  path, stored, _ = found[name]
  return f" (in {path.name}" + (f" as {stored})" if stored != name else ")")


def check_tensors(rules, found, hf_dir, ignorable=()):
  """Raises one CheckpointMismatchError listing every missing, unexpected and mis-shaped
  tensor of `found` (read_headers) against `rules`; names in `ignorable` may be present."""
  missing = sorted(set(rules) - set(found))
  unexpected = sorted(set(found) - set(rules) - set(ignorable))
  misshaped = sorted(f"{name}: file {found[name][2]}, config expects {rules[name].shape}"
                     f"{_where(name, found)}"
                     for name in set(rules) & set(found) if found[name][2] != rules[name].shape)
  if missing or unexpected or misshaped:
    lines = [f"{hf_dir}: checkpoint does not match its config.json"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("mis-shaped", misshaped)):
      if items:
        lines.append(f"  {len(items)} {title}: " + ", ".join(items[:20]) +
                     (f", ... ({len(items) - 20} more)" if len(items) > 20 else ""))
    raise CheckpointMismatchError("\n".join(lines))


def planned_tensors(rules, found, dtype):
  """Yields (on-disk name, source tensor, Flax path, rearranged host copy in `dtype`) for
  every rule, reading one tensor at a time, file by file (each safetensors file opened
  once); the source tensor is dropped before the next is read."""
  from safetensors import safe_open
  by_file = {}
  for name in rules:
    path, stored_name, _ = found[name]
    by_file.setdefault(path, []).append((name, stored_name))
  for path, names in by_file.items():
    with safe_open(str(path), framework="np") as f:
      for name, stored_name in names:
        source = f.get_tensor(stored_name)
        for target, fn in rules[name].targets:
          yield name, source, target, np.ascontiguousarray(fn(source).astype(dtype, copy=False))
        del source
