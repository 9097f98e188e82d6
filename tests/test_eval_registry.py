"""Evaluators named in the config (`starflow2_jax/evaluation/evaluators.py`): which run when,
with which options; the trainer runs them every `every` steps and after the last, their
numbers in TensorBoard and everything in summary.json; `starflow2 eval --evals` runs them on
a workdir's checkpoint."""

import glob
import json
import os

import ml_collections
import pytest

import fake_data as testing
from demos import fashion_mnist
from experiments import fashion_mnist as fashion_mnist_experiment
from starflow2_jax import cli
from starflow2_jax.evaluation import evaluators
from starflow2_jax.training import trainer

CALLS = []


def probe(context, scale=1.0):
  """A test evaluator: notes its call, scales the held-out bits/dim, names its directory."""
  CALLS.append((context.name, context.step, scale))
  return {"scaled_bpd": scale * context.held_out_metrics()["pixel_bpd"],
          "where": context.output_dir()}


@pytest.fixture(autouse=True)
def _probe_registered(monkeypatch):
  monkeypatch.setitem(evaluators.BUILT_IN, "probe", f"{__name__}:probe")
  CALLS.clear()


def _config(**evals):
  c = ml_collections.ConfigDict({"train": {"eval_every": 5}, "seed": 0})
  if evals:
    c.evals = evals
  return c


def test_a_config_without_evals_runs_held_out_metrics_every_eval_every_steps():
  assert evaluators.configured(_config()) == {"bpd": {"type": "bpd", "every": 5}}


def test_entries_name_their_type_and_options_and_default_to_the_end():
  entries = evaluators.configured(_config(bpd={}, mmbench={"type": "mcq_tsv", "tsv": "x"}))
  assert entries["mmbench"] == {"type": "mcq_tsv", "tsv": "x", "every": 0}
  assert set(evaluators.due(entries, 5, final=False)) == {"bpd"}
  assert set(evaluators.due(entries, 7, final=False)) == set()
  assert set(evaluators.due(entries, 7, final=True)) == {"bpd", "mmbench"}


def test_select_takes_config_entries_or_registered_names_and_names_unknown_ones():
  config = _config(mine={"type": "probe", "scale": 3.0})
  assert evaluators.select(config, "mine")["mine"]["scale"] == 3.0
  assert evaluators.select(config, ["probe"]) == {"probe": {"type": "probe", "every": 0}}
  with pytest.raises(ValueError, match="unknown evaluator 'nope'.*registered evaluators"):
    evaluators.select(config, "mine,nope")


def test_only_numbers_are_scalars():
  assert evaluators.scalars({"a": 1, "b": 2.5, "c": "x", "d": True, "e": [1]}) == {
      "a": 1.0, "b": 2.5}


def _run_config(records_dir, **evals):
  c = fashion_mnist_experiment.get_config("tiny")
  c.data.dir = records_dir
  c.latent.patch_size = 7
  c.eval.update(batch_size=8, num_examples=8)
  c.train.update(steps=4, batch_size=8, log_every=1, eval_every=0, checkpoint_every=100,
                 time_limit_minutes=0.0, final_samples=False)
  c.evals = evals
  return c


def _events(workdir):
  paths = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  return b"".join(open(p, "rb").read() for p in paths)


def test_the_trainer_and_the_eval_command_run_evaluators(tmp_path):
  records_dir = str(tmp_path / "records")
  testing.write_fake_fashion_mnist(str(tmp_path / "idx"), num_train=32, num_test=16)
  fashion_mnist.write_fashion_mnist(str(tmp_path / "idx"), records_dir)
  workdir = str(tmp_path / "run")
  config = _run_config(records_dir, bpd={"every": 2},
                       twice={"type": "probe", "scale": 2.0, "every": 2}, end={"type": "probe"})
  summary = trainer.train(config, workdir).summary

  assert sorted(CALLS, key=lambda c: (c[1], c[0])) == [
      ("twice", 2, 2.0), ("end", 4, 1.0), ("twice", 4, 2.0)]
  evals = summary["evals"]
  # The same held-out batches and parameters give the same metric: only float32 rounding of
  # the product by 2 (exact) separates them.
  assert evals["twice"]["scaled_bpd"] == pytest.approx(2 * evals["bpd"]["pixel_bpd"], rel=1e-6)
  assert evals["end"]["where"] == os.path.join(workdir, "eval", "end", "step_0000004")
  assert summary["test_bpd"] == evals["bpd"]["pixel_bpd"]
  content = _events(workdir)
  for tag in (b"eval/bpd/pixel_bpd", b"eval/twice/scaled_bpd", b"eval/end/scaled_bpd"):
    assert tag in content, tag
  assert b"eval/end/where" not in content

  CALLS.clear()
  assert cli.run(["starflow2", "eval", "--workdir", workdir, "--evals", "end,bpd"]) == 0
  assert CALLS == [("end", 4, 1.0)]
  with open(os.path.join(workdir, "summary.json")) as f:
    written = json.load(f)
  assert written["evals_step"] == 4
  assert written["evals"]["end"]["scaled_bpd"] == pytest.approx(evals["end"]["scaled_bpd"],
                                                                rel=1e-6)
  assert written["step"] == 4                       # the training summary is kept
  with pytest.raises(ValueError, match="unknown evaluator 'nope'"):
    cli.run(["starflow2", "eval", "--workdir", workdir, "--evals", "nope"])
