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
  be declared); run(flag_values) does the work. A command with `positional=True` takes
  positional arguments too: run(flag_values, args).
  """
  summary: str
  usage: str
  define: Callable[[flags.FlagValues, list], None]
  run: Callable[[flags.FlagValues], None]
  positional: bool = False


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


def define_distributed(fv):
  """--coordinator_address, --num_processes, --process_id: this process's place in a
  multi-process run (docs/launch.md)."""
  flags.DEFINE_string("coordinator_address", None, "Several processes: HOST:PORT of process 0 "
                      "(the same on every process), or 'auto' to let JAX read the cluster "
                      "(Cloud TPU, SLURM, Open MPI). Default: config.distributed, else a SLURM "
                      "or Open MPI job with several tasks or a multi-host TPU slice found in "
                      "the environment, else one process.", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "Several processes: how many, with "
                       "--coordinator_address.", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("process_id", None, "Several processes: this one's index in "
                       "[0, --num_processes), with --coordinator_address.", lower_bound=0,
                       flag_values=fv)


def join_run(fv, config):
  """Initializes `jax.distributed` from the flags, `config.distributed` or the environment
  (nothing for a process alone); call before anything touches a device."""
  from starflow2_jax.training import distributed
  try:
    distributed.initialize(distributed.settings(
        config, coordinator_address=fv.coordinator_address, num_processes=fv.num_processes,
        process_id=fv.process_id))
  except ValueError as e:
    raise UsageError(str(e)) from None


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
  define_distributed(fv)


def _train(fv):
  (workdir,) = require(fv, "workdir")
  join_run(fv, fv.config)
  from starflow2_jax.training import trainer
  print(json.dumps(trainer.train(fv.config, workdir).summary, indent=2))


def _define_eval(fv, argv):
  define_config(fv, argv, None, "The config (default: the one saved in --workdir).")
  define_workdir(fv, help_string="A training workdir.")
  flags.DEFINE_list("evals", None, "Evaluators to run, by name: entries of config.evals or "
                    "registered evaluators (bpd, mcq_tsv, geneval_export, dpg_export, "
                    "skip_analysis, …); default: every entry of config.evals.", flag_values=fv)
  flags.DEFINE_integer("step", None, "The checkpoint step (default: the latest).",
                       flag_values=fv)
  define_distributed(fv)


def _eval(fv):
  (workdir,) = require(fv, "workdir")
  config = config_or_saved(fv, workdir)
  join_run(fv, config)
  from starflow2_jax.training import workdir as workdir_lib
  results = workdir_lib.evaluate_workdir(config, workdir, fv.evals, fv.step)
  print(json.dumps(results, indent=2, default=str))


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
  from starflow2_jax.training import workdir as workdir_lib
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
  flags.DEFINE_string("source_dir", None, "The source's input directory (idx files, images, "
                      "tar shards, Parquet files, a prepared TFDS dataset).", flag_values=fv)
  flags.DEFINE_string("annotations", None, "The file describing the input: image_folder's "
                      "caption JSONL, llava's conversation JSON, editing's or interleaved's "
                      "JSONL.", flag_values=fv)
  flags.DEFINE_string("split", "train", "The split to write (for tfds: also the split read).",
                      flag_values=fv)
  flags.DEFINE_integer("image_size", None, "Resize the shorter side to this and centre-crop "
                       "a square (default: keep the images' size).", flag_values=fv)
  flags.DEFINE_integer("workers", 1, "Processes converting input shards at once.",
                       flag_values=fv)
  flags.DEFINE_string("image_key", None, "parquet, tfds: the column/feature holding images.",
                      flag_values=fv)
  flags.DEFINE_string("text_key", None, "parquet, tfds: the column/feature holding captions.",
                      flag_values=fv)


def _prepare_data(fv):
  from data_pipelines import sources
  source, out = require(fv, "source", "out")
  options = sources.SourceOptions(fv.source_dir, fv.annotations, fv.split, fv.image_size,
                                  fv.workers, fv.image_key, fv.text_key)
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


def _define_precompute_latents(fv, argv):
  define_config(fv, argv, None, "A stage config whose `latent` section names the latent "
                "space (e.g. experiments/fashion_mnist_fae.py:stage1 with "
                "--config.latent.fae_workdir=...).")
  flags.DEFINE_string("records", None, "The records directory to read (prepare-data's).",
                      flag_values=fv)
  flags.DEFINE_string("out", None, "The records directory to write (same splits, with "
                      "latents).", flag_values=fv)
  flags.DEFINE_list("splits", None, "The splits to convert.", flag_values=fv)
  flags.DEFINE_boolean("features", False, "Also store each image's DINOv2 features (FAE).",
                       flag_values=fv)
  flags.DEFINE_integer("batch_size", 64, "Images encoded per call.", flag_values=fv)


def _precompute_latents(fv):
  from starflow2_jax.latents import precompute
  from starflow2_jax.training import builders
  config, records, out, splits = require(fv, "config", "records", "out", "splits")
  if fv.features and config.latent.name != "fae":
    raise UsageError("--features needs an FAE latent (config.latent.name='fae')")
  latent = builders.build_latent(config)
  for split in splits:
    summary = precompute.precompute_split(latent, records, out, split, fv.batch_size,
                                          fv.features)
    print(f"{split}: {summary.written} records with latents -> {out}")
  print("train on them with --config.data.dir=" + out + " --config.data.precomputed_latents=True")


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


def _define_convert_dinov2(fv, argv):
  flags.DEFINE_string("hf_dir", None, "The Hugging Face DINOv2 checkpoint directory "
                      "(Dinov2Model or Dinov2WithRegistersModel).", flag_values=fv)
  flags.DEFINE_string("out", None, "The Orbax copy to write.", flag_values=fv)
  flags.DEFINE_integer("image_size", 224, "The input resolution in pixels: the position table "
                       "is resampled to it now, with the reference's bicubic recipe; the copy "
                       "runs at exactly this size.", flag_values=fv)


def _convert_dinov2(fv):
  from starflow2_jax.convert import dinov2
  hf_dir, out = require(fv, "hf_dir", "out")
  print(f"wrote {dinov2.convert(hf_dir, out, fv.image_size)}")


def _define_features(fv, argv):
  flags.DEFINE_string("dinov2", None, "A converted DINOv2 directory (convert-dinov2).",
                      flag_values=fv)
  flags.DEFINE_integer("image_size", None, "N, the converted copy's resolution (must match it); "
                       "images not already N×N are resized to N×N with PIL's bicubic filter "
                       "(antialiased when shrinking; aspect ratio not kept, no crop).",
                       flag_values=fv)
  flags.DEFINE_string("out", None, "The .npy to write: float32 [images, patches, width].",
                      flag_values=fv)
  flags.DEFINE_integer("batch_size", 8, "Images per forward pass.", flag_values=fv)


def _features(fv, images):
  from starflow2_jax.convert import dinov2
  from starflow2_jax.models.dinov2 import features
  directory, size, out = require(fv, "dinov2", "image_size", "out")
  if not images:
    raise UsageError("no images: pass image files after the flags")
  config, params, mean, std = dinov2.load_converted(directory)
  if size != config.image_size:
    raise UsageError(f"--image_size {size} does not match {directory}'s position table, "
                     f"converted for {config.image_size} px; convert again with "
                     f"--image_size {size}")
  shape = features.write_features(config, params, mean, std, images, out, fv.batch_size)
  print(f"wrote {out}: {shape}")


def _define_plan(fv, argv):
  from starflow2_jax.training import plan
  define_config(fv, argv, None, "The stage's config (experiments/*.py[:preset]), with "
                "--config.* overrides.")
  flags.DEFINE_integer("devices", None, "How many devices to plan for (simulated on the CPU).",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_string("mesh", None, "The mesh, axis=size over data, fsdp, tensor (e.g. "
                      "data=2,fsdp=4; axes left out are 1); must multiply to --devices "
                      "(default: config.mesh.shape).", flag_values=fv)
  flags.DEFINE_enum("chip", "h100", sorted(plan.CHIPS), "The chip whose dense bf16 peak "
                    "gives the step time.", flag_values=fv)
  flags.DEFINE_float("mfu", 0.4, "The model FLOPs utilisation assumed for the step time.",
                     flag_values=fv)
  flags.DEFINE_boolean("json", False, "Print one JSON object instead of the table.",
                       flag_values=fv)


def _plan(fv):
  from starflow2_jax.training import plan
  config, devices = require(fv, "config", "devices")
  try:
    mesh = plan.mesh_sizes(plan.parse_mesh(fv.mesh) if fv.mesh else config.mesh.shape, devices)
  except ValueError as e:
    raise UsageError(str(e)) from None
  if not 0 < fv.mfu <= 1:
    raise UsageError(f"--mfu {fv.mfu} is not in (0, 1]")
  report = plan.plan_in_subprocess(config, devices, mesh, fv.chip, fv.mfu)
  print(json.dumps(report) if fv.json else plan.table(report))


LIBRARY_COMMANDS = {
    "train": Command(
        "train --config in --workdir (resumes from the latest checkpoint)",
        "starflow2 train --config experiments/fashion_mnist.py --workdir runs/fm "
        "[--config.train.steps=N]", _define_train, _train),
    "plan": Command(
        "a stage's train step compiled ahead of time for N simulated devices: memory per "
        "device, FLOPs per step, sharded share, step time at a stated MFU",
        "starflow2 plan --config experiments/fashion_mnist_stages.py:stage1-tiny --devices 8 "
        "--mesh data=2,fsdp=4 [--json]", _define_plan, _plan),
    "eval": Command(
        "evaluators named in the config or by --evals (bits/dim, benchmark exports, …) on a "
        "trained workdir's checkpoint",
        "starflow2 eval --workdir runs/fm [--evals bpd,skip_analysis]", _define_eval, _eval),
    "sample": Command(
        "images for captions, or continuations of interleaved prompts, from a trained workdir",
        "starflow2 sample --workdir runs/fm --caption 'a photo of a bag'\n"
        "starflow2 sample --workdir runs/demo/stage3 --prompt 'a photo of a sneaker <draw>' "
        "--prompt '<image:shoe.png> what is in this picture?'", _define_sample, _sample),
    "prepare-data": Command(
        "write ArrayRecord records from a source (the only writer of records)",
        "starflow2 prepare-data --source fashion_mnist --out data/fm\n"
        "starflow2 prepare-data --source image_folder --source_dir images/ "
        "--annotations captions.jsonl --split train --out data/mine\n"
        "starflow2 prepare-data --source webdataset --source_dir shards/ --image_size 256 "
        "--split train --out data/cc",
        _define_prepare_data, _prepare_data),
    "convert-qwen": Command(
        "a Hugging Face Qwen2.5-VL checkpoint -> an Orbax copy",
        "starflow2 convert-qwen --hf_dir ckpt/qwen25vl-7b --out ckpt/qwen25vl-7b-flax",
        _define_convert_qwen, _convert_qwen),
    "generate": Command(
        "answer a message (and images) with a Qwen2.5-VL directory",
        "starflow2 generate --vlm ckpt/qwen25vl-7b-flax --message 'What is this?' "
        "--image photo.jpg", _define_generate, _generate),
    "precompute-latents": Command(
        "records with each image's latent (and DINOv2 features) computed once",
        "starflow2 precompute-latents --config experiments/fashion_mnist_fae.py:stage1 "
        "--config.latent.fae_workdir=runs/fae/fae_pixels --records runs/fae/data "
        "--out runs/fae/latents --splits generate_train,generate_test",
        _define_precompute_latents, _precompute_latents),
    "convert-dinov2": Command(
        "a Hugging Face DINOv2 checkpoint -> an Orbax copy for one input resolution",
        "starflow2 convert-dinov2 --hf_dir ckpt/dinov2-base --out ckpt/dinov2-base-224 "
        "--image_size 224", _define_convert_dinov2, _convert_dinov2),
    "features": Command(
        "DINOv2 patch features of image files, one float32 .npy [images, patches, width]",
        "starflow2 features --dinov2 ckpt/dinov2-base-224 --image_size 224 --out feats.npy "
        "a.png b.jpg ...", _define_features, _features, positional=True),
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
    lines.append(f"  {name:18} {_load(command).summary}")
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
    if len(rest) > 1 and not command.positional:
      raise UsageError(f"unexpected arguments {rest[1:]}")
  except (flags.Error, UsageError) as e:
    print(f"starflow2 {name}: {e}\n\n{command_help(name, command)}", file=sys.stderr)
    return 2
  if not flags.FLAGS.is_parsed():     # libraries that read absl's global flags
    flags.FLAGS(["starflow2"], known_only=True)
  _quiet_logs()
  try:
    command.run(fv, rest[1:]) if command.positional else command.run(fv)
  except UsageError as e:
    print(f"starflow2 {name}: {e}\n\n{command_help(name, command)}", file=sys.stderr)
    return 2
  return 0


def main():
  sys.exit(run(sys.argv))


if __name__ == "__main__":
  main()
