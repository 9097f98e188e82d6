"""The `starflow2` command line: `starflow2 <command> [flags]`.

Commands:
  demo          the embedded default: STARFlow2's stages 0-3 on Fashion-MNIST, judged
  caption-demo  the caption-to-image flow alone on Fashion-MNIST (10 minutes), judged
  train         train `--config` in `--workdir` (resumes from the latest checkpoint)
  eval          held-out bits/dim of a trained workdir
  sample        images for `--caption`s, or continuations of `--prompt`s (text, images,
                interleaved) from a trained workdir
  prepare-data  write ArrayRecord files (Fashion-MNIST, or a folder of images + JSONL)
  convert-qwen  a Hugging Face Qwen2.5-VL checkpoint -> an Orbax copy (`--hf-dir`, `--out`)
  generate      answer `--prompt` (and `--image`s) with a Qwen2.5-VL directory (`--vlm`)

Configs are ml_collections files: `--config experiments/fashion_mnist.py[:preset]`, and any
field can be overridden: `--config.train.steps=100`. `eval` and `sample` default to the
config saved in the workdir. See docs/cli.md (and docs/qwen.md for the VLM commands).
"""

import json
import logging
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import fashion_mnist as default_experiment

_DEFAULT_CONFIG = default_experiment.__file__

_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "An experiment config file (experiments/*.py), optionally ':preset'.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and samples go.")
_CAPTIONS = flags.DEFINE_multi_string("caption", None, "sample: a caption (repeatable).")
_OUT = flags.DEFINE_string("out", None, "sample / prepare-data: output file or directory.")
_GUIDANCE = flags.DEFINE_float("guidance_weight", None,
                               "sample: classifier-free guidance weight (default: config's).")
_NUM = flags.DEFINE_integer("num_per_caption", 4, "sample: images per caption.")
_SOURCE = flags.DEFINE_enum("source", "fashion_mnist", ["fashion_mnist", "image_folder"],
                            "prepare-data: what to convert.")
_SOURCE_DIR = flags.DEFINE_string("source_dir", None,
                                  "prepare-data: Fashion-MNIST idx dir or the image folder.")
_CAPTIONS_JSONL = flags.DEFINE_string("captions_jsonl", None,
                                      "prepare-data image_folder: JSONL of {file, caption}.")
_SPLIT = flags.DEFINE_string("split", "train", "prepare-data image_folder: split name.")
_HF_DIR = flags.DEFINE_string("hf-dir", None, "convert-qwen: the Hugging Face checkpoint dir.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"],
                           "convert-qwen / generate: parameter dtype.")
_VLM = flags.DEFINE_string("vlm", None, "generate: a converted or Hugging Face Qwen2.5-VL dir.")
_PROMPT = flags.DEFINE_multi_string(
    "prompt", None, "generate: the user's message. sample (STARFlow2 workdirs): a prompt "
    "(repeatable) of text, <image:PATH> and a final <draw>.")
_MAX_NEW_POSITIONS = flags.DEFINE_integer("max_new", None,
                                          "sample: positions to generate (default: config's).")
_IMAGES = flags.DEFINE_multi_string("image", [], "generate: an image file (repeatable).")
_MAX_NEW = flags.DEFINE_integer("max-new-tokens", 128, "generate: answer length limit.")
_GREEDY = flags.DEFINE_boolean("greedy", False, "generate: argmax decoding (else sampling).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.7, "generate: sampling temperature.")
_TOP_P = flags.DEFINE_float("top-p", 0.9, "generate: nucleus sampling mass.")
_SEED = flags.DEFINE_integer("seed", 0, "generate: sampling seed.")
_JSON = flags.DEFINE_boolean("json", False, "generate: print JSON with the token ids.")


def _config(fallback_workdir=None):
  """--config (default: the embedded default, with any --config.* overrides), except that
  commands reading a workdir use the config saved there unless --config is given."""
  if fallback_workdir is not None and not flags.FLAGS["config"].present:
    from starflow2_jax.training import trainer
    return trainer.load_config(fallback_workdir)
  return _CONFIG.value


def _require_workdir():
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  return _WORKDIR.value


def cmd_train(argv):
  from starflow2_jax.training import trainer
  summary = trainer.train(_config(), _require_workdir()).summary
  print(json.dumps(summary, indent=2))


def cmd_demo(argv):
  from starflow2_jax import pipeline_demo
  workdir = _WORKDIR.value or "runs/demo"
  summary = pipeline_demo.run(workdir)
  print(pipeline_demo.format_summary(summary))
  print(f"samples, TensorBoard logs and summary.json are in {workdir}/")


def cmd_caption_demo(argv):
  from starflow2_jax import demo
  workdir = _WORKDIR.value or "runs/caption_demo"
  summary = demo.run(_config(), workdir)
  print(demo.format_summary(summary))
  print(f"samples, TensorBoard logs and summary.json are in {workdir}/")


def cmd_eval(argv):
  from starflow2_jax.training import evaluation
  workdir = _require_workdir()
  print(json.dumps(evaluation.evaluate_workdir(_config(workdir), workdir), indent=2))


def cmd_sample(argv):
  from starflow2_jax.training import evaluation
  workdir = _require_workdir()
  config = _config(workdir)
  if config.task == "pretzel":
    if not _PROMPT.value:
      raise app.UsageError("sample with a STARFlow2 workdir needs --prompt (repeatable)")
    results, page = evaluation.sample_prompts_workdir(config, workdir, _PROMPT.value, _OUT.value,
                                                      _GUIDANCE.value, _MAX_NEW_POSITIONS.value)
    for result in results:
      print(f"{result.text!r} + {len(result.images)} image(s)")
    print(f"wrote {page}")
    return
  captions = _CAPTIONS.value or None
  path = evaluation.sample_workdir(config, workdir, captions, _NUM.value,
                                   _GUIDANCE.value, _OUT.value)
  print(f"wrote {path}")


def cmd_prepare_data(argv):
  out = _OUT.value
  if not out:
    raise app.UsageError("--out (the records directory) is required")
  if _SOURCE.value == "fashion_mnist":
    from data_pipelines import fashion_mnist
    summaries = fashion_mnist.write_fashion_mnist(
        _SOURCE_DIR.value or fashion_mnist.DEFAULT_SOURCE_DIR, out)
  else:
    from data_pipelines import image_folder
    if not (_SOURCE_DIR.value and _CAPTIONS_JSONL.value):
      raise app.UsageError("image_folder needs --source_dir and --captions_jsonl")
    summaries = {_SPLIT.value: image_folder.write_image_folder(
        _SOURCE_DIR.value, _CAPTIONS_JSONL.value, out, _SPLIT.value)}
  for split, summary in summaries.items():
    print(f"{split}: {summary.written} written, {summary.skipped} skipped -> {out}")


def cmd_convert_qwen(argv):
  import jax.numpy as jnp
  from starflow2_jax.convert import qwen
  if not (_HF_DIR.value and _OUT.value):
    raise app.UsageError("convert-qwen needs --hf-dir and --out")
  params = qwen.load_hf_checkpoint(_HF_DIR.value, dtype=jnp.dtype(_DTYPE.value))
  print(f"wrote {qwen.save_converted(params, _HF_DIR.value, _OUT.value)}")


def cmd_generate(argv):
  import jax.numpy as jnp
  from starflow2_jax.sampling import vlm_chat
  if not (_VLM.value and _PROMPT.value):
    raise app.UsageError("generate needs --vlm and --prompt")
  answer = vlm_chat.answer(
      _VLM.value, _PROMPT.value[0], _IMAGES.value, max_new_tokens=_MAX_NEW.value,
      greedy=_GREEDY.value, temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
      seed=_SEED.value, dtype=jnp.dtype(_DTYPE.value))
  if _JSON.value:
    print(json.dumps(dict(text=answer.text, token_ids=answer.token_ids,
                          prompt_tokens=answer.prompt_tokens)))
  else:
    print(answer.text)


COMMANDS = {
    "demo": cmd_demo,
    "caption-demo": cmd_caption_demo,
    "train": cmd_train,
    "eval": cmd_eval,
    "sample": cmd_sample,
    "prepare-data": cmd_prepare_data,
    "convert-qwen": cmd_convert_qwen,
    "generate": cmd_generate,
}


def _quiet_logs():
  logging.getLogger().setLevel(logging.INFO)
  for noisy in ("absl", "orbax", "jax._src.xla_bridge"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def main():
  if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
    print(__doc__, file=sys.stderr)
    sys.exit(2)
  command = sys.argv[1]

  def run(argv):
    _quiet_logs()
    COMMANDS[command](argv)

  app.run(run, argv=[f"starflow2 {command}"] + sys.argv[2:])


if __name__ == "__main__":
  main()
