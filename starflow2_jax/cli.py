"""The `starflow2` command line: `starflow2 <command> [--flags]`, one flag set per command.

Every command declares its own absl flags (`--snake_case`); `starflow2 <command> --help` lists
only those. Configs are ml_collections files, `--config experiments/x.py[:preset]`, and any
field can be overridden: `--config.train.steps=100`. Commands from other installed packages
(this repository's demos) plug in through the `starflow2.commands` entry-point group, so the
library never imports them. docs/cli.md is generated from these definitions
(`python -m starflow2_jax.cli --markdown`).
"""

import dataclasses
import importlib.metadata
import json
import logging
import os
import sys
from typing import Callable

from absl import flags
from ml_collections import config_flags

ENTRY_POINT_GROUP = "starflow2.commands"
# The embedded default config, found beside the package (read by config loading, not imported).
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "experiments", "fashion_mnist.py")
_ABSL_BUILTIN = ("flagfile", "undefok")


class UsageError(ValueError):
  """A command line that cannot run; printed with the command's usage."""


@dataclasses.dataclass(frozen=True)
class Command:
  """One `starflow2` command.

  define(flag_values, argv) declares the command's flags (argv lets `--config.*` overrides
  be declared); run(flag_values) does the work.
  """
  summary: str
  usage: str
  define: Callable[[flags.FlagValues, list], None]
  run: Callable[[flags.FlagValues], None]


# ---- flags several commands share ----------------------------------------------------------

def define_config(fv, argv, default=DEFAULT_CONFIG, help_string=None):
  """--config (an experiments/*.py file, optionally ':preset') with --config.* overrides."""
  config_flags.DEFINE_config_file(
      "config", default, help_string or "An experiment config file (experiments/*.py), "
      "optionally ':preset'; override any field with --config.<section>.<field>=<value>.",
      flag_values=fv, sys_argv=argv)


def define_workdir(fv, default=None, help_string="Where checkpoints, logs and samples go."):
  flags.DEFINE_string("workdir", default, help_string, flag_values=fv)


def require(fv, *names):
  """The values of flags that must be given; a UsageError naming the missing ones."""
  missing = [f"--{n}" for n in names if fv[n].value in (None, "", [])]
  if missing:
    raise UsageError(f"missing {', '.join(missing)}")
  return [fv[n].value for n in names]


def config_or_saved(fv, workdir):
  """--config when given, else the config saved in a training workdir."""
  if fv["config"].present:
    return fv.config
  from starflow2_jax.training import trainer
  return trainer.load_config(workdir)


# ---- the library's commands ---------------------------------------------------------------

def _define_train(fv, argv):
  define_config(fv, argv)
  define_workdir(fv)


def _train(fv):
  from starflow2_jax.training import trainer
  (workdir,) = require(fv, "workdir")
  print(json.dumps(trainer.train(fv.config, workdir).summary, indent=2))


def _define_eval(fv, argv):
  define_config(fv, argv, None, "The config (default: the one saved in --workdir).")
  define_workdir(fv, help_string="A training workdir.")


def _eval(fv):
  from starflow2_jax.evaluation import workdir as workdir_lib
  (workdir,) = require(fv, "workdir")
  print(json.dumps(workdir_lib.evaluate_workdir(config_or_saved(fv, workdir), workdir),
                   indent=2))


def _define_sample(fv, argv):
  define_config(fv, argv, None, "The config (default: the one saved in --workdir).")
  define_workdir(fv, help_string="A training workdir.")
  flags.DEFINE_multi_string("caption", None, "Caption-to-image workdirs: a caption "
                            "(repeatable; default: the config's sample.captions).", flag_values=fv)
  flags.DEFINE_integer("num_per_caption", 4, "Caption-to-image workdirs: images per caption.",
                       flag_values=fv)
  flags.DEFINE_multi_string("prompt", None, "STARFlow2 workdirs: a prompt (repeatable) of "
                            "text, <image:PATH> input images and a final <draw>.", flag_values=fv)
  flags.DEFINE_float("guidance_weight", None, "Classifier-free guidance weight (default: the "
                     "config's; 0 = none).", flag_values=fv)
  flags.DEFINE_integer("max_new", None, "STARFlow2 workdirs: positions to generate at most "
                       "(default: the config's sample.max_new).", flag_values=fv)
  flags.DEFINE_string("out", None, "The PNG grid (caption-to-image) or the HTML page's "
                      "directory (STARFlow2); default: inside --workdir.", flag_values=fv)


def _sample(fv):
  from starflow2_jax.evaluation import workdir as workdir_lib
  (workdir,) = require(fv, "workdir")
  config = config_or_saved(fv, workdir)
  if config.task == "pretzel":
    (prompts,) = require(fv, "prompt")
    results, page = workdir_lib.sample_prompts_workdir(config, workdir, prompts, fv.out,
                                                       fv.guidance_weight, fv.max_new)
    for result in results:
      print(f"{result.text!r} + {len(result.images)} image(s)")
    print(f"wrote {page}")
    return
  path = workdir_lib.sample_workdir(config, workdir, fv.caption or None, fv.num_per_caption,
                                    fv.guidance_weight, fv.out)
  print(f"wrote {path}")


def _define_prepare_data(fv, argv):
  from data_pipelines import sources
  flags.DEFINE_enum("source", None, sorted(sources.available()), "What to convert.",
                    flag_values=fv)
  flags.DEFINE_string("out", None, "The records directory to write.", flag_values=fv)
  flags.DEFINE_string("source_dir", None, "The source's input directory (the Fashion-MNIST "
                      "idx files, the image folder).", flag_values=fv)
  flags.DEFINE_string("captions_jsonl", None, "image_folder: a JSONL of {file, caption}.",
                      flag_values=fv)
  flags.DEFINE_string("split", "train", "image_folder: the split to write.", flag_values=fv)


def _prepare_data(fv):
  from data_pipelines import sources
  source, out = require(fv, "source", "out")
  options = sources.SourceOptions(fv.source_dir, fv.captions_jsonl, fv.split)
  for split, summary in sources.prepare(source, out, options).items():
    print(f"{split}: {summary.written} written, {summary.skipped} skipped -> {out}")


def _define_convert_qwen(fv, argv):
  flags.DEFINE_string("hf_dir", None, "The Hugging Face Qwen2.5-VL checkpoint directory.",
                      flag_values=fv)
  flags.DEFINE_string("out", None, "The Orbax copy to write.", flag_values=fv)
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Parameter dtype.",
                    flag_values=fv)


def _convert_qwen(fv):
  import jax.numpy as jnp
  from starflow2_jax.convert import qwen
  hf_dir, out = require(fv, "hf_dir", "out")
  params = qwen.load_hf_checkpoint(hf_dir, dtype=jnp.dtype(fv.dtype))
  print(f"wrote {qwen.save_converted(params, hf_dir, out)}")


def _define_generate(fv, argv):
  flags.DEFINE_string("vlm", None, "A converted or Hugging Face Qwen2.5-VL directory.",
                      flag_values=fv)
  flags.DEFINE_string("message", None, "The user's message.", flag_values=fv)
  flags.DEFINE_multi_string("image", [], "An image file (repeatable).", flag_values=fv)
  flags.DEFINE_integer("max_new_tokens", 128, "Answer length limit.", flag_values=fv)
  flags.DEFINE_boolean("greedy", False, "Argmax decoding (else sampling).", flag_values=fv)
  flags.DEFINE_float("temperature", 0.7, "Sampling temperature.", flag_values=fv)
  flags.DEFINE_float("top_p", 0.9, "Nucleus sampling mass.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fv)
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Parameter dtype.",
                    flag_values=fv)
  flags.DEFINE_boolean("json", False, "Print JSON with the token ids.", flag_values=fv)


def _generate(fv):
  import jax.numpy as jnp
  from starflow2_jax.sampling import vlm_chat
  vlm, message = require(fv, "vlm", "message")
  answer = vlm_chat.answer(vlm, message, fv.image, max_new_tokens=fv.max_new_tokens,
                           greedy=fv.greedy, temperature=fv.temperature, top_p=fv.top_p,
                           seed=fv.seed, dtype=jnp.dtype(fv.dtype))
  if fv.json:
    print(json.dumps(dict(text=answer.text, token_ids=answer.token_ids,
                          prompt_tokens=answer.prompt_tokens)))
  else:
    print(answer.text)


LIBRARY_COMMANDS = {
    "train": Command(
        "train --config in --workdir (resumes from the latest checkpoint)",
        "starflow2 train --config experiments/fashion_mnist.py --workdir runs/fm "
        "[--config.train.steps=N]", _define_train, _train),
    "eval": Command(
        "held-out metrics (bits/dim) of a trained workdir at its latest checkpoint",
        "starflow2 eval --workdir runs/fm", _define_eval, _eval),
    "sample": Command(
        "images for captions, or continuations of interleaved prompts, from a trained workdir",
        "starflow2 sample --workdir runs/fm --caption 'a photo of a bag'\n"
        "starflow2 sample --workdir runs/demo/stage3 --prompt 'a photo of a sneaker <draw>' "
        "--prompt '<image:shoe.png> what is in this picture?'", _define_sample, _sample),
    "prepare-data": Command(
        "write ArrayRecord records from a source (the only writer of records)",
        "starflow2 prepare-data --source fashion_mnist --out data/fm\n"
        "starflow2 prepare-data --source image_folder --source_dir images/ "
        "--captions_jsonl captions.jsonl --split train --out data/mine",
        _define_prepare_data, _prepare_data),
    "convert-qwen": Command(
        "a Hugging Face Qwen2.5-VL checkpoint -> an Orbax copy",
        "starflow2 convert-qwen --hf_dir ckpt/qwen25vl-7b --out ckpt/qwen25vl-7b-flax",
        _define_convert_qwen, _convert_qwen),
    "generate": Command(
        "answer a message (and images) with a Qwen2.5-VL directory",
        "starflow2 generate --vlm ckpt/qwen25vl-7b-flax --message 'What is this?' "
        "--image photo.jpg", _define_generate, _generate),
}


def commands():
  """{name: Command}: the library's, then those registered by installed packages."""
  found = dict(LIBRARY_COMMANDS)
  for entry in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP),
                      key=lambda e: e.name):
    found.setdefault(entry.name, entry)        # loaded only when run or listed in detail
  return found


def _load(command):
  return command.load() if isinstance(command, importlib.metadata.EntryPoint) else command


# ---- help and docs ---------------------------------------------------------------------------

def own_flags(fv):
  """The command's own flags (not absl's built-ins, not --config.* overrides), in order."""
  return [fv[name] for name in fv.flag_values_dict()
          if name not in _ABSL_BUILTIN and not name.startswith("config.")]


def _describe(flag):
  default = flag.default_as_str if flag.default is not None else None
  if flag.name == "config" and default:      # the embedded default, relative to the repository
    root = os.path.dirname(os.path.dirname(DEFAULT_CONFIG))
    default = repr(os.path.relpath(flag.default_as_str.strip("'"), root))
  meaning = " ".join(flag.help.split()).replace(".;", ";")
  return meaning + (f" (default: {default})" if default else "")


def command_help(name, command):
  fv = flags.FlagValues()
  command.define(fv, [])
  lines = [f"starflow2 {name}: {command.summary}", "", "usage:"]
  lines += [f"  {line}" for line in command.usage.splitlines()]
  lines += ["", "flags:"]
  lines += [f"  --{flag.name}: {_describe(flag)}" for flag in own_flags(fv)]
  return "\n".join(lines)


def overview():
  lines = ["usage: starflow2 <command> [--flags]; starflow2 <command> --help lists its flags", "",
           "commands:"]
  for name, command in commands().items():
    lines.append(f"  {name:13} {_load(command).summary}")
  return "\n".join(lines)


def markdown():
  """docs/cli.md's reference part: every command's usage and flags."""
  parts = ["## Reference (generated by `python -m starflow2_jax.cli --markdown`)", ""]
  for name, command in commands().items():
    command = _load(command)
    fv = flags.FlagValues()
    command.define(fv, [])
    parts += [f"### `starflow2 {name}`", command.summary[0].upper() + command.summary[1:] + ".",
              "", *[f"    {line}" for line in command.usage.splitlines()], "",
              "| flag | meaning |", "|---|---|"]
    parts += [f"| `--{f.name}` | {_describe(f).replace('|', '/')} |" for f in own_flags(fv)]
    parts.append("")
  return "\n".join(parts)


# ---- entry point ----------------------------------------------------------------------------

def _quiet_logs():
  logging.getLogger().setLevel(logging.INFO)
  for noisy in ("absl", "orbax", "jax._src.xla_bridge"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def run(argv):
  """Runs `argv` = [program, command, flags…]; returns the exit status."""
  table = commands()
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(overview())
    return 0 if len(argv) >= 2 else 2
  if argv[1] == "--markdown":
    print(markdown())
    return 0
  name = argv[1]
  if name not in table:
    print(f"unknown command {name!r}\n\n{overview()}", file=sys.stderr)
    return 2
  command = _load(table[name])
  if any(a in ("-h", "--help", "--helpfull") for a in argv[2:]):
    print(command_help(name, command))
    return 0
  fv = flags.FlagValues()
  command.define(fv, argv[1:])
  try:
    rest = fv([f"starflow2 {name}"] + argv[2:])
    if len(rest) > 1:
      raise UsageError(f"unexpected arguments {rest[1:]}")
  except (flags.Error, UsageError) as e:
    print(f"starflow2 {name}: {e}\n\n{command_help(name, command)}", file=sys.stderr)
    return 2
  if not flags.FLAGS.is_parsed():     # libraries that read absl's global flags
    flags.FLAGS(["starflow2"], known_only=True)
  _quiet_logs()
  try:
    command.run(fv)
  except UsageError as e:
    print(f"starflow2 {name}: {e}\n\n{command_help(name, command)}", file=sys.stderr)
    return 2
  return 0


def main():
  sys.exit(run(sys.argv))


if __name__ == "__main__":
  main()
