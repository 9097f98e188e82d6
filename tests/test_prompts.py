"""Prompts in, results out (`sampling/prompts.py`): the one rule for a batch's noise level."""

import jax

from starflow2_jax.sampling import prompts
from starflow2_jax.training import pretzel_task
from test_pretzel_stages import image, tiny_config


def _task():
  config = tiny_config(3)
  config.sample = dict(temperature=1.0, guidance_weight=None, denoise_steps=0,
                       text_temperature=0.0, max_new=3)
  return pretzel_task.PretzelTask(config)


def test_understanding_prompts_run_at_t_min_and_drawing_at_the_generation_level():
  config = _task().config
  question = [image(0), "what is this?"]
  draw, caption_only = ["a caption", prompts.DRAW], ["a caption"]
  assert prompts.noise_level_for(config, [question, question]) == config.noise.t_min
  for batch in ([draw], [caption_only], [question, draw], [[image(0), "and", prompts.DRAW]]):
    assert prompts.noise_level_for(config, batch) == config.noise.t_max, batch
  config.sample.noise_level = 0.15
  assert prompts.noise_level_for(config, [draw]) == 0.15
  assert prompts.noise_level_for(config, [question]) == config.noise.t_min


def test_sample_and_answer_share_the_rule(monkeypatch):
  """`starflow2 sample` (a generator with the config's spec) and the demo's `answer` read
  input images at the same noise level: the rule's, t_min for a question about an image."""
  task = _task()
  params = jax.jit(task.init_params)(jax.random.key(0))
  seen = []
  real = prompts.prompt_arrays
  monkeypatch.setattr(prompts, "prompt_arrays",
                      lambda task, batch, rng, level: seen.append(level) or real(
                          task, batch, rng, level))
  question = [[image(0), "what is this?"]]
  prompts.generator_for(task).generate(params, question, jax.random.key(1))
  prompts.answer(task, params, [image(0)], "what is this?", jax.random.key(1))
  assert seen == [task.config.noise.t_min] * 2
