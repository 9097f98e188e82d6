"""Parameters named by '/'-joined paths and selected by regexes (big_vision style).

Trainable sets, warm-start exclusions and parameter counts all name parameters this way.
"""

import re

import jax


def path_name(path):
  """'a/b/c' for a pytree key path (boxed params included)."""
  parts = []
  for key in path:
    name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", None)))
    if name is not None and name != "value":
      parts.append(str(name))
  return "/".join(parts)


def trainable_labels(params, patterns):
  """'train' for parameters whose path fully matches one of `patterns`, else 'freeze'."""
  compiled = [re.compile(p) for p in patterns]
  def label(path, _):
    name = path_name(path)
    return "train" if any(p.fullmatch(name) for p in compiled) else "freeze"
  return jax.tree_util.tree_map_with_path(label, params)
