"""The one sampler over both streams (sampling/interleaved.py), against brute force.

Every check recomputes what the KV-cached loop produced with fresh full passes over the
finished sequence: nothing the loop cached may differ from re-reading the whole sequence.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import max_abs_diff, random_params
from tolerance import assert_float32_close
from data_pipelines import examples as layout_lib
from data_pipelines import mrope_positions as positions_lib
from starflow2_jax.flows import affine
from starflow2_jax.models import pretzel
from starflow2_jax.sampling import interleaved as sampler
from test_pretzel import (D, GRID, IMAGE_PAD, N, VISION_END, VISION_START, full_args, sequence,
                          tiny_config)

STOP = 47
LAYOUT = layout_lib.SequenceLayout(max_length=16, max_images=1, grid=GRID, image_shape=(1, 1, 1),
                                   vision_start_id=VISION_START, vision_end_id=VISION_END,
                                   image_pad_id=IMAGE_PAD, pad_id=0)
T = 0.1


@pytest.fixture(scope="module")
def model_and_params():
  model = pretzel.Pretzel(tiny_config())
  return model, random_params(model, *full_args(sequence()))


def prompt_batch(rows):
  """Stacks prompts built from [("text", ids) | ("image",) | ("begin_image",)] items."""
  arrays = []
  for items in rows:
    builder = layout_lib.SequenceBuilder(LAYOUT)
    for kind, *value in items:
      if kind == "text":
        builder.add_text(value[0], target=False)
      elif kind == "image":
        builder.add_image(np.zeros((1, 1, 1), np.uint8), target=False)
      else:
        builder.begin_image()
    arrays.append(builder.arrays())
  batch = {k: jnp.asarray(np.stack([a[k] for a in arrays])) for k in arrays[0]}
  x = np.random.default_rng(1).normal(size=batch["image_positions"].shape + (D,))
  return batch, jnp.asarray(x.astype(np.float32))


def spec(**overrides):
  kw = dict(grid=GRID, vision_start_id=VISION_START, vision_end_id=VISION_END,
            image_pad_id=IMAGE_PAD, pad_id=0, stop_ids=(STOP,), max_new=12, noise_level=T,
            image_temperature=0.7)
  kw.update(overrides)
  return sampler.SamplerSpec(**kw)


@functools.lru_cache(maxsize=None)
def compiled(model, s):
  return sampler.make_generate(model, s)


def full_pass(model, params, seq, rows_valid=None):
  """Logits and (μ, log s) at every position of a finished sequence, in one uncached pass."""
  t_b = jnp.full(seq.ids.shape[:1], T)
  valid = seq.valid if rows_valid is None else rows_valid
  streams = model.apply({"params": params}, seq.ids, seq.u_btd, seq.is_visual,
                        jnp.moveaxis(seq.positions, 1, 0), valid, t_b, method="streams")
  logits = model.apply({"params": params}, streams.h_vlm_btc, streams.g_btw, method="text_logits")
  mean, log_s = model.apply({"params": params}, streams.g_btw, method="gaussians")
  return logits, mean, log_s


# Row 0 continues an image-bearing prompt by drawing an image at once (editing); row 1 is a
# shorter text prompt that draws an image, then goes on with text.
ROWS = [[("text", [3, 5]), ("image",), ("text", [7]), ("begin_image",)],
        [("text", [9, 11]), ("begin_image",)]]


def test_cached_loop_equals_full_passes_over_the_finished_sequence(model_and_params):
  model, params = model_and_params
  prompt, x = prompt_batch(ROWS)
  s = spec()
  seq = compiled(model, s)(params, prompt, x, jax.random.key(3))
  logits, mean, log_s = full_pass(model, params, seq)
  start = prompt["ids"].shape[1]
  for b in range(2):
    last_prompt = int(np.sum(prompt["valid"][b])) - 1
    previous = last_prompt                      # where the current position's prediction is read
    for i in range(s.max_new):
      slot = start + i
      if not seq.valid[b, slot]:
        break
      if seq.is_visual[b, slot]:
        # u = μ + τ·s·ε with the loop's own draw of ε: μ, s recomputed by the full pass.
        eps = jax.random.normal(jax.random.split(jax.random.fold_in(jax.random.key(3), i))[1],
                                (2, D))[b]
        want = affine.from_noise(s.image_temperature * eps, mean[b, previous], log_s[b, previous])
        assert max_abs_diff(seq.u_btd[b, slot], want) < 1e-4, (b, i)
      elif seq.ids[b, slot] != VISION_END:
        assert int(seq.ids[b, slot]) == int(jnp.argmax(logits[b, previous])), (b, i)
      previous = slot
  # Both rows drew one complete image right after the prompt.
  assert np.all(seq.is_visual[:, start:start + N]) and np.all(seq.ids[:, start + N] == VISION_END)


def test_positions_follow_qwen_span_rule(model_and_params):
  model, params = model_and_params
  prompt, x = prompt_batch(ROWS)
  seq = compiled(model, spec())(params, prompt, x, jax.random.key(3))
  for b in range(2):
    valid = np.asarray(seq.valid[b])
    ids = np.asarray(seq.ids[b])[valid]
    want, _ = positions_lib.rope_index(ids[None], np.ones((1, ids.size), bool),
                                       np.tile([[1, *GRID]], (int(np.sum(ids == IMAGE_PAD)) // N, 1)),
                                       IMAGE_PAD, spatial_merge_size=1)
    np.testing.assert_array_equal(np.asarray(seq.positions[b])[:, valid], want[:, 0])


def test_logits_after_a_generated_image_equal_a_fresh_full_pass(model_and_params):
  """Draw an image (N steps + `<|vision_end|>`), then compare the logits the loop would draw
  the next token from with a fresh pass that re-reads the whole sequence through x:
  the shallow inverse of the generated u, encoded again."""
  model, params = model_and_params
  prompt, x = prompt_batch(ROWS)
  s = spec(max_new=N + 1)
  seq = compiled(model, s)(params, prompt, x, jax.random.key(5))
  spans = sampler.image_spans(seq, N)
  x_all = sampler.images_of(model, params, seq, spans, s, t_min=T, denoise_steps=-1)
  t_b = jnp.full((2,), T)
  out = model.apply({"params": params}, seq.ids, x_all, spans.positions, spans.valid,
                    seq.is_visual, jnp.moveaxis(seq.positions, 1, 0), seq.valid, t_b)
  valid = np.asarray(seq.valid)
  last = valid.shape[1] - 1 - np.argmax(valid[:, ::-1], axis=1)   # prompts are padded
  fresh = out.logits_btv[np.arange(2), last]
  assert max_abs_diff(seq.last_logits_bv, fresh) < 1e-4
  # Not trivially equal: the image changes the logits.
  other = out.logits_btv[np.arange(2), last - N - 1]
  assert max_abs_diff(fresh, other) > 1e-3


def test_guidance_weight_zero_equals_plain_sampling(model_and_params):
  model, params = model_and_params
  prompt, x = prompt_batch(ROWS)
  prompt = dict(prompt, prompt_text=prompt["prompt_text"])
  plain = compiled(model, spec())(params, prompt, x, jax.random.key(7))
  zero = compiled(model, spec(guidance_weight=0.0))(params, prompt, x, jax.random.key(7))
  guided = compiled(model, spec(guidance_weight=3.0))(params, prompt, x, jax.random.key(7))
  np.testing.assert_array_equal(zero.ids, plain.ids)
  assert max_abs_diff(zero.u_btd, plain.u_btd) < 1e-5
  assert max_abs_diff(guided.u_btd, plain.u_btd) > 1e-3   # guidance does act


def test_guided_elements_use_the_prompt_free_rows(model_and_params):
  """With w > 0 each drawn element combines the conditional Gaussian and the one of the same
  sequence with its prompt text hidden, both recomputed here by full passes."""
  model, params = model_and_params
  prompt, x = prompt_batch(ROWS)
  w = 2.0
  s = spec(guidance_weight=w, max_new=N)
  seq = compiled(model, s)(params, prompt, x, jax.random.key(9))
  _, mean_c, log_s_c = full_pass(model, params, seq)
  _, mean_u, log_s_u = full_pass(model, params, seq, seq.valid & ~seq.prompt_text)
  from starflow2_jax.flows import guidance
  start = prompt["ids"].shape[1]
  last_prompt = np.sum(np.asarray(prompt["valid"]), axis=1) - 1
  for i in range(N):
    read = last_prompt if i == 0 else np.full(2, start + i - 1)
    rows = np.arange(2)
    mean, log_s = guidance.guided_gaussian(mean_c[rows, read], log_s_c[rows, read],
                                           mean_u[rows, read], log_s_u[rows, read], w)
    eps = jax.random.normal(jax.random.split(jax.random.fold_in(jax.random.key(9), i))[1], (2, D))
    want = affine.from_noise(s.image_temperature * eps, mean, log_s)
    assert max_abs_diff(seq.u_btd[:, start + i], want) < 1e-4, i


def test_text_stops_at_a_stop_token(model_and_params):
  model, params = model_and_params
  prompt, x = prompt_batch([[("text", [3, 5])], [("text", [9])]])
  free = compiled(model, spec(max_new=6))(params, prompt, x, jax.random.key(0))
  first = np.asarray(free.ids[:, prompt["ids"].shape[1]])
  # Make row 0's first greedy token a stop token: that row ends after one position.
  s = spec(max_new=6, stop_ids=(int(first[0]),))
  stopped = compiled(model, s)(params, prompt, x, jax.random.key(0))
  generated = np.asarray(stopped.generated)
  assert generated[0].sum() == 1 and generated[1].sum() >= 1


@pytest.mark.parametrize("w", [None, 2.0])
def test_denoiser_log_prob_reads_each_rows_vision_start(model_and_params, w):
  """Prompts of different lengths, right-padded in one batch: the log-likelihood that the
  denoiser differentiates must score each generated element with the Gaussian the loop drew
  it from — the first one with the output at the row's `<|vision_start|>`, not at the padding
  slot before the generated positions. Reference: full passes read where the loop read."""
  model, params = model_and_params
  prompt, x = prompt_batch(ROWS)
  s = spec(max_new=N + 1, guidance_weight=w)
  seq = compiled(model, s)(params, prompt, x, jax.random.key(11))
  spans = sampler.image_spans(seq, N)
  x_all = sampler.images_of(model, params, seq, spans, s, t_min=T, denoise_steps=-1)
  t_b = jnp.full((2,), T)
  got = sampler.sequence_log_prob(model, params, seq, spans, w)(x_all, t_b)

  _, log_det_shallow = model.apply({"params": params}, x_all, t_b, method="encode_images")
  start = prompt["ids"].shape[1]
  slots = start + np.arange(N)
  reads = np.stack([np.concatenate([[int(np.sum(prompt["valid"][b])) - 1], slots[:-1]])
                    for b in range(2)])
  assert not np.any(prompt["valid"][:, -1])     # both rows have padding before the image

  def log_prob(rows_valid):
    _, mean, log_s = full_pass(model, params, seq, rows_valid)
    rows = np.arange(2)[:, None]
    z = affine.to_noise(seq.u_btd[rows, slots], mean[rows, reads], log_s[rows, reads])
    gaussian = -0.5 * z ** 2 - log_s[rows, reads] - 0.5 * np.log(2 * np.pi)
    generated = np.asarray(spans.valid & spans.generated)
    return jnp.sum(gaussian, axis=(1, 2)) + jnp.sum(jnp.where(generated, log_det_shallow, 0),
                                                      axis=1)

  want = log_prob(seq.valid)
  if w is not None:
    want = (1 + w) * want - w * log_prob(seq.valid & ~seq.prompt_text)
  cfg = model.config
  assert_float32_close(got, want,
                       depth=cfg.vlm.num_layers + cfg.flow.deep.num_layers + 1
                       + cfg.flow.num_shallow_blocks * (cfg.flow.shallow.num_layers + 1),
                       reduction=max(cfg.vlm.intermediate_size, N * D))


def test_a_prompt_ending_in_a_stop_token_still_generates(model_and_params):
  """Stop tokens end generation, not prompts: "a photo of a trouser." with "." as a stop word
  must still be continued (the check applies to generated tokens only)."""
  model, params = model_and_params
  prompt, x = prompt_batch([[("text", [3, 5, STOP])], [("text", [9, STOP])]])
  seq = compiled(model, spec(max_new=4))(params, prompt, x, jax.random.key(0))
  assert np.all(np.asarray(seq.generated).sum(axis=1) >= 1)


def test_text_draws_only_ids_the_tokenizer_can_decode(model_and_params):
  """An LM head wider than the tokenizer (vocabularies padded to a multiple of 8) never
  yields an id past `num_token_ids`; without the cap, random draws do reach them."""
  model, params = model_and_params
  prompt, x = prompt_batch([[("text", [3, 5])], [("text", [9])]] * 4)
  structural = {IMAGE_PAD, VISION_END}           # written by the sampler, not drawn
  limit = 30                                     # of the head's 48 ids
  drawn = []
  for cap in (None, limit):
    out = compiled(model, spec(max_new=12, text_temperature=3.0, stop_ids=(),
                               num_token_ids=cap))(params, prompt, x, jax.random.key(3))
    ids, generated = np.asarray(out.ids), np.asarray(out.generated)
    drawn.append({int(i) for i in ids[generated]} - structural)
  assert max(drawn[0]) >= limit           # the uncapped head does draw the padding ids
  assert max(drawn[1]) < limit
