"""Text-to-image benchmarks scored by their own tools: `geneval_export` and `dpg_export` draw
each benchmark prompt's images with the model (the sampler, at the configured guidance) and
write them exactly where and how the benchmark's official scorer reads them
(docs/evaluators.md has the scoring commands).

- GenEval (github djghosh13/geneval): its `prompts/evaluation_metadata.jsonl` in;
  `<out>/<i:05d>/metadata.jsonl` (the prompt's line) and `<out>/<i:05d>/samples/<k:05d>.png`
  out, as its `generation/diffusers_generate.py` writes them and `evaluation/evaluate_images.py`
  reads them (i counts the file's prompts from 0).
- DPG-Bench (github TencentQQGYLab/ELLA, `dpg_bench/`): its folder of `<name>.txt` prompts in;
  `<out>/<name>.png` out, the prompt's images in a gapless grid two cells wide (2×2 for 4),
  image k at the cell `compute_dpg_bench.py` crops k-th for `--resolution` = the image side.

Images are written as RGB (a greyscale layout's repeated over three channels): the scorers'
detector and VQA model read colour images. A prompt the layout cannot hold is an error named
before anything is drawn: a benchmark scored on a subset of its prompts is not its score.
"""

import json
import os
import shutil

import jax
import numpy as np

from starflow2_jax import image_io
from starflow2_jax.sampling import prompts

MAX_DPG_IMAGES = 4     # compute_dpg_bench.py crops at most four cells


# ---- reading the prompts --------------------------------------------------------------------

def _require(path, what, isdir=False):
  if not (os.path.isdir(path) if isdir else os.path.isfile(path)):
    raise FileNotFoundError(f"{what}: no {'folder' if isdir else 'file'} at {path!r}")


def read_geneval_metadata(path, limit=None):
  """[(line, prompt)] of GenEval's metadata JSONL, blank lines skipped, the first `limit`."""
  _require(path, "geneval_export metadata")
  entries = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      try:
        prompt = json.loads(line)["prompt"]
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"geneval_export: {path}:{number} is not a JSON object with a "
                         f"'prompt' ({type(e).__name__}: {e})") from e
      entries.append((line, prompt))
  return entries[:limit] if limit else entries


def read_dpg_prompts(folder, limit=None):
  """[(name, prompt)] of the `<name>.txt` files of DPG-Bench's prompt folder, by name."""
  _require(folder, "dpg_export prompt_dir", isdir=True)
  names = sorted(f[:-len(".txt")] for f in os.listdir(folder) if f.endswith(".txt"))
  if not names:
    raise ValueError(f"dpg_export: no <name>.txt prompt files in {folder!r}")
  dotted = [n for n in names if "." in n]
  if dotted:     # the scorer keys an image by its file name up to the first "."
    raise ValueError(f"dpg_export: prompt names with a '.' cannot be scored: {dotted[:5]}")
  names = names[:limit] if limit else names
  entries = []
  for name in names:
    with open(os.path.join(folder, name + ".txt"), encoding="utf-8") as f:
      entries.append((name, f.read().strip()))
  return entries


# ---- drawing --------------------------------------------------------------------------------

def check_fits(task, captions, labels, source):
  """Raises, naming the prompt, when a caption and the `<|vision_start|>` that opens its
  image do not fit the layout's `max_length`."""
  for caption, label in zip(captions, labels):
    positions = len(task.tokenizer.ids(caption)) + 1
    if positions > task.layout.max_length:
      raise ValueError(f"{source}: prompt {label} ({caption[:60]!r}) takes {positions} "
                       f"positions; the layout holds {task.layout.max_length} "
                       "(config.data.max_length)")


def drawn_per_prompt(context, captions, num_images, guidance_weight, batch_size, rng):
  """Yields each caption's images, uint8 [num_images, H, W, C], from the sampler
  (`prompts.draw_captions`) at `guidance_weight` (None: the config's
  `sample.guidance_weight`; 0: unguided). A call draws whole prompts, about `batch_size`
  images; they are yielded as they come, so a benchmark never sits in memory at once."""
  if guidance_weight is None:
    guidance_weight = context.config.sample.get("guidance_weight")
  per_call = max(1, batch_size // num_images)
  for start in range(0, len(captions), per_call):
    group = captions[start:start + per_call]
    images = prompts.draw_captions(context.task, context.params,
                                   [c for c in group for _ in range(num_images)],
                                   jax.random.fold_in(rng, start), guidance_weight or None)
    yield from images.reshape((len(group), num_images) + images.shape[1:])


def rgb(image_hwc):
  """A uint8 [H, W, 1 or 3] image as [H, W, 3]."""
  return np.repeat(image_hwc, 3, axis=-1) if image_hwc.shape[-1] == 1 else image_hwc


def dpg_grid(images_nhwc):
  """DPG-Bench's grid of n ≤ 4 images: two cells wide, no gaps, image k at row k // 2 and
  column k % 2 (a missing fourth cell is black)."""
  n = len(images_nhwc)
  if not 1 <= n <= MAX_DPG_IMAGES:
    raise ValueError(f"dpg_export: num_images must be 1 to {MAX_DPG_IMAGES}, not {n}")
  cols, rows = min(n, 2), -(-n // 2)
  cells = np.zeros((rows * cols,) + images_nhwc.shape[1:], np.uint8)
  cells[:n] = images_nhwc
  return image_io.image_grid(cells.reshape((rows, cols) + images_nhwc.shape[1:]), pad=0)


def _clear(out, is_ours):
  """Removes a previous run's entries from `out`, so the scorer reads only this run's."""
  for entry in os.listdir(out):
    path = os.path.join(out, entry)
    if is_ours(entry) and os.path.isdir(path):
      shutil.rmtree(path)
    elif is_ours(entry):
      os.remove(path)


# ---- the evaluators -------------------------------------------------------------------------

def geneval_export(context, metadata, num_images=4, guidance_weight=None, limit=None,
                   batch_size=16):
  """Draws `num_images` images for each of the first `limit` prompts (default all) of GenEval's
  `metadata` file; writes GenEval's folder layout under `context.output_dir()`."""
  if num_images < 1:
    raise ValueError(f"geneval_export: num_images must be at least 1, not {num_images}")
  entries = read_geneval_metadata(metadata, limit)
  captions = [prompt for _, prompt in entries]
  check_fits(context.task, captions, [f"{i:05d}" for i in range(len(entries))],
             "geneval_export")
  images = drawn_per_prompt(context, captions, num_images, guidance_weight, batch_size,
                            context.rng())
  out = context.output_dir()
  _clear(out, str.isdigit)
  for index, ((line, _), drawn) in enumerate(zip(entries, images)):
    folder = os.path.join(out, f"{index:05d}")
    os.makedirs(os.path.join(folder, "samples"))
    with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as f:
      f.write(line + "\n")
    for k, image in enumerate(drawn):
      image_io.save_png(rgb(image), os.path.join(folder, "samples", f"{k:05d}.png"))
  return dict(num_prompts=len(entries), num_images=len(entries) * num_images,
              images_per_prompt=num_images, path=out)


def dpg_export(context, prompt_dir, num_images=4, guidance_weight=None, limit=None,
               batch_size=16):
  """Draws `num_images` (at most 4) images for each of the first `limit` prompts (default
  all) of DPG-Bench's `prompt_dir`; writes one grid `<name>.png` per prompt under
  `context.output_dir()`."""
  if not 1 <= num_images <= MAX_DPG_IMAGES:
    raise ValueError(f"dpg_export: num_images must be 1 to {MAX_DPG_IMAGES}, not {num_images}")
  entries = read_dpg_prompts(prompt_dir, limit)
  captions = [prompt for _, prompt in entries]
  check_fits(context.task, captions, [f"{n}.txt" for n, _ in entries], "dpg_export")
  images = drawn_per_prompt(context, captions, num_images, guidance_weight, batch_size,
                            context.rng())
  out = context.output_dir()
  _clear(out, lambda entry: entry.endswith(".png"))
  for (prompt_name, _), drawn in zip(entries, images):
    image_io.save_png(rgb(dpg_grid(drawn)), os.path.join(out, f"{prompt_name}.png"))
  return dict(num_prompts=len(entries), num_images=len(entries) * num_images,
              images_per_prompt=num_images, resolution=context.task.layout.image_shape[0],
              path=out)
