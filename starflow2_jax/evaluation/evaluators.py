"""Evaluators named by string in the config, as big_vision's: what `starflow2 eval --evals`
and the trainer (every `every` steps and at the end) run.

A config lists them under `evals`, one entry per name:

    config.evals = dict(
        bpd=dict(every=500),                                   # type defaults to the name
        mmbench=dict(type="mcq_tsv", tsv="/data/MMBench_DEV_EN.tsv", every=0),
    )

`type` picks the registered evaluator (default: the entry's own name), `every` how often the
trainer runs it (0: only after the last step), and every other field is passed to it as a
keyword option. A config without `evals` gets `{"bpd": {}}` (the held-out metrics, run every
`train.eval_every` steps, as before evaluators existed).

An evaluator is a function `evaluate(context, **options) -> dict`: numbers go to TensorBoard as
`eval/<name>/<key>` and to summary.json, everything else (paths, lists, per-category tables)
to summary.json only. It writes any files under `context.output_dir(name)`.

Built in: `bpd`, `mcq_tsv`, `geneval_export`, `dpg_export`, `skip_analysis`. Other packages
register more through the `starflow2.evaluators` entry-point group (this repository's demos
register their Fashion-MNIST judges there), so the library never imports them.

This package sits below `training/`: the trainer builds the `EvalContext` and hands it the
functions that need the trainer (held-out metrics over a split), so evaluators never import it.
"""

import dataclasses
import functools
import importlib
import importlib.metadata
import logging
import numbers
import os
import tempfile
import zlib
from typing import Any, Callable

import jax

ENTRY_POINT_GROUP = "starflow2.evaluators"
DEFAULT_EVALS = {"bpd": {}}

# name -> "module:function", imported on first use (a broken optional evaluator cannot break
# the others, and `starflow2 eval --help` stays fast).
BUILT_IN = {
    "bpd": "starflow2_jax.evaluation.bpd:evaluate",
    "mcq_tsv": "starflow2_jax.evaluation.mcq_tsv:evaluate",
    "geneval_export": "starflow2_jax.evaluation.exports:geneval_export",
    "dpg_export": "starflow2_jax.evaluation.exports:dpg_export",
    "skip_analysis": "starflow2_jax.evaluation.skip_analysis:evaluate",
}


@dataclasses.dataclass
class EvalContext:
  """What an evaluator may use: the config, the task and its parameters at `step`, where to
  write, and `held_out_metrics` (the task's eval metrics averaged over a records split, on
  the config's mesh; provided by the caller so this package never imports the trainer)."""

  config: Any
  task: Any
  params: Any
  step: int
  workdir: str
  data_dir: str
  held_out_metrics: Callable[..., dict]   # (split=None, num_examples=None) -> {metric: float}
  name: str = ""                          # the config entry being run (set by `run`)

  def output_dir(self, name=None):
    """`<workdir>/eval/<name>/step_<step>`, created: where an evaluator writes files (default
    name: the config entry's, so two entries of one type never share a directory).

    Every process runs the evaluators (sampling is collective), but only process 0 writes
    into the workdir: the others get a private scratch directory of their own, so that no
    two processes write, or clear, the same files."""
    name = name or self.name
    if jax.process_index() != 0:
      return _scratch_dir(name, self.step)
    path = os.path.join(self.workdir, "eval", name, f"step_{self.step:07d}")
    os.makedirs(path, exist_ok=True)
    return path

  def rng(self, name=None):
    """A key that depends on the seed and the entry's name only: the same draws at every
    step, so figures at two steps compare the models, not the draws."""
    name = name or self.name
    return jax.random.fold_in(jax.random.key(self.config.seed + 5), zlib.crc32(name.encode()))


@functools.lru_cache(maxsize=None)
def _scratch_dir(name, step):
  return tempfile.mkdtemp(prefix=f"starflow2-eval-{name}-{step}-")


def available():
  """{name: loader} of every evaluator: built in and registered through entry points."""
  found = {ep.name: ep.load for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
  found.update({name: (lambda target=target: _load(target)) for name, target in BUILT_IN.items()})
  return found


def _load(target):
  module, _, function = target.partition(":")
  return getattr(importlib.import_module(module), function)


def configured(config):
  """{name: options} from `config.evals` (or DEFAULT_EVALS), each with `type` and `every`."""
  evals = config.get("evals") or DEFAULT_EVALS
  entries = {}
  for name, options in dict(evals).items():
    options = dict(options or {})
    options.setdefault("type", name)
    options.setdefault("every", config.train.get("eval_every", 0) if name == "bpd" else 0)
    entries[name] = options
  return entries


def select(config, names=None):
  """The entries to run: all configured ones, or `names` (a list or a comma-separated
  string); a name not in `config.evals` but registered runs with its defaults."""
  entries = configured(config)
  if not names:
    return entries
  if isinstance(names, str):
    names = [n.strip() for n in names.split(",") if n.strip()]
  registered = available()
  chosen = {}
  for name in names:
    if name in entries:
      chosen[name] = entries[name]
    elif name in registered:
      chosen[name] = {"type": name, "every": 0}
    else:
      raise ValueError(f"unknown evaluator {name!r}: config.evals names {sorted(entries)}, "
                       f"registered evaluators are {sorted(registered)}")
  return chosen


def due(entries, step, final):
  """The entries to run at `step`: all of them after the last step, else those whose
  `every` divides the step."""
  return {name: e for name, e in entries.items()
          if final or (e["every"] and step % e["every"] == 0)}


def run(entries, context, writer=None):
  """Runs each entry on `context`; returns {name: result}. Numbers go to `writer`
  (a MetricWriter) as `eval/<name>/<key>`."""
  registered = available()
  results = {}
  for name, entry in entries.items():
    options = {k: v for k, v in entry.items() if k not in ("type", "every")}
    kind = entry["type"]
    if kind not in registered:
      raise ValueError(f"config.evals.{name}: unknown evaluator type {kind!r} (registered: "
                       f"{sorted(registered)})")
    logging.info("step %d: evaluator %s (%s)", context.step, name, kind)
    entry_context = dataclasses.replace(context, name=name)
    result = dict(registered[kind]()(entry_context, **_plain(options)))
    if writer is not None:
      writer.scalars(context.step, scalars(result), prefix=f"eval/{name}/")
    logging.info("step %d %s: %s", context.step, name, scalars(result))
    results[name] = result
  return results


def scalars(result):
  """The numbers of a result (what goes to TensorBoard)."""
  return {k: float(v) for k, v in result.items()
          if isinstance(v, numbers.Real) and not isinstance(v, bool)}


def _plain(options):
  """ConfigDict values as plain Python (lists, dicts), so evaluators see ordinary types."""
  return {k: (v.to_dict() if hasattr(v, "to_dict") else
              list(v) if isinstance(v, tuple) else v) for k, v in options.items()}
