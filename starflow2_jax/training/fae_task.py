"""Training the FAE (SPEC §5, stage "0" of the paper's pipeline) as a task for the trainer.

DINOv2 is frozen (`config.fae.dinov2`: a converted checkpoint or a pre-training workdir) and
its patch features f are the data. Two phases (`config.fae.phase`), each a run of its own:

  autoencode       the encoder and feature decoder as a VAE on f:
                     Σ_F (f̂ − f)² / s² + β · Σ_D KL(q(x|f) ‖ N(0, I))   per token,
                   with s² the batch's mean feature square (scale-free), x drawn from q;
                   and, independently, the pixel decoder on true features plus Gaussian
                   noise of σ = `feature_noise` · s (0.4 in the paper).
  finetune_pixels  the pixel decoder alone, on the feature decoder's reconstructions from
                   the posterior mean (encoder and feature decoder frozen; warm start from
                   the autoencode run with `init.from_workdir`).

The pixel loss is L1 on the [−1, 1] scale plus `perceptual_weight` × a perceptual term: the
squared distance between DINOv2's features of the decoded and of the true image, over s²
(the frozen DINOv2 is the one network whose weights exist offline). No GAN term.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import examples
from starflow2_jax.latents import patch
from starflow2_jax.models import fae as fae_lib
from starflow2_jax.training import checkpointing
from starflow2_jax.training import frozen

PHASES = ("autoencode", "finetune_pixels")


def psnr(decoded_uint8, images_uint8):
  """Peak signal-to-noise ratio in dB of 8-bit images, per image."""
  err = jnp.asarray(decoded_uint8, jnp.float32) - jnp.asarray(images_uint8, jnp.float32)
  mse = jnp.mean(jnp.square(err), axis=tuple(range(1, err.ndim)))
  return 10.0 * jnp.log10(255.0 ** 2 / jnp.maximum(mse, 1e-10))


def token_cosine(a_bnf, b_bnf):
  """Mean cosine similarity of corresponding tokens."""
  dot = jnp.sum(a_bnf * b_bnf, -1)
  norms = jnp.linalg.norm(a_bnf, axis=-1) * jnp.linalg.norm(b_bnf, axis=-1)
  return jnp.mean(dot / jnp.maximum(norms, 1e-12))


class FAETask:
  """One phase of FAE training (see the module docstring)."""

  def __init__(self, config):
    self.config = config
    cfg = config.fae
    if cfg.phase not in PHASES:
      raise ValueError(f"config.fae.phase={cfg.phase!r} is not one of {PHASES}")
    self.dinov2 = frozen.load_dinov2(cfg.dinov2)
    self.fae_config = frozen.fae_config(cfg.model, self.dinov2, config.data.image_size,
                                        config.data.channels)
    self.model = fae_lib.FAE(self.fae_config)

  # ---- data ---------------------------------------------------------------------------

  def example_transform(self):
    h, w = self.config.data.image_size
    return examples.ImageExample((h, w, self.config.data.channels))

  @property
  def positions_per_example(self):
    return self.fae_config.num_tokens

  def dummy_batch(self, batch=1):
    h, w = self.config.data.image_size
    return dict(image=jnp.zeros((batch, h, w, self.config.data.channels), jnp.uint8),
                label=jnp.zeros((batch,), jnp.int32))

  # ---- model --------------------------------------------------------------------------

  def init_params(self, rng):
    features = jnp.zeros((1, self.fae_config.num_tokens, self.fae_config.feature_dim))
    return {"fae": self.model.init(rng, features)["params"]}

  def warm_start(self, params):
    """The autoencode run's FAE (`init.from_workdir`) in place of fresh parameters."""
    if self.config.init.from_workdir:
      params, _ = checkpointing.restore_params_subset(
          os.path.join(self.config.init.from_workdir, "checkpoints"), params)
    return params

  def _apply(self, params, x, method):
    return self.model.apply({"params": params["fae"]}, x, method=method)

  # ---- losses -------------------------------------------------------------------------

  def _features(self, images):
    """Frozen DINOv2 features and their scale s (root mean square over the batch)."""
    f = jax.lax.stop_gradient(self.dinov2.features(images))
    return f, jax.lax.stop_gradient(jnp.sqrt(jnp.mean(jnp.square(f))))

  def _pixel_terms(self, decoded, images, f, s):
    """L1 on the [−1, 1] scale and the perceptual distance of the decoded images."""
    target = patch.pixels_to_unit(images)
    l1 = jnp.mean(jnp.abs(decoded - target))
    f_decoded = self.dinov2.features((decoded + 1.0) * 127.5)
    perceptual = jnp.mean(jnp.square(f_decoded - f)) / jnp.square(s)
    return l1, perceptual

  def loss(self, params, batch, rng):
    cfg = self.config.fae
    images = batch["image"]
    f, s = self._features(images)
    rng_z, rng_noise = jax.random.split(rng)
    metrics, loss = {}, 0.0
    if cfg.phase == "autoencode":
      mean, logvar = self._apply(params, f, "encode")
      x = fae_lib.reparameterise(rng_z, mean, logvar)
      f_hat = self._apply(params, x, "decode_features")
      rec = jnp.mean(jnp.sum(jnp.square(f_hat - f), -1)) / jnp.square(s)
      kl = jnp.mean(jnp.sum(fae_lib.gaussian_kl(mean, logvar), -1))
      loss = rec + cfg.beta * kl
      metrics.update(reconstruction=rec, kl=kl, feature_cosine=token_cosine(f_hat, f))
      pixel_input = f + cfg.feature_noise * s * jax.random.normal(rng_noise, f.shape)
    else:
      mean, _ = self._apply(params, f, "encode")
      pixel_input = jax.lax.stop_gradient(self._apply(params, mean, "decode_features"))
    decoded = self._apply(params, pixel_input, "decode_pixels")
    l1, perceptual = self._pixel_terms(decoded, images, f, s)
    loss = loss + l1 + cfg.perceptual_weight * perceptual
    metrics.update(loss=loss, pixel_l1=l1, perceptual=perceptual)
    return loss, metrics

  def eval_metrics(self, params, batch, rng):
    """Deterministic reconstructions through the posterior mean: feature cosine and
    relative error, the images' PSNR, and the latent's per-channel scale."""
    del rng
    images = batch["image"]
    f, s = self._features(images)
    mean, logvar = self._apply(params, f, "encode")
    f_hat = self._apply(params, mean, "decode_features")
    decoded = self._apply(params, f_hat, "decode_pixels")
    channel_mean = jnp.mean(mean, axis=(0, 1))
    channel_std = jnp.std(mean, axis=(0, 1))
    return dict(
        feature_cosine=token_cosine(f_hat, f),
        feature_relative_error=jnp.sqrt(jnp.mean(jnp.square(f_hat - f))) / s,
        psnr=jnp.mean(psnr(patch.unit_to_pixels(decoded), images)),
        kl=jnp.mean(jnp.sum(fae_lib.gaussian_kl(mean, logvar), -1)),
        latent_abs_mean_max=jnp.max(jnp.abs(channel_mean)),
        latent_std_min=jnp.min(channel_std), latent_std_max=jnp.max(channel_std))

  # ---- samples ------------------------------------------------------------------------

  def sample_captions(self, params, captions, rng, guidance_weight=None):
    raise ValueError("the FAE stage draws no images from captions")

  def sample_grid(self, params, rng):
    return None


def reconstructions(latent, images, batch=256):
  """uint8 images decoded from their own latents (numpy, in batches)."""
  run = jax.jit(lambda im: latent.decode(latent.encode(im)))
  return np.concatenate([np.asarray(run(images[i:i + batch]))
                         for i in range(0, len(images), batch)])
