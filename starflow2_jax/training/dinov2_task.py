"""Pre-training a DINOv2-architecture encoder where no weights can be downloaded
(`models.dinov2.pretrain`): a class head on [CLS] plus a pixel head on the patch tokens.

    loss = cross-entropy(class) + `pixel_weight` · mean (predicted − input patch pixels)²

with the input pixels as DINOv2 sees them (RGB, normalised by ImageNet's mean and std).
Afterwards `training.frozen.load_dinov2(workdir)` reads the `dinov2` subtree.
"""

import jax.numpy as jnp
import optax

from data_pipelines import examples
from starflow2_jax.latents import fae as fae_latent
from starflow2_jax.models.dinov2 import image_processing
from starflow2_jax.models.dinov2 import model as dinov2_model
from starflow2_jax.models.dinov2 import pretrain
from starflow2_jax.training import frozen


class Dinov2PretrainTask:
  """Supervised + patch-pixel pre-training of a small DINOv2 (see the module docstring)."""

  def __init__(self, config):
    self.config = config
    self.dinov2_config = frozen.dinov2_config_from(config.dinov2.model)
    self.model = pretrain.Dinov2Pretrainer(self.dinov2_config, config.dinov2.num_classes)

  def example_transform(self):
    h, w = self.config.data.image_size
    return examples.ImageExample((h, w, self.config.data.channels))

  @property
  def positions_per_example(self):
    return self.dinov2_config.num_patches + 1

  def dummy_batch(self, batch=1):
    h, w = self.config.data.image_size
    return dict(image=jnp.zeros((batch, h, w, self.config.data.channels), jnp.uint8),
                label=jnp.zeros((batch,), jnp.int32))

  def _pixels(self, images):
    return fae_latent.dinov2_pixels(images, self.dinov2_config.image_size,
                                    image_processing.IMAGENET_MEAN, image_processing.IMAGENET_STD)

  def init_params(self, rng):
    return self.model.init(rng, self._pixels(self.dummy_batch()["image"]))["params"]

  def warm_start(self, params):
    return params

  def _terms(self, params, batch):
    pixels = self._pixels(batch["image"])
    logits, predicted = self.model.apply({"params": params}, pixels)
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]))
    target = dinov2_model.patchify(pixels, self.dinov2_config.patch_size)
    pixel_mse = jnp.mean(jnp.square(predicted - target))
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return ce, pixel_mse, accuracy

  def loss(self, params, batch, rng):
    del rng
    ce, pixel_mse, accuracy = self._terms(params, batch)
    loss = ce + self.config.dinov2.pixel_weight * pixel_mse
    return loss, dict(loss=loss, cross_entropy=ce, pixel_mse=pixel_mse, accuracy=accuracy)

  def eval_metrics(self, params, batch, rng):
    del rng
    ce, pixel_mse, accuracy = self._terms(params, batch)
    return dict(cross_entropy=ce, pixel_mse=pixel_mse, accuracy=accuracy)

  def sample_captions(self, params, captions, rng, guidance_weight=None):
    raise ValueError("DINOv2 pre-training draws no images")

  def sample_grid(self, params, rng):
    return None
