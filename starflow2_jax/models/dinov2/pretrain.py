"""A DINOv2-architecture encoder with two pre-training heads, for settings without weights.

No pretrained DINOv2 can be downloaded offline, so a small one is trained from scratch:

  * a class head on [CLS] (supervised labels: the fastest way to features that separate
    what the data's captions name; self-distillation, DINOv2's own recipe, needs long
    multi-crop training that a laptop demo cannot afford), and
  * a pixel head on each patch token, predicting that patch's (normalised) input pixels, so
    the patch features keep what the FAE's pixel decoder has to draw.

Only the `dinov2` subtree is used afterwards (`training.frozen.load_dinov2`).
"""

import flax.linen as nn
import jax.numpy as jnp

from starflow2_jax.layers import linear
from starflow2_jax.models.dinov2 import model as model_lib


class Dinov2Pretrainer(nn.Module):
  """pixels [B, S, S, 3] -> (class logits [B, K], patch pixel predictions [B, N, p²·3])."""
  config: object          # config.Dinov2Config
  num_classes: int

  @nn.compact
  def __call__(self, pixels_bhwc):
    cfg = self.config
    hidden_btd = model_lib.Dinov2(cfg, name="dinov2")(pixels_bhwc)
    logits_bk = linear.dense(self.num_classes, ("embed", None), "class_head")(hidden_btd[:, 0])
    patches_btd = hidden_btd[:, 1 + cfg.num_register_tokens:]
    pixels_btp = linear.dense(cfg.patch_size ** 2 * 3, ("embed", None), "pixel_head")(
        patches_btd)
    return logits_bk, pixels_btp.astype(jnp.float32)
