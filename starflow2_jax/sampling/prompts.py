"""Prompts in, interleaved results out: the user-facing side of the Pretzel sampler.

A prompt is a list of segments: strings (text), uint8 [H, W, C] arrays (input images, as for
understanding or editing) and, last, optionally `DRAW` (open an image span: the sampler draws
an image at once). `generate` lays prompts out like training sequences, runs the one sampler
(`sampling/interleaved.py`), turns the generated u back into pixels and returns each row as
segments again: generated text as strings, generated images as uint8 arrays.

The noise level of a sequence follows one rule (`noise_level_for`): prompts that only ask
about input images (understanding) run at `noise.t_min`, where the input images are clearest;
anything that may draw runs at the generation level `sample.noise_level` (default t_max).
`draw_captions` and `answer` are the two everyday uses (the trainer's grids, the demos).
"""

import dataclasses
import html
import os
import re
import weakref

import jax
import jax.numpy as jnp
import numpy as np

from PIL import Image

from data_pipelines import examples
from starflow2_jax import image_io
from starflow2_jax.flows import noise
from starflow2_jax.sampling import interleaved as sampler

DRAW = "<draw>"
_MARKER = re.compile(r"<image:([^>]+)>|<draw>")


def load_image(path, image_shape):
  """A uint8 [H, W, C] image from a file, converted and resized to `image_shape`."""
  h, w, c = image_shape
  try:
    image = Image.open(path)
    image.load()
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read image {path!r}: {e}") from e
  image = image.convert("L" if c == 1 else "RGB").resize((w, h), Image.BICUBIC)
  return np.asarray(image, np.uint8).reshape(h, w, c)


def parse_prompt(text, image_shape):
  """'a sneaker: <image:shoe.png> and a bag: <draw>' -> ["a sneaker:", image, "and a bag:",
  DRAW]: text, `<image:PATH>` for an input image, `<draw>` (last) to draw an image at once."""
  segments, start = [], 0
  for match in _MARKER.finditer(text):
    if text[start:match.start()].strip():
      segments.append(text[start:match.start()].strip())
    segments.append(load_image(match.group(1), image_shape) if match.group(1) else DRAW)
    start = match.end()
  if text[start:].strip():
    segments.append(text[start:].strip())
  if not segments:
    raise ValueError("empty prompt")
  return segments


def generation_noise_level(config):
  """t of sequences that may draw: `sample.noise_level`, by default the largest training t."""
  return config.sample.get("noise_level", config.noise.t_max)


def is_understanding(prompt):
  """Whether a prompt only asks about its input images: it has one and does not end in DRAW."""
  draws = isinstance(prompt[-1], str) and prompt[-1] == DRAW
  return not draws and any(not isinstance(segment, str) for segment in prompt)


def noise_level_for(config, prompts, generation_level=None):
  """The one rule for a batch's noise level: `noise.t_min` when every prompt is an
  understanding prompt (its input images are read at their clearest), else the generation
  level (`generation_noise_level`, or `generation_level` when given)."""
  if all(is_understanding(p) for p in prompts):
    return config.noise.t_min
  return generation_noise_level(config) if generation_level is None else generation_level


def sampler_spec(task, **overrides):
  """The task's `SamplerSpec` from `config.sample`, with keyword overrides."""
  lay, s = task.layout, task.config.sample
  fields = dict(
      grid=tuple(lay.grid), vision_start_id=lay.vision_start_id, vision_end_id=lay.vision_end_id,
      image_pad_id=lay.image_pad_id, pad_id=lay.pad_id,
      stop_ids=tuple(task.tokenizer.ids(" ".join(s.stop_words))) if s.get("stop_words") else (),
      max_new=s.max_new, noise_level=generation_noise_level(task.config),
      text_temperature=s.text_temperature, image_temperature=s.temperature,
      guidance_weight=s.guidance_weight, num_token_ids=task.tokenizer.vocab_size)
  fields.update(overrides)
  return sampler.SamplerSpec(**fields)


def prompt_arrays(task, prompts, rng, noise_level):
  """(batch arrays trimmed to the longest prompt, prompt image latents x at `noise_level`)."""
  lay = task.layout
  rows = []
  for i, prompt in enumerate(prompts):
    builder = examples.SequenceBuilder(lay)
    for k, segment in enumerate(prompt):
      if isinstance(segment, str) and segment == DRAW:
        if k != len(prompt) - 1:
          raise ValueError(f"prompt {i}: DRAW must be the last segment")
        builder.begin_image()
      elif isinstance(segment, str):
        builder.add_text(task.tokenizer.ids(segment), target=False)
      else:
        image = np.asarray(segment)
        if image.shape != tuple(lay.image_shape) or image.dtype != np.uint8:
          raise ValueError(f"prompt {i}, segment {k}: image {image.shape} {image.dtype}, "
                           f"expected uint8 {tuple(lay.image_shape)}")
        builder.add_image(image, target=False)
    if len(builder.ids) > lay.max_length or len(builder.images) > lay.max_images:
      raise ValueError(f"prompt {i} has {len(builder.ids)} positions and {len(builder.images)} "
                       f"images; the layout allows {lay.max_length} and {lay.max_images}")
    rows.append(builder.arrays())
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  length = max(int(batch["valid"].sum(axis=1).max()), 1)
  for key in ("ids", "valid", "is_visual", "text_target", "prompt_text"):
    batch[key] = batch[key][:, :length]
  batch["positions"] = batch["positions"][:, :, :length]
  x = task.encode_images(jnp.asarray(batch.pop("images")))
  b, m = x.shape[:2]
  t_b = jnp.full((b,), noise_level, jnp.float32)
  x = noise.add_noise(rng, x.reshape(b, -1, x.shape[-1]), t_b).reshape(x.shape)
  return {k: jnp.asarray(v) for k, v in batch.items()}, x


@dataclasses.dataclass
class Result:
  """One row: the prompt's and the generated segments (str or uint8 image), in order."""
  prompt: list
  generated: list

  @property
  def text(self):
    return " ".join(s for s in self.generated if isinstance(s, str))

  @property
  def images(self):
    return [s for s in self.generated if not isinstance(s, str)]


def _segments(task, ids, is_visual, keep, images):
  """Generated positions -> [str | image] segments (visual runs become the next image)."""
  out, text_ids, images = [], [], list(images)
  skip = {task.layout.vision_start_id, task.layout.vision_end_id, task.layout.pad_id}
  for i in np.flatnonzero(keep):
    if is_visual[i]:
      if text_ids:
        out.append(task.tokenizer.decode(text_ids))
        text_ids = []
      if not is_visual[i - 1] or not keep[i - 1]:
        out.append(images.pop(0) if images else None)
    elif ids[i] not in skip:
      text_ids.append(int(ids[i]))
  if text_ids:
    out.append(task.tokenizer.decode(text_ids))
  return [s for s in out if s is not None]


class Generator:
  """Compiled sampling for one task: `generate(params, prompts, rng) -> [Result]`.

  One compilation per noise level the batches need (`noise_level_for`)."""

  def __init__(self, task, **spec_overrides):
    self.task = task
    self.spec = sampler_spec(task, **spec_overrides)
    self._compiled = {}

  def spec_for(self, prompts):
    """The spec of a batch: this generator's, at the batch's noise level."""
    level = noise_level_for(self.task.config, prompts, self.spec.noise_level)
    return dataclasses.replace(self.spec, noise_level=level)

  def _functions(self, spec):
    if spec not in self._compiled:
      model = self.task.model
      images = jax.jit(lambda params, seq, spans, t_min, steps: sampler.images_of(
          model, params, seq, spans, spec, t_min, steps), static_argnums=(4,))
      self._compiled[spec] = (sampler.make_generate(model, spec), images)
    return self._compiled[spec]

  def generate(self, params, prompts, rng, denoise_steps=None):
    task = self.task
    spec = self.spec_for(prompts)
    generate_fn, images_fn = self._functions(spec)
    rng_prompt, rng_sample = jax.random.split(rng)
    batch, x = prompt_arrays(task, prompts, rng_prompt, spec.noise_level)
    seq = generate_fn(params, batch, x, rng_sample)
    spans = sampler.image_spans(seq, spec.num_elements)
    steps = task.config.sample.denoise_steps if denoise_steps is None else denoise_steps
    pixels = np.zeros(spans.valid.shape + tuple(task.layout.image_shape), np.uint8)
    if np.any(spans.valid & spans.generated):
      x_all = images_fn(params, seq, spans, task.config.noise.t_min, steps)
      b, m = x_all.shape[:2]
      decoded = task.latent.decode(x_all.reshape((b * m,) + x_all.shape[2:]))
      pixels = np.asarray(decoded).reshape(pixels.shape)
    ids, is_visual = np.asarray(seq.ids), np.asarray(seq.is_visual)
    generated = np.asarray(seq.generated)
    results = []
    for b, prompt in enumerate(prompts):
      made = [pixels[b, k] for k in range(spans.valid.shape[1])
              if spans.valid[b, k] and spans.generated[b, k]]
      results.append(Result(list(prompt), _segments(task, ids[b], is_visual[b], generated[b],
                                                    made)))
    return results


_GENERATORS = weakref.WeakKeyDictionary()


def generator_for(task, **spec_overrides):
  """A `Generator` for `task`, cached per task and spec overrides (compiling is slow)."""
  cache = _GENERATORS.setdefault(task, {})
  key = tuple(sorted(spec_overrides.items()))
  if key not in cache:
    cache[key] = Generator(task, **spec_overrides)
  return cache[key]


def draw_captions(task, params, captions, rng, guidance_weight=None):
  """uint8 images [B, H, W, C], one drawn for each caption (`caption <draw>`)."""
  gen = generator_for(task, guidance_weight=guidance_weight,
                      max_new=task.layout.num_elements + 1)
  results = gen.generate(params, [[c, DRAW] for c in captions], rng)
  return np.stack([r.images[0] for r in results])


def answer(task, params, images, question, rng):
  """Greedy text answers to `question` about each uint8 image (an understanding batch)."""
  gen = generator_for(task, guidance_weight=None, text_temperature=0.0)
  return [r.text for r in gen.generate(params, [[image, question] for image in images], rng)]


def write_html(results, out_dir, title="STARFlow2 samples"):
  """`out_dir/index.html` with each result's prompt and generation in order; images as PNGs
  next to it. Returns the page's path."""
  os.makedirs(out_dir, exist_ok=True)
  parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif} img{image-rendering:pixelated;width:112px;"
           "vertical-align:middle;margin:2px} .gen{background:#eef6ee} .row{margin:1em 0}"
           "</style>", f"<h1>{html.escape(title)}</h1>"]
  for r, result in enumerate(results):
    parts.append("<div class='row'>")
    for kind, segments in (("prompt", result.prompt), ("gen", result.generated)):
      parts.append(f"<span class='{kind}'>")
      for k, segment in enumerate(segments):
        if isinstance(segment, str):
          parts.append(html.escape("[draw]" if segment == DRAW else segment) + " ")
        else:
          name = f"row{r:03d}_{kind}{k}.png"
          image_io.save_png(np.asarray(segment), os.path.join(out_dir, name))
          parts.append(f"<img src='{name}' alt='{kind} image {k}'>")
      parts.append("</span>")
    parts.append("</div>")
  path = os.path.join(out_dir, "index.html")
  with open(path, "w") as f:
    f.write("\n".join(parts))
  return path
