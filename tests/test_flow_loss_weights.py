"""The flow loss's noise-level weights (SPEC §4: per-example loss weighted by t) average to
one over the examples that have a target image — in stage 3's mixtures some have none."""

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import records
from starflow2_jax.flows import noise
from starflow2_jax.training import pretzel_task
from test_pretzel_stages import batch_of, record, tiny_config
from tolerance import assert_float32_close


def test_weights_average_to_one_over_the_counted_examples():
  t = jnp.array([0.1, 0.3, 0.05])
  counted = jnp.array([True, True, False])
  weights = noise.loss_weights(t, "t", counted)
  np.testing.assert_allclose(np.mean(np.asarray(weights)[:2]), 1.0, rtol=1e-6)
  np.testing.assert_allclose(weights, t / 0.2, rtol=1e-6)
  np.testing.assert_array_equal(noise.loss_weights(t, "t"), t / jnp.mean(t))


def test_stage3_flow_loss_ignores_examples_without_a_target_image(monkeypatch):
  task = pretzel_task.PretzelTask(tiny_config(3))
  params = jax.jit(task.init_params)(jax.random.key(0))
  text_only = records.InterleavedRecord(
      [records.TextSegment("ab"), records.TextSegment("c")], {"prompt_segments": 1})
  batch = batch_of(task, [record(prompt_segments=2), text_only])
  assert batch["image_target"].any(axis=1).tolist() == [True, False]

  def flow_terms(t_text_only):
    levels = jnp.array([0.1, t_text_only], jnp.float32)
    monkeypatch.setattr(noise, "sample_noise_levels", lambda *args: levels)
    _, metrics = task.loss(params, batch, jax.random.key(1))
    return float(metrics["flow_loss"]), float(metrics["flow_nll"])

  loss_a, nll_a = flow_terms(0.25)
  loss_b, nll_b = flow_terms(0.03)
  # One example has a target image: its weight is 1 whatever the other example's t, so the
  # weighted loss is its NLL (the old batch-mean normalisation gave 0.1 / 0.175 of it).
  # Both sides are the same float32 computation up to one division: a few ulps.
  assert_float32_close(loss_a, nll_a, depth=1, reduction=1)
  assert_float32_close(loss_b, loss_a, depth=1, reduction=1)
  assert nll_a == nll_b
