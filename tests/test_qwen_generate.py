"""Generation mechanics on a tiny random Flax Qwen2.5-VL (no PyTorch): left-padded batches,
stop tokens, sampling filters, and M-RoPE reducing to plain RoPE for text."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starflow2_jax import sharding
from starflow2_jax.layers import attention
from starflow2_jax.layers import rotary
from starflow2_jax.models.qwen2_5_vl import generate as generate_lib
from starflow2_jax.models.qwen2_5_vl import model as model_lib

try:
  from tests import qwen_helpers as qh
  from tests.tolerance import assert_float32_close
except ImportError:
  import qwen_helpers as qh
  from tolerance import assert_float32_close


@pytest.fixture(scope="module", name="tiny")
def _tiny():
  config = qh.tiny_config()
  model = model_lib.Qwen25VL(config)
  init = jax.jit(lambda rng: sharding.strip_axis_names(model_lib.init_params(model, rng)))
  params = jax.tree.map(lambda x: x * 4.0, init(jax.random.key(0)))   # sharper logits
  return config, model, params


def _prompts(config):
  image_prompt = [5, 6] + qh.image_span(config, qh.GRIDS[1]) + [7, 8, 9]
  return [image_prompt, [10, 11, 12]], [(qh.random_patches(qh.GRIDS[1:], config)[0],
                                         qh.GRIDS[1])]


def test_left_padded_batch_equals_rows_alone(tiny):
  config, model, params = tiny
  sampling = generate_lib.SamplingConfig(max_new_tokens=6, pad_token_id=config.pad_token_id)
  (with_image, text_only), images = _prompts(config)
  batch = generate_lib.generate(model, params, generate_lib.make_prompt_batch(
      [with_image, text_only], config, images), sampling, return_logits=True)
  alone = [generate_lib.generate(model, params, generate_lib.make_prompt_batch(
      [p], config, imgs), sampling, return_logits=True)
           for p, imgs in ((with_image, images), (text_only, []))]
  for row, single in enumerate(alone):
    np.testing.assert_array_equal(batch.tokens[row], single.tokens[0])
    # Left padding changes the shapes XLA reduces over: float32 rounding through the vision
    # tower, the text layers and the head, relative to the logits' size (tests/tolerance.py).
    text, vision = config.text, config.vision
    assert_float32_close(batch.logits[row], single.logits[0],
                         depth=vision.depth + text.num_layers + 1,
                         reduction=max(text.intermediate_size, vision.intermediate_size))


def test_stop_tokens_end_a_row_and_pad_the_rest(tiny):
  config, model, params = tiny
  prompt = generate_lib.make_prompt_batch(_prompts(config)[0][1:], config)
  free = generate_lib.generate(model, params, prompt, generate_lib.SamplingConfig(
      max_new_tokens=6, pad_token_id=config.pad_token_id))
  stop = int(free.tokens[0, 2])
  stopped = generate_lib.generate(model, params, prompt, generate_lib.SamplingConfig(
      max_new_tokens=6, stop_token_ids=(stop,), pad_token_id=config.pad_token_id))
  first = list(free.tokens[0]).index(stop)
  np.testing.assert_array_equal(stopped.tokens[0, :first + 1], free.tokens[0, :first + 1])
  assert (stopped.tokens[0, first + 1:] == config.pad_token_id).all()
  assert stopped.lengths[0] == first + 1


def test_sampling_top_p_and_temperature():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = generate_lib._top_p_filter(logits, 0.7)       # 0.5 + 0.3 reaches 0.7
  assert np.isfinite(np.asarray(kept[0, :2])).all() and np.isinf(np.asarray(kept[0, 2:])).all()
  assert np.isfinite(np.asarray(generate_lib._top_p_filter(logits, 0.01)[0, 0]))
  sampling = generate_lib.SamplingConfig(greedy=False, temperature=0.7, top_p=0.7)
  draws = jax.vmap(lambda k: generate_lib.choose_tokens(logits, k, sampling))(
      jax.random.split(jax.random.key(0), 400))
  assert set(np.unique(np.asarray(draws))) == {0, 1}


def test_sampled_generation_is_reproducible(tiny):
  """The same key gives the same tokens; other keys give other tokens.

  Plain sampling (temperature 1, top_p 1) of 32 tokens: on this model two random keys draw
  the same 32 tokens with a chance under 1% (the commonest sequence came up 5 times in 300
  draws), so 8 keys give at least 6 distinct sequences with room to spare, while a sampler
  that ignored its key would give 1.
  """
  config, model, params = tiny
  prompt = generate_lib.make_prompt_batch([[1, 2, 3]], config)
  sampling = generate_lib.SamplingConfig(max_new_tokens=32, greedy=False, temperature=1.0,
                                         top_p=1.0, pad_token_id=config.pad_token_id)
  draw = lambda seed: np.asarray(
      generate_lib.generate(model, params, prompt, sampling, jax.random.key(seed)).tokens[0])
  a, b = draw(3), draw(3)
  np.testing.assert_array_equal(a, b)
  distinct = {tuple(draw(seed).tolist()) for seed in range(3, 11)}
  assert len(distinct) >= 6, distinct


def test_mrope_of_text_positions_is_plain_rope():
  positions = jnp.arange(12).reshape(1, 12)
  mrope = rotary.mrope_angles(jnp.broadcast_to(positions, (3, 1, 12)), 16, 1e6, (2, 3, 3))
  np.testing.assert_array_equal(mrope, rotary.rotary_angles(positions, 16, 1e6))


def test_grouped_query_attention_equals_repeated_heads():
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  pos, valid = jnp.broadcast_to(jnp.arange(5), (2, 5)), jnp.ones((2, 5), bool)
  gqa = attention.CausalSelfAttention(4, 8, num_kv_heads=2, use_bias=True)
  params = sharding.strip_axis_names(jax.jit(gqa.init)(jax.random.key(1), x, pos, valid))
  params = params["params"]
  params = jax.tree.map(lambda p: p + 0.1, params)
  mha = attention.CausalSelfAttention(4, 8, use_bias=True)
  repeated = {k: (jnp.repeat(v, 2, axis=-2) if k.startswith(("key", "value")) else v)
              for k, v in params.items()}
  y_gqa, _ = jax.jit(gqa.apply)({"params": params}, x, pos, valid)
  y_mha, _ = jax.jit(mha.apply)({"params": repeated}, x, pos, valid)
  assert np.abs(np.asarray(y_gqa - y_mha)).max() <= 1e-5
