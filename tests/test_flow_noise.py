"""Multi-noise training helpers (SPEC §4): noise levels, noising, loss weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starflow2_jax.flows import noise
from tolerance import assert_float32_close


def test_noise_helpers():
  batch = 256
  t = noise.sample_noise_levels(jax.random.key(0), batch, 0.1, 0.3)
  assert float(t.min()) >= 0.1 and float(t.max()) <= 0.3
  # "t" weights are t / mean(t): their mean is 1 up to the rounding of the two sums over the
  # batch (one layer of reductions of length `batch`).
  assert_float32_close(jnp.mean(noise.loss_weights(t, "t")), 1.0, depth=1, reduction=batch)
  np.testing.assert_array_equal(noise.loss_weights(t, "uniform"), np.ones(batch))
  x = jnp.zeros((batch, 2, 3))
  eps = noise.add_noise(jax.random.key(1), x, t) / t[:, None, None]
  assert abs(float(jnp.std(eps)) - 1.0) < 0.1
  with pytest.raises(ValueError):
    noise.loss_weights(t, "sqrt")
