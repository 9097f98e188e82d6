"""A standalone caption-to-image STARFlow: caption embeddings condition a deep–shallow flow.

The baseline without a VLM: the conditioning context is a trainable embedding of the
caption tokens followed by a learned image-start vector (the role `<|vision_start|>` plays in
the Pretzel model). Dropping the caption masks its tokens out of attention, which leaves the
start vector alone: the unconditional model used by classifier-free guidance.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from starflow2_jax.flows import stack


@dataclasses.dataclass(frozen=True)
class CaptionFlowConfig:
  flow: stack.FlowConfig       # flow.context_dim is the caption embedding width
  vocab_size: int
  max_caption_len: int


class CaptionToImageFlow(nn.Module):
  config: CaptionFlowConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    width = self.config.flow.context_dim
    if width is None:
      raise ValueError("CaptionToImageFlow needs flow.context_dim (the caption width)")
    self.caption_embed = nn.Embed(
        self.config.vocab_size, width, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                    ("vocab", "context")))
    self.image_start = self.param(
        "image_start", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("context",)),
        (width,), self.param_dtype)
    self.flow = stack.DeepShallowFlow(self.config.flow, self.dtype, self.param_dtype)

  def context(self, caption_ids_bl, caption_mask_bl, keep_caption_b=None):
    """The deep block's context: caption tokens then the image start, and their validity.

    `keep_caption_b` (bool [B]) drops whole captions (classifier-free guidance).
    """
    batch = caption_ids_bl.shape[0]
    valid = caption_mask_bl.astype(bool)
    if keep_caption_b is not None:
      valid = valid & keep_caption_b[:, None]
    start = jnp.broadcast_to(self.image_start.astype(self.dtype), (batch, 1, self.image_start.shape[0]))
    context = jnp.concatenate([self.caption_embed(caption_ids_bl), start], axis=1)
    return context, jnp.concatenate([valid, jnp.ones((batch, 1), bool)], axis=1)

  def __call__(self, x_bnd, t_b, caption_ids_bl, caption_mask_bl, keep_caption_b=None):
    context, valid = self.context(caption_ids_bl, caption_mask_bl, keep_caption_b)
    return self.flow(x_bnd, t_b, context, valid)
