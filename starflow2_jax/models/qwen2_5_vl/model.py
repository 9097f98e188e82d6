"""Qwen2.5-VL for conditional generation: vision tower + language decoder, one Linen module.

Methods (call with `model.apply(variables, ..., method=...)`):
  encode_images(patches, grid)         -> image features [M, H] (M = patches / 4)
  embed(ids, image_features=None)      -> input embeddings, image features at <|image_pad|>
  decode(embeds, positions, valid, cache=None) -> (final-norm hidden states, cache)
  logits(hidden)                       -> float32 logits
  __call__(ids, positions, valid, patches=None, grid=None, cache=None) -> (logits, cache)
STARFlow2 uses `embed`, `decode` and `logits` separately (its visual positions carry adapter
outputs instead of image features).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from starflow2_jax.models.qwen2_5_vl import text as text_lib
from starflow2_jax.models.qwen2_5_vl import vision as vision_lib


def merge_image_features(embeds_btd, ids_bt, features_md, image_token_id):
  """Embeddings with the i-th <|image_pad|> (row-major over the batch) replaced by feature i."""
  is_image_bt = ids_bt == image_token_id
  index_bt = (jnp.cumsum(is_image_bt.reshape(-1)) - 1).reshape(ids_bt.shape)
  gathered_btd = jnp.take(features_md, jnp.clip(index_bt, 0), axis=0)
  return jnp.where(is_image_bt[..., None], gathered_btd.astype(embeds_btd.dtype), embeds_btd)


class Qwen25VL(nn.Module):
  config: object            # config.Qwen25VLConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.vision = vision_lib.VisionTower(self.config.vision, name="vision", **kw)
    self.text = text_lib.TextDecoder(self.config.text, name="text", **kw)

  def encode_images(self, patches_np, grid):
    return self.vision(patches_np, grid)

  def embed(self, ids_bt, image_features_md=None):
    embeds_btd = self.text.embed(ids_bt)
    if image_features_md is None:
      return embeds_btd
    return merge_image_features(embeds_btd, ids_bt, image_features_md,
                                self.config.image_token_id)

  def decode(self, embeds_btd, positions_3bt, valid_bt, cache=None):
    return self.text(embeds_btd, positions_3bt, valid_bt, cache)

  def logits(self, hidden_btd):
    return self.text.logits(hidden_btd)

  def __call__(self, ids_bt, positions_3bt, valid_bt, patches_np=None, grid=None, cache=None):
    features = None if patches_np is None else self.encode_images(patches_np, grid)
    hidden_btd, cache = self.decode(self.embed(ids_bt, features), positions_3bt, valid_bt, cache)
    return self.logits(hidden_btd), cache


def example_inputs(config):
  """Smallest inputs that touch every parameter (one 1×2×2-patch image), for init."""
  merge = config.vision.spatial_merge_size
  grid_thw = [(1, merge, merge)]
  ids = np.array([[config.image_token_id]], np.int32)
  positions = np.zeros((3, 1, 1), np.int32)
  patches = np.zeros((merge * merge, config.vision.patch_dim), np.float32)
  return ids, positions, np.ones((1, 1), bool), patches, vision_lib.grid_inputs(grid_thw,
                                                                                 config.vision)


def init_params(model, rng):
  """Random parameters (boxed with logical axis names), e.g. for tests and benchmarks."""
  return model.init(rng, *example_inputs(model.config))["params"]


def abstract_params(model):
  """The boxed parameter tree as ShapeDtypeStructs, without allocating anything."""
  return jax.eval_shape(lambda: init_params(model, jax.random.key(0)))


def empty_cache(model, batch, max_length):
  """A zeroed KV cache for `batch` rows of up to `max_length` tokens."""
  return text_lib.empty_cache(model.config.text, batch, max_length, model.dtype)
