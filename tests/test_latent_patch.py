"""The patch latent: images <-> [B, tokens, patch·patch·channels] in (−1, 1)."""

import jax.numpy as jnp
import numpy as np
import pytest

from starflow2_jax.latents import patch


@pytest.mark.parametrize("channels", [1, 3])
def test_patch_latent_round_trip(channels):
  latent = patch.PatchLatent((8, 12), channels, 4)
  images = np.random.default_rng(channels).integers(0, 256, (2, 8, 12, channels), np.uint8)
  images[0, 0, 0] = 0
  images[0, 0, 1] = 255
  x = latent.encode(images)
  assert x.shape == (2, latent.num_tokens, latent.token_dim) == (2, 6, 16 * channels)
  assert x.dtype == jnp.float32
  assert float(x.min()) > -1.0 and float(x.max()) < 1.0
  decoded = np.asarray(latent.decode(x))
  assert decoded.dtype == np.uint8
  np.testing.assert_array_equal(decoded, images)
  # Token order is row-major over the patch grid; within a token, (row, column, channel).
  np.testing.assert_allclose(x[1, 4], (images[1, 4:8, 4:8].reshape(-1) + 0.5) / 128 - 1)
  # Decoding rounds to the nearest bin: values within half a bin come back to the same pixel.
  jitter = np.random.default_rng(9).uniform(-0.99 / 256, 0.99 / 256, size=x.shape)
  np.testing.assert_array_equal(latent.decode(x + jitter), images)


def test_patch_latent_rejects_indivisible_size():
  with pytest.raises(ValueError, match="divisible"):
    patch.PatchLatent((28, 30), 1, 4)
