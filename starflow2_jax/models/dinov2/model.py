"""DINOv2 (and DINOv2 with registers) in Flax Linen: a port of transformers' `Dinov2Model`
and `Dinov2WithRegistersModel` for feature extraction.

pixels [B, H, W, 3] (channels last, normalised) -> patch embedding (the stride-p convolution
as a linear map of flattened patches) -> [CLS] + patches + the learned position table ->
register tokens inserted after [CLS] (after the positions are added, as transformers does)
-> pre-norm blocks with LayerScale -> final LayerNorm.

The position table is for one resolution, `config.image_size`: resampling it to another is
the importer's job (convert/dinov2.py, with the reference's own bicubic recipe), so the
forward pass never interpolates. Not ported: the mask token (`bool_masked_pos`, used only
in pre-training), dropout and drop-path (identities at inference), the pooler and the
classification head.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from starflow2_jax.layers import linear
from starflow2_jax.models.qwen2_5_vl import blocks


def layer_norm(name, epsilon, dtype, param_dtype):
  """LayerNorm with the two-pass variance PyTorch computes: Flax's default mean(x²) − mean(x)²
  cancels when |mean| ≫ std, and DINOv2's residual stream carries large activations."""
  return nn.LayerNorm(
      epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
      use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class SelfAttention(nn.Module):
  """Bidirectional multi-head attention with biased projections (no positions, no mask)."""
  num_heads: int
  head_dim: int
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_btd):
    width = x_btd.shape[-1]
    n, h = self.num_heads, self.head_dim

    def project(name):
      y_btnh = jnp.einsum("btd,dnh->btnh", x_btd, blocks.dense_param(
          self, f"{name}_kernel", (width, n, h), ("embed", "heads", "head_dim")))
      if self.use_bias:
        y_btnh = y_btnh + blocks.dense_param(self, f"{name}_bias", (n, h), ("heads", "head_dim"),
                                             nn.initializers.zeros)
      return y_btnh

    attended_btnh = jax.nn.dot_product_attention(project("query"), project("key"),
                                                 project("value"))
    w_nhd = blocks.dense_param(self, "out_kernel", (n, h, width), ("heads", "head_dim", "embed"))
    b_d = blocks.dense_param(self, "out_bias", (width,), ("embed",), nn.initializers.zeros)
    return jnp.einsum("btnh,nhd->btd", attended_btnh, w_nhd) + b_d


class MLP(nn.Module):
  """fc2(gelu(fc1(x))) with the exact (erf) GELU, as transformers' "gelu"."""
  hidden: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_btd):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h_btf = linear.dense(self.hidden, ("embed", "mlp"), "fc1", **kw)(x_btd)
    h_btf = jax.nn.gelu(h_btf, approximate=False)
    return linear.dense(x_btd.shape[-1], ("mlp", "embed"), "fc2", **kw)(h_btf)


class Block(nn.Module):
  """x + γ₁·attention(norm1(x)), then x + γ₂·ffn(norm2(x)) (γ: LayerScale)."""
  config: object            # config.Dinov2Config
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _layer_scale(self, name):
    return blocks.dense_param(self, name, (self.config.hidden_size,), ("embed",),
                              nn.initializers.constant(self.config.layerscale_value))

  @nn.compact
  def __call__(self, x_btd):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h_btd = layer_norm("norm1", cfg.layer_norm_eps, **kw)(x_btd)
    h_btd = SelfAttention(cfg.num_heads, cfg.head_dim, cfg.qkv_bias, name="attention", **kw)(
        h_btd)
    x_btd = x_btd + self._layer_scale("layer_scale1") * h_btd
    h_btd = layer_norm("norm2", cfg.layer_norm_eps, **kw)(x_btd)
    if cfg.use_swiglu:
      h_btd = blocks.SwiGLU(cfg.mlp_hidden, use_bias=True, name="mlp", **kw)(h_btd)
    else:
      h_btd = MLP(cfg.mlp_hidden, name="mlp", **kw)(h_btd)
    return x_btd + self._layer_scale("layer_scale2") * h_btd


def patchify(pixels_bhwc, patch_size):
  """[B, H, W, C] -> [B, (H/p)·(W/p), p·p·C], row-major patches, each (row, col, channel);
  pixels beyond the last whole patch are dropped, as by the stride-p convolution."""
  b, h, w, c = pixels_bhwc.shape
  gh, gw = h // patch_size, w // patch_size
  x = pixels_bhwc[:, :gh * patch_size, :gw * patch_size]
  x = x.reshape(b, gh, patch_size, gw, patch_size, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * gw, patch_size * patch_size * c)


class Dinov2(nn.Module):
  """pixels [B, H, W, 3] -> final-norm hidden states [B, 1 + registers + patches, width].

  H // patch_size and W // patch_size must both equal the table's `config.grid`.
  """
  config: object            # config.Dinov2Config
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels_bhwc):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w, c = pixels_bhwc.shape
    if c != 3 or h // cfg.patch_size != cfg.grid or w // cfg.patch_size != cfg.grid:
      raise ValueError(f"pixels {pixels_bhwc.shape[1:]}: this model's position table is for "
                       f"{cfg.image_size}×{cfg.image_size}×3 ({cfg.grid}×{cfg.grid} patches of "
                       f"{cfg.patch_size}); convert the checkpoint again at the wanted size")
    d = cfg.hidden_size
    param = lambda name, shape, axes: blocks.dense_param(
        self, name, shape, axes, nn.initializers.truncated_normal(0.02))
    x_btd = linear.dense(d, (None, "embed"), "patch_embed", **kw)(
        patchify(pixels_bhwc.astype(self.dtype), cfg.patch_size))
    cls_11d = jnp.broadcast_to(param("cls_token", (d,), ("embed",)), (b, 1, d))
    x_btd = jnp.concatenate([cls_11d, x_btd], axis=1)
    x_btd = x_btd + param("position_embedding", (cfg.num_patches + 1, d), ("length", "embed"))
    if cfg.num_register_tokens:
      registers_rd = param("register_tokens", (cfg.num_register_tokens, d), (None, "embed"))
      registers_brd = jnp.broadcast_to(registers_rd, (b,) + registers_rd.shape)
      x_btd = jnp.concatenate([x_btd[:, :1], registers_brd, x_btd[:, 1:]], axis=1)
    for i in range(cfg.num_layers):
      x_btd = Block(cfg, name=f"layer_{i}", **kw)(x_btd)
    return layer_norm("final_norm", cfg.layer_norm_eps, **kw)(x_btd)

  def patch_features(self, pixels_bhwc):
    """The final-norm outputs of the patches, [B, patches, width] ([CLS], registers dropped)."""
    return self(pixels_bhwc)[:, 1 + self.config.num_register_tokens:]


def example_pixels(config, batch=1):
  return np.zeros((batch, config.image_size, config.image_size, 3), np.float32)


def init_params(model, rng):
  """Random parameters (boxed with logical axis names), e.g. for tests."""
  return model.init(rng, example_pixels(model.config))["params"]


def abstract_params(model):
  """The boxed parameter tree as ShapeDtypeStructs, without allocating anything."""
  return jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
