"""The `starflow2` command line: per-command flags and help, generated docs, plug-in commands
and record sources, and the one writer of records."""

import os
import subprocess
import sys

import pytest

import fake_data
from experiments import fashion_mnist as fashion_mnist_experiment
from starflow2_jax import cli
from starflow2_jax.training import data as data_lib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
import update_cli_docs  # noqa: E402


def _run(capsys, *args):
  status = cli.run(["starflow2", *args])
  out = capsys.readouterr()
  return status, out.out, out.err


def test_help_lists_only_the_commands_own_flags(capsys):
  status, out, _ = _run(capsys, "sample", "--help")
  assert status == 0
  assert "--prompt" in out and "--guidance_weight" in out and "--workdir" in out
  for other in ("--hf_dir", "--source_dir", "--max_new_tokens", "--flagfile"):
    assert other not in out
  status, out, _ = _run(capsys, "generate", "--help")
  assert "--message" in out and "--top_p" in out and "--prompt" not in out


def test_every_flag_is_snake_case():
  for name, command in cli.commands().items():
    command = cli._load(command)
    fv = cli.flags.FlagValues()
    command.define(fv, [])
    for flag in cli.own_flags(fv):
      assert flag.name == flag.name.lower() and "-" not in flag.name, (name, flag.name)


def test_flags_of_another_command_are_refused(capsys):
  status, _, err = _run(capsys, "eval", "--workdir=x", "--hf_dir=y")
  assert status == 2 and "hf_dir" in err and "starflow2 eval" in err


def test_missing_required_flag_is_named(capsys):
  status, _, err = _run(capsys, "prepare-data", "--source=image_folder")
  assert status == 2 and "--out" in err


def test_cli_docs_are_generated_from_the_commands():
  with open(update_cli_docs.PATH) as f:
    text = f.read()
  assert text == update_cli_docs.updated(text), (
      "docs/cli.md is stale: run .venv/bin/python scripts/update_cli_docs.py")


def test_demo_commands_plug_in_through_entry_points():
  """The installed console script lists and explains the demos' commands."""
  script = os.path.join(os.path.dirname(sys.executable), "starflow2")
  result = subprocess.run([script, "demo", "--help"], capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "--workdir" in result.stdout and "--source_dir" in result.stdout
  assert "caption-demo" in cli.overview()


def test_prepare_data_writes_what_training_reads(tmp_path, capsys):
  config = fashion_mnist_experiment.get_config("tiny")
  config.data.dir = str(tmp_path / "records")
  with pytest.raises(FileNotFoundError) as info:   # training never writes records ...
    data_lib.records_dir(config, str(tmp_path))
  message = str(info.value)
  assert "starflow2 prepare-data --source=fashion_mnist" in message
  assert f"--out={config.data.dir}" in message
  assert not os.path.exists(config.data.dir)
  fake_data.write_fake_fashion_mnist(tmp_path / "idx", num_train=6, num_test=4)
  status, out, _ = _run(capsys, "prepare-data", "--source=fashion_mnist",   # ... this does
                        f"--source_dir={tmp_path / 'idx'}", f"--out={config.data.dir}")
  assert status == 0 and "train: 6 written" in out and "test: 4 written" in out
  assert data_lib.records_dir(config, str(tmp_path)) == config.data.dir
