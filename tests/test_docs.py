"""The docs name only files that exist: every repository path quoted in README.md, docs/ and
the package READMEs (`…/….py`, `….md`, `folder/`) is there, so no doc points at a module that
moved or at a file outside the repository."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "data_pipelines/README.md", "tests/README.md", "benchmarks/README.md"] + [
    os.path.join("docs", name) for name in sorted(os.listdir(os.path.join(ROOT, "docs")))
    if name.endswith(".md")]
# A quoted path: backticked, with a file suffix or a trailing slash, no spaces or globs.
QUOTED_PATH = re.compile(r"`([\w./-]+(?:\.(?:py|md|json|txt|sh|ini)|/))(?::[\w.-]+)?`")
NOT_REPOSITORY_FILES = re.compile(
    r"^(runs|data|ckpt|imgs|images|samples|checkpoints|tensorboard|interleaved|stage\d?)/|"
    r"^(summary|config|comparison)\.json$|_summary\.json$|^<|index\.html$")


# A bare upper-case doc name in prose (README.md, SPEC.md), quoted or not.
DOC_NAME = re.compile(r"(?<![\w/.])([A-Z][A-Z_]*\.md)\b")


def quoted_paths(text):
  """The repository paths a doc names (`../` paths lie outside the repository by intent)."""
  found = {m.group(1) for m in QUOTED_PATH.finditer(text)} | set(DOC_NAME.findall(text))
  return sorted(p for p in found if not NOT_REPOSITORY_FILES.search(p) and "<" not in p
                and not p.startswith("../"))


def _repository_names():
  names = set()
  for directory, folders, files in os.walk(ROOT):
    folders[:] = [f for f in folders if not f.startswith(".")]
    names.update(files)
    names.update(f + "/" for f in folders)
  return names


REPOSITORY_NAMES = _repository_names()


def resolves(path, doc):
  """Whether `path` exists: a path with a folder from the repository root, beside the doc or
  in the package; a bare `.py`, `.md` or folder name anywhere in the repository (a table row
  names its folder); other bare names (a checkpoint's files) are not the repository's."""
  if "/" not in path.rstrip("/"):
    return path in REPOSITORY_NAMES if path.endswith((".py", ".md", "/")) else True
  bases = [ROOT, os.path.dirname(os.path.join(ROOT, doc)), os.path.join(ROOT, "starflow2_jax")]
  return any(os.path.exists(os.path.join(base, path)) for base in bases)


@pytest.mark.parametrize("doc", DOCS)
def test_quoted_paths_exist(doc):
  with open(os.path.join(ROOT, doc)) as f:
    paths = quoted_paths(f.read())
  missing = [p for p in paths if not resolves(p, doc)]
  assert not missing, f"{doc} names paths that do not exist: {missing}"


def test_the_check_sees_a_missing_path():
  assert quoted_paths("see `STACK.md` and `flows/block.py`, `runs/demo/` and `x y.py`; "
                      "as measured (NOTES.md), `../shared/SPEC.md`") == [
      "NOTES.md", "STACK.md", "flows/block.py"]
  assert not resolves("STACK.md", "docs/qwen.md") and resolves("flows/block.py", "README.md")
