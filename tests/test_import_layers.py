"""The library's layers, checked statically: every import (also those inside functions) runs
downward, no import cycle exists, and nothing in the library imports experiments/, demos/
or tests/.

    layer 0  data_pipelines, starflow2_jax.{layers, sharding, image_io, tree_paths}
    layer 1  starflow2_jax.flows
    layer 2  starflow2_jax.models
    layer 3  starflow2_jax.{latents, convert}
    layer 4  starflow2_jax.sampling
    layer 5  starflow2_jax.evaluation  (evaluators; the trainer runs them, so they sit below)
    layer 6  starflow2_jax.training
    layer 7  starflow2_jax.cli

A module may import its own package (part) and any lower layer; a part may not import
another part of its own layer.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY_PACKAGES = ("starflow2_jax", "data_pipelines")
OUTSIDE_THE_LIBRARY = ("experiments", "demos", "tests")
LAYERS = (
    ("data_pipelines", "starflow2_jax.layers", "starflow2_jax.sharding", "starflow2_jax.image_io",
     "starflow2_jax.tree_paths"),
    ("starflow2_jax.flows",),
    ("starflow2_jax.models",),
    ("starflow2_jax.latents", "starflow2_jax.convert"),
    ("starflow2_jax.sampling",),
    ("starflow2_jax.evaluation",),
    ("starflow2_jax.training",),
    ("starflow2_jax.cli",),
)


def part_of(module):
  """(layer, part) of a library module, e.g. ('starflow2_jax.flows.block') -> (1, '…flows')."""
  for layer, parts in enumerate(LAYERS):
    for part in parts:
      if module == part or module.startswith(part + "."):
        return layer, part
  return None


def library_modules():
  """{module name: file path} of every module of the library packages."""
  found = {}
  for package in LIBRARY_PACKAGES:
    for directory, _, files in os.walk(os.path.join(ROOT, package)):
      for name in files:
        if name.endswith(".py"):
          path = os.path.join(directory, name)
          module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
          found[module.removesuffix(".__init__")] = path
  return found


def imports_of(path, modules):
  """Every module `path` imports (anywhere in the file), as absolute names."""
  tree = ast.parse(open(path).read(), path)
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names += [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      for alias in node.names:      # `from a import b` imports module a.b when there is one
        full = f"{node.module}.{alias.name}"
        names.append(full if full in modules else node.module)
  return names


def violations(graph):
  """What breaks the rules in {module: [imported modules]}: a list of messages."""
  found = []
  for module, imported in graph.items():
    if module in LIBRARY_PACKAGES and not imported:
      continue                                      # an empty top-level __init__
    layer, part = part_of(module) or (None, None)
    if layer is None:
      found.append(f"{module} belongs to no layer (add it to LAYERS)")
      continue
    for name in imported:
      if name.split(".")[0] in OUTSIDE_THE_LIBRARY:
        found.append(f"{module} imports {name}, which is outside the library")
        continue
      target = part_of(name)
      if target is None:
        continue                                    # a third-party or standard module
      if target[1] != part and target[0] >= layer:
        found.append(f"{module} (layer {layer}) imports {name} (layer {target[0]})")
  return found


def cycles(graph):
  """Import cycles among the library's modules, each as a list of names."""
  found, state = [], {}

  def visit(module, path):
    state[module] = "open"
    for name in graph.get(module, ()):
      if name not in graph:
        continue
      if state.get(name) == "open":
        found.append(path[path.index(name):] + [name])
      elif name not in state:
        visit(name, path + [name])
    state[module] = "done"

  for module in graph:
    if module not in state:
      visit(module, [module])
  return found


@pytest.fixture(scope="module")
def graph():
  modules = library_modules()
  return {module: imports_of(path, modules) for module, path in modules.items()}


def test_every_import_runs_downward(graph):
  assert len(graph) > 40                    # the walk found the library
  assert violations(graph) == []


def test_no_import_cycles(graph):
  assert cycles(graph) == []


def test_the_checks_catch_what_they_forbid():
  graph = {
      "starflow2_jax.flows.block": ["starflow2_jax.models.pretzel"],     # upward
      "starflow2_jax.sampling.prompts": ["starflow2_jax.training.data"],  # upward
      "starflow2_jax.training.data": ["demos.fashion_mnist"],             # outside
      "starflow2_jax.latents.patch": ["starflow2_jax.convert.qwen"],      # same layer, other part
      "starflow2_jax.models.pretzel": ["starflow2_jax.flows.block", "jax"],   # fine
      "starflow2_jax.models.adapter": ["starflow2_jax.models.pretzel"],   # fine: same part
  }
  assert len(violations(graph)) == 4
  assert cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c", "a"]]
