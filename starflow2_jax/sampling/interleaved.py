"""One sampler for text, images and interleaved sequences over the Pretzel's two streams (SPEC §6).

`generate` prefills a prompt into one `PretzelCache`, then runs a single jitted
`lax.while_loop`, one sequence position per step, appending to both streams' caches:

* text mode: the next token comes from the LM head's logits (greedy, or at a temperature);
* emitting `<|vision_start|>` switches a row to Next-Gaussian-Prediction for the N elements of
  an image span: u_j = μ'_j + τ·s'_j ⊙ ε, with (μ', s') the classifier-free-guided Gaussian
  when a guidance weight is given (the unconditional rows are the same sequences with their
  prompt text hidden, batched in the same call); then `<|vision_end|>` is forced and text
  decoding resumes. A generated image enters the context as its u — nothing is re-encoded.

Rows decode in lock step (one cache slot per step for the whole batch); each row keeps its own
M-RoPE position, so right-padded prompts of different lengths batch together. A prompt that
ends with `<|vision_start|>` starts drawing at once (text-to-image, editing).

`image_spans` and `denoised_images` turn the generated u back into images: the shallow
inverses (x = f_s⁻¹(u), KV-cached), then iterative Tweedie denoising with the guided score of
the whole sequence.
"""

import dataclasses
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from starflow2_jax.flows import affine
from starflow2_jax.flows import denoise
from starflow2_jax.flows import guidance as guidance_lib
from starflow2_jax.flows import stack
from starflow2_jax.models import pretzel


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """What a sampling call does (static: one compilation per spec).

  Attributes:
    grid: (gh, gw) latent grid of an image; N = gh·gw visual steps per span.
    vision_start_id, vision_end_id, image_pad_id, pad_id: the layout's special ids.
    stop_ids: tokens that end a row's generation (they are kept in the output).
    max_new: positions to generate at most (the loop also stops when every row is done).
    noise_level: t of the whole sequence (generated images come out at this level).
    text_temperature: 0 = greedy.
    image_temperature: τ, the scale of the Gaussian draws.
    guidance_weight: None = plain conditional sampling; w = classifier-free guidance.
    num_token_ids: ids the tokenizer can decode (the LM head may be padded wider, e.g. to
      a multiple of 8); ids from here up are never drawn. None: every id of the head.
  """
  grid: tuple
  vision_start_id: int
  vision_end_id: int
  image_pad_id: int
  pad_id: int
  stop_ids: tuple
  max_new: int
  noise_level: float
  text_temperature: float = 0.0
  image_temperature: float = 1.0
  guidance_weight: float | None = None
  num_token_ids: int | None = None

  @property
  def num_elements(self):
    return self.grid[0] * self.grid[1]


class Sequence(NamedTuple):
  """A prompt plus what was generated, [B, T] (positions [B, 3, T]), as the model reads it.

  u_btd holds every visual element's u (the prompt's images, encoded, and the generated
  ones); `generated` marks the positions the sampler wrote; `last_logits_bv` are the logits
  after the final position (what the next token would be drawn from).
  """
  ids: jnp.ndarray
  valid: jnp.ndarray
  positions: jnp.ndarray
  is_visual: jnp.ndarray
  prompt_text: jnp.ndarray
  u_btd: jnp.ndarray
  generated: jnp.ndarray
  last_logits_bv: jnp.ndarray


@flax.struct.dataclass
class _Cursor:
  """Per-row decoding state."""
  next_position: jnp.ndarray   # [B] the M-RoPE position of the next text token
  origin: jnp.ndarray          # [B] first position of the current image span
  visual_left: jnp.ndarray     # [B] elements of the current image still to draw
  end_pending: jnp.ndarray     # [B] the image is complete: `<|vision_end|>` comes next
  done: jnp.ndarray            # [B] a stop token was emitted


def _after_text_token(spec, cursor, token_b, generated=True):
  """Advances the cursor past a text token that was just placed at `next_position`; a
  generated stop token ends its row (a prompt's own last token never does)."""
  starts_image = token_b == spec.vision_start_id
  origin = jnp.where(starts_image, cursor.next_position + 1, cursor.origin)
  # The span's elements sit at origin + (0, row, col); the text after it at origin + max(gh, gw).
  next_position = jnp.where(starts_image, origin + max(spec.grid), cursor.next_position + 1)
  stops = jnp.isin(token_b, jnp.asarray(spec.stop_ids, jnp.int32)) & generated
  return cursor.replace(next_position=next_position, origin=origin,
                        visual_left=jnp.where(starts_image, spec.num_elements, 0),
                        end_pending=jnp.zeros_like(cursor.end_pending),
                        done=cursor.done | stops)


def _rows(x, spec):
  """Duplicates per-example arrays for the unconditional rows of classifier-free guidance."""
  return x if spec.guidance_weight is None else jnp.concatenate([x, x], axis=0)


def _position_rows(positions_3bt, spec):
  return positions_3bt if spec.guidance_weight is None else jnp.concatenate(
      [positions_3bt, positions_3bt], axis=1)


def _draw_element(spec, rng, mean_rd, log_s_rd):
  """u [B, D] from the (guided) Gaussian predicted at the last position."""
  batch = mean_rd.shape[0] if spec.guidance_weight is None else mean_rd.shape[0] // 2
  z = spec.image_temperature * jax.random.normal(rng, (batch, mean_rd.shape[-1]), jnp.float32)
  if spec.guidance_weight is None:
    return affine.from_noise(z, mean_rd, log_s_rd)
  mean_c, mean_u = jnp.split(mean_rd, 2)
  log_s_c, log_s_u = jnp.split(log_s_rd, 2)
  mean, log_s = guidance_lib.guided_gaussian(mean_c, log_s_c, mean_u, log_s_u,
                                             spec.guidance_weight)
  return affine.from_noise(z, mean, log_s)


def _draw_token(spec, rng, logits_bv):
  if spec.num_token_ids is not None and spec.num_token_ids < logits_bv.shape[-1]:
    decodable_v = jnp.arange(logits_bv.shape[-1]) < spec.num_token_ids
    logits_bv = jnp.where(decodable_v, logits_bv, -jnp.inf)
  if spec.text_temperature == 0:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, logits_bv / spec.text_temperature).astype(jnp.int32)


def _last_valid(x_bt, valid_bt):
  """x at each row's last valid position: [B, …]."""
  last_b = jnp.maximum(jnp.sum(valid_bt, axis=1) - 1, 0)
  return jnp.take_along_axis(x_bt, last_b.reshape((-1,) + (1,) * (x_bt.ndim - 1)), axis=1)[:, 0]


def generate(model, params, prompt, x_bmnd, rng, spec):
  """Continues each prompt by up to `spec.max_new` positions; returns a `Sequence`.

  Args:
    model: a `models.pretzel.Pretzel`.
    prompt: batch arrays as `training.interleaved` lays them out (ids, valid, positions
      [B, 3, T], is_visual, prompt_text, image_positions [B, M, N], image_valid [B, M]).
    x_bmnd: the prompt images' latents (at the sequence's noise level), [B, M, N, D].
  Jit it with `model` and `spec` closed over (see `make_generate`).
  """
  apply = lambda method, *args: model.apply({"params": params}, *args, method=method)
  ids, valid = prompt["ids"], prompt["valid"]
  batch, length = ids.shape
  positions_3bt = jnp.moveaxis(prompt["positions"], 1, 0)
  t_b = jnp.full((batch,), spec.noise_level, jnp.float32)

  # ---- Prefill: the prompt (and, for guidance, its prompt-text-free twin) into one cache.
  u_bmnd, _ = apply("encode_images", x_bmnd, t_b)
  u_btd = pretzel.place_elements(u_bmnd, prompt["image_positions"], prompt["image_valid"], length)
  rows_valid = valid if spec.guidance_weight is None else jnp.concatenate(
      [valid, valid & ~prompt["prompt_text"]])
  cache = pretzel.empty_cache(model.config, rows_valid.shape[0], length + spec.max_new)
  streams = apply("streams", _rows(ids, spec), _rows(u_btd, spec), _rows(prompt["is_visual"], spec),
                  _position_rows(positions_3bt, spec),
                  rows_valid, _rows(t_b, spec), cache)
  # The conditional rows' last real position gives every row's first prediction.
  pick = lambda x: _last_valid(x, _rows(valid, spec))
  logits_bv = pick(apply("text_logits", streams.h_vlm_btc, streams.g_btw))[:batch]
  mean_rd, log_s_rd = map(pick, apply("gaussians", streams.g_btw))

  last_token = _last_valid(ids, valid)
  last_position = _last_valid(jnp.moveaxis(prompt["positions"], 1, 2), valid)[:, 0]
  zeros_b = jnp.zeros((batch,), jnp.int32)
  cursor = _after_text_token(spec, _Cursor(last_position, zeros_b, zeros_b,
                                           jnp.zeros((batch,), bool), jnp.zeros((batch,), bool)),
                             last_token, generated=False)

  out = dict(ids=jnp.full((batch, spec.max_new), spec.pad_id, jnp.int32),
             valid=jnp.zeros((batch, spec.max_new), bool),
             positions=jnp.zeros((batch, 3, spec.max_new), jnp.int32),
             is_visual=jnp.zeros((batch, spec.max_new), bool),
             u=jnp.zeros((batch, spec.max_new, u_btd.shape[-1]), jnp.float32))

  # ---- One position per step, both streams, one cache.
  def step(carry):
    i, cursor, cache, logits_bv, mean_rd, log_s_rd, out = carry
    rng_token, rng_element = jax.random.split(jax.random.fold_in(rng, i))
    drawing = (cursor.visual_left > 0) & ~cursor.done
    token_b = jnp.where(cursor.end_pending, spec.vision_end_id,
                        _draw_token(spec, rng_token, logits_bv))
    token_b = jnp.where(drawing, spec.image_pad_id, jnp.where(cursor.done, spec.pad_id, token_b))
    u_bd = jnp.where(drawing[:, None], _draw_element(spec, rng_element, mean_rd, log_s_rd), 0.0)
    k = spec.num_elements - cursor.visual_left
    gw = spec.grid[1]
    visual_position = jnp.stack([cursor.origin, cursor.origin + k // gw, cursor.origin + k % gw])
    position_3b = jnp.where(drawing[None], visual_position, cursor.next_position[None])
    live_b = ~cursor.done

    s = apply("streams", _rows(token_b[:, None], spec), _rows(u_bd[:, None], spec),
              _rows(drawing[:, None], spec), _position_rows(position_3b[:, :, None], spec),
              _rows(live_b[:, None], spec), _rows(t_b, spec), cache)
    logits_bv = apply("text_logits", s.h_vlm_btc, s.g_btw)[:batch, -1]
    mean_rd, log_s_rd = (x[:, -1] for x in apply("gaussians", s.g_btw))

    out = dict(ids=out["ids"].at[:, i].set(token_b), valid=out["valid"].at[:, i].set(live_b),
               positions=out["positions"].at[:, :, i].set(position_3b.T),
               is_visual=out["is_visual"].at[:, i].set(drawing),
               u=out["u"].at[:, i].set(u_bd))
    text_cursor = _after_text_token(spec, cursor, token_b)
    visual_left = cursor.visual_left - 1
    drawn_cursor = cursor.replace(visual_left=visual_left, end_pending=visual_left == 0)
    cursor = jax.tree.map(lambda a, b: jnp.where(drawing, a, b), drawn_cursor, text_cursor)
    cursor = cursor.replace(done=cursor.done | ~live_b)
    return i + 1, cursor, s.cache, logits_bv, mean_rd, log_s_rd, out

  def keep_going(carry):
    i, cursor = carry[:2]
    return (i < spec.max_new) & ~jnp.all(cursor.done)

  init = (jnp.zeros((), jnp.int32), cursor, streams.cache, logits_bv, mean_rd, log_s_rd, out)
  _, _, _, logits_bv, _, _, out = jax.lax.while_loop(keep_going, step, init)

  cat = lambda a, b: jnp.concatenate([a, b], axis=-1)
  return Sequence(
      ids=cat(ids, out["ids"]), valid=cat(valid, out["valid"]),
      positions=cat(prompt["positions"], out["positions"]),
      is_visual=cat(prompt["is_visual"], out["is_visual"]),
      prompt_text=cat(prompt["prompt_text"], jnp.zeros_like(out["valid"])),
      u_btd=jnp.concatenate([u_btd, out["u"]], axis=1),
      generated=cat(jnp.zeros_like(valid), out["valid"]),
      last_logits_bv=logits_bv)


def make_generate(model, spec):
  """`generate` compiled for one model and spec: (params, prompt, x_bmnd, rng) -> Sequence."""
  return jax.jit(lambda params, prompt, x_bmnd, rng: generate(model, params, prompt, x_bmnd,
                                                                rng, spec))


# ---- From generated u back to images ------------------------------------------------------

class ImageSpans(NamedTuple):
  """The complete image spans of a sequence (numpy): positions [B, M, N] of their elements,
  which slots are real [B, M], which were generated [B, M]."""
  positions: np.ndarray
  valid: np.ndarray
  generated: np.ndarray


def image_spans(sequence, num_elements):
  """Finds every complete image span (N consecutive visual positions) in each row; a span cut
  short by the `max_new` budget is left out."""
  is_visual = np.asarray(sequence.is_visual) & np.asarray(sequence.valid)
  generated = np.asarray(sequence.generated)
  found = []
  for row in is_visual:
    starts = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(np.int8)])) == 1)
    found.append([s for s in starts if row[s:s + num_elements].sum() == num_elements
                  and (s + num_elements == row.size or not row[s + num_elements])])
  m = max([len(f) for f in found] + [1])
  positions = np.zeros((len(found), m, num_elements), np.int32)
  valid = np.zeros((len(found), m), bool)
  made = np.zeros((len(found), m), bool)
  for b, starts in enumerate(found):
    for k, s in enumerate(starts):
      positions[b, k] = np.arange(s, s + num_elements)
      valid[b, k] = True
      made[b, k] = generated[b, s]
  return ImageSpans(positions, valid, made)


def sequence_log_prob(model, params, sequence, spans, guidance_weight=None):
  """(x [B, M, N, D], t [B]) -> Σ over generated images of log p(x | its context), guided
  as (1+w)·log p(x | prompt) − w·log p(x | prompt text hidden) when w is given."""
  positions_3bt = jnp.moveaxis(sequence.positions, 1, 0)
  target_bm = jnp.asarray(spans.valid & spans.generated)

  def log_prob(valid_bt):
    def fn(x_bmnd, t_b):
      out = model.apply({"params": params}, sequence.ids, x_bmnd, spans.positions, spans.valid,
                        sequence.is_visual, positions_3bt, valid_bt, t_b, with_logits=False)
      n, d = x_bmnd.shape[2:]
      return -n * d * jnp.sum(jnp.where(target_bm, out.images.nll_per_dim(), 0.0), axis=1)
    return fn

  conditional = log_prob(sequence.valid)
  if guidance_weight is None:
    return conditional
  unconditional = log_prob(sequence.valid & ~sequence.prompt_text)
  return lambda x, t: ((1 + guidance_weight) * conditional(x, t)
                       - guidance_weight * unconditional(x, t))


def images_of(model, params, sequence, spans, spec, t_min, denoise_steps=0):
  """x [B, M, N, D] of every image span: shallow inverses of the generated u at the sequence's
  noise level, then (denoise_steps >= 0) Tweedie denoising down to t_min with the guided
  score of the whole sequence. Prompt images come back as their own (noisy) latents."""
  u_bmnd = pretzel.elements_at(sequence.u_btd, jnp.asarray(spans.positions))
  b, m, n, d = u_bmnd.shape
  t_b = jnp.full((b,), spec.noise_level, jnp.float32)
  x = stack.invert_shallow(model.config.flow, params, u_bmnd.reshape(b * m, n, d),
                           jnp.repeat(t_b, m), model.dtype).reshape(b, m, n, d)
  if denoise_steps < 0:
    return x
  generated = jnp.asarray(spans.valid & spans.generated)[:, :, None, None]
  fixed = jax.lax.stop_gradient(x)
  log_prob = sequence_log_prob(model, params, sequence, spans, spec.guidance_weight)
  only_generated = lambda x_new, t: log_prob(jnp.where(generated, x_new, fixed), t)
  x_new = denoise.tweedie_denoise(only_generated, x,
                                  denoise.noise_ladder(spec.noise_level, t_min, denoise_steps))
  return jnp.where(generated, x_new, x)
