"""The feature auto-encoder (FAE, SPEC §5; "One Layer is Enough", Gao et al. 2025).

Three networks over a gh × gw grid of frozen DINOv2 feature tokens, all non-causal:

    features [B, N, F] --FAEEncoder--> (mean, logvar) [B, N, D]     the "one layer"
    latent   [B, N, D] --FeatureDecoder--> features [B, N, F]        6-layer RoPE Transformer
    features [B, N, F] --PixelDecoder--> images [B, gh·p, gw·p, C]   ViT-L

No code is public, so the details the paper leaves out were chosen to meet its parameter
counts (on g/14 features: 16×16×1536 -> 16×16×32; `param_counts` builds the tree abstractly,
`python -m starflow2_jax.models.fae` prints every preset's):

- encoder, 38,169,664 (paper ≈ 38.17M): pre-LayerNorm; query/key/value 1536 -> 24 heads
  × 256 = 6144, with biases, no rotary positions (DINOv2 features carry their own); the
  heads concatenated, *no* output projection; the skip path, a linear map of the raw
  features 1536 -> 6144 (with bias), added to the concatenated heads; GELU; a linear map
  6144 -> 64 (with bias) = mean and log-variance. The count matches to the last reported
  digit, which is what fixes the skip's shape and the missing output projection.
- feature decoder, 170,531,328 (paper ≈ 170.4M, +0.08%): linear 32 -> 1536 (bias); 6
  pre-RMSNorm layers of attention (24 heads × 64, 2-D axial RoPE, no biases) and SwiGLU (no
  biases) of hidden 4032; final RMSNorm; linear 1536 -> 1536 (bias). The SwiGLU hidden size
  is not stated: DINOv2-g's 4096 would give 172.3M (+1.1%), so 4032 (a multiple of 64).
- pixel decoder, 304,934,656 (paper ≈ 305.4M, −0.15%): linear 1536 -> 1024 (bias) plus a
  learned 256 × 1024 position table; 24 pre-LayerNorm ViT-L layers (16 heads × 64, biases
  everywhere, GELU MLP 4096); final LayerNorm; linear 1024 -> 16·16·3 (bias); unpatchified
  row-major (token k is the patch at row k // gw, column k % gw; inside a patch, pixel rows,
  then columns, then channels — the patch latent's order).
"""

import dataclasses

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from starflow2_jax.layers import attention
from starflow2_jax.layers import linear
from starflow2_jax.layers import mlp as mlp_lib
from starflow2_jax.layers import norms
from starflow2_jax.layers import rotary
from starflow2_jax.models.qwen2_5_vl import blocks


@dataclasses.dataclass(frozen=True)
class FAEConfig:
  """The numbers that define an FAE; `PRESETS` holds named ones.

  Attributes:
    feature_dim: F, the feature extractor's width (DINOv2-g: 1536).
    grid: (gh, gw) feature tokens per image, row-major.
    latent_dim: D, latent channels per token.
    encoder_heads, encoder_head_dim: the one attention layer (may be wider than F).
    feature_decoder_*: the feature decoder Transformer (RoPE, RMSNorm, SwiGLU).
    pixel_decoder_*: the ViT that maps features to pixels.
    pixel_patch: p, pixels per token side; channels: C of the images.
    rope_theta: base of the feature decoder's axial RoPE.
    dtype: compute dtype (parameters stay float32).
  """
  feature_dim: int
  grid: tuple
  latent_dim: int
  encoder_heads: int
  encoder_head_dim: int
  feature_decoder_width: int
  feature_decoder_layers: int
  feature_decoder_heads: int
  feature_decoder_mlp_hidden: int
  pixel_decoder_width: int
  pixel_decoder_layers: int
  pixel_decoder_heads: int
  pixel_decoder_mlp_ratio: float = 4.0
  pixel_patch: int = 16
  channels: int = 3
  rope_theta: float = 10_000.0
  dtype: str = "float32"

  def __post_init__(self):
    object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
    if len(self.grid) != 2:
      raise ValueError(f"grid {self.grid} must be (rows, cols)")
    for name in ("feature_decoder", "pixel_decoder"):
      width, heads = getattr(self, f"{name}_width"), getattr(self, f"{name}_heads")
      if width % heads:
        raise ValueError(f"{name}_width {width} is not divisible by {name}_heads {heads}")
    if self.feature_decoder_head_dim % 4:
      raise ValueError(f"feature decoder head_dim {self.feature_decoder_head_dim} must be a "
                       "multiple of 4 (axial RoPE rotates half of it by row, half by column)")

  @classmethod
  def from_dict(cls, d):
    """From a config mapping of field names; a "preset" key starts from that preset and the
    other keys override it. Unknown keys are an error."""
    d = dict(d)
    base = dataclasses.asdict(PRESETS[d.pop("preset")]) if "preset" in d else {}
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown FAE config keys {sorted(unknown)}")
    return cls(**{**base, **d})

  @property
  def num_tokens(self):
    return self.grid[0] * self.grid[1]

  @property
  def image_size(self):
    """(H, W) of the decoded images."""
    return (self.grid[0] * self.pixel_patch, self.grid[1] * self.pixel_patch)

  @property
  def feature_decoder_head_dim(self):
    return self.feature_decoder_width // self.feature_decoder_heads

  @property
  def pixel_decoder_head_dim(self):
    return self.pixel_decoder_width // self.pixel_decoder_heads


PRESETS = {
    # The paper's, on DINOv2-g/14 features of 256×256 images (counts in the module docstring).
    "paper": FAEConfig(
        feature_dim=1536, grid=(16, 16), latent_dim=32, encoder_heads=24, encoder_head_dim=256,
        feature_decoder_width=1536, feature_decoder_layers=6, feature_decoder_heads=24,
        feature_decoder_mlp_hidden=4032, pixel_decoder_width=1024, pixel_decoder_layers=24,
        pixel_decoder_heads=16, pixel_decoder_mlp_ratio=4.0, pixel_patch=16, channels=3),
    # ~8M parameters for experiments, on DINOv2-S/14 features (width 384).
    "small": FAEConfig(
        feature_dim=384, grid=(16, 16), latent_dim=32, encoder_heads=6, encoder_head_dim=128,
        feature_decoder_width=256, feature_decoder_layers=4, feature_decoder_heads=4,
        feature_decoder_mlp_hidden=688, pixel_decoder_width=256, pixel_decoder_layers=4,
        pixel_decoder_heads=4, pixel_decoder_mlp_ratio=4.0, pixel_patch=16, channels=3),
    # For tests: a non-square grid, so that a swapped row/column shows.
    "tiny": FAEConfig(
        feature_dim=32, grid=(3, 4), latent_dim=4, encoder_heads=2, encoder_head_dim=32,
        feature_decoder_width=32, feature_decoder_layers=2, feature_decoder_heads=2,
        feature_decoder_mlp_hidden=64, pixel_decoder_width=32, pixel_decoder_layers=2,
        pixel_decoder_heads=2, pixel_decoder_mlp_ratio=2.0, pixel_patch=4, channels=3),
}


# ---- pure helpers -------------------------------------------------------------------------

def gaussian_kl(mean, logvar):
  """KL(N(mean, e^logvar) ‖ N(0, 1)) per element, in nats: ½(mean² + e^logvar − 1 − logvar)."""
  mean, logvar = jnp.asarray(mean, jnp.float32), jnp.asarray(logvar, jnp.float32)
  return 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def reparameterise(rng, mean, logvar):
  """A draw of N(mean, e^logvar) as mean + e^(logvar / 2) · ε, differentiable in both."""
  eps = jax.random.normal(rng, jnp.shape(mean), jnp.float32)
  return mean + jnp.exp(0.5 * logvar) * eps


def unpatchify(patches_bnd, grid, patch):
  """Pixel patches [B, gh·gw, p·p·C] -> images [B, gh·p, gw·p, C]; token k is the patch at
  row k // gw, column k % gw, its pixels in (row, column, channel) order (as `PatchLatent`)."""
  return einops.rearrange(patches_bnd, "b (gh gw) (p q c) -> b (gh p) (gw q) c",
                          gh=grid[0], gw=grid[1], p=patch, q=patch)


def grid_angles(grid, head_dim, theta):
  """Axial RoPE angles [1, gh·gw, head_dim // 2] of a row-major token grid."""
  rows, cols = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
  return rotary.axial_angles(jnp.asarray(rows)[None], jnp.asarray(cols)[None], head_dim, theta)


def _all_keys(x_bnd):
  return attention.bidirectional_mask(jnp.ones(x_bnd.shape[:2], bool))


# ---- the three networks -------------------------------------------------------------------

class FAEEncoder(nn.Module):
  """The "one layer": features [B, N, F] -> (mean, logvar) [B, N, D] of a diagonal Gaussian.

  h = Attention(LayerNorm(x)) + W_skip x, heads concatenated (width heads · head_dim, no
  output projection); (mean, logvar) = W_out GELU(h). The skip path is a linear map of the
  raw features to the attention's width, so every token keeps a direct route to its latent.
  """
  config: FAEConfig
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features_bnf):
    cfg = self.config
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=self.param_dtype)
    x_bnf = features_bnf.astype(kw["dtype"])
    h_bnf = norms.layer_norm("norm", **kw)(x_bnf)
    attended_bnh, _ = attention.CausalSelfAttention(
        cfg.encoder_heads, cfg.encoder_head_dim, use_bias=True, rope=False, project_out=False,
        name="attention", **kw)(h_bnf, None, None, mask_b1ts=_all_keys(h_bnf))
    skip_bnh = linear.dense(cfg.encoder_heads * cfg.encoder_head_dim, ("embed", "mlp"), "skip",
                            **kw)(x_bnf)
    h_bnh = nn.with_logical_constraint(jax.nn.gelu(attended_bnh + skip_bnh),
                                       ("batch", "length", "mlp"))
    stats = linear.dense(2 * cfg.latent_dim, ("mlp", "latent"), "out", **kw)(h_bnh)
    mean_bnd, logvar_bnd = jnp.split(stats.astype(jnp.float32), 2, axis=-1)
    return mean_bnd, logvar_bnd


class FeatureDecoderLayer(nn.Module):
  """Pre-RMSNorm non-causal attention with axial RoPE, then pre-RMSNorm SwiGLU."""
  num_heads: int
  mlp_hidden: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_bnw, angles_1nh):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    head_dim = x_bnw.shape[-1] // self.num_heads
    h_bnw = blocks.RMSNorm(name="attention_norm", **kw)(x_bnw)
    h_bnw, _ = attention.CausalSelfAttention(self.num_heads, head_dim, name="attention", **kw)(
        h_bnw, None, None, angles_bth=angles_1nh, mask_b1ts=_all_keys(h_bnw))
    x_bnw = x_bnw + h_bnw
    h_bnw = blocks.RMSNorm(name="mlp_norm", **kw)(x_bnw)
    x_bnw = x_bnw + blocks.SwiGLU(self.mlp_hidden, name="mlp", **kw)(h_bnw)
    return nn.with_logical_constraint(x_bnw, ("batch", "length", "embed"))


class FeatureDecoder(nn.Module):
  """latent [B, N, D] -> reconstructed features [B, N, F] (float32), over the token grid."""
  config: FAEConfig
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, latent_bnd):
    cfg = self.config
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=self.param_dtype)
    x_bnw = linear.dense(cfg.feature_decoder_width, ("latent", "embed"), "input_proj", **kw)(
        latent_bnd.astype(kw["dtype"]))
    angles_1nh = grid_angles(cfg.grid, cfg.feature_decoder_head_dim, cfg.rope_theta)
    for i in range(cfg.feature_decoder_layers):
      x_bnw = FeatureDecoderLayer(cfg.feature_decoder_heads, cfg.feature_decoder_mlp_hidden,
                                  name=f"layer_{i}", **kw)(x_bnw, angles_1nh)
    x_bnw = blocks.RMSNorm(name="final_norm", **kw)(x_bnw)
    out = linear.dense(cfg.feature_dim, ("embed", None), "output_proj", **kw)(x_bnw)
    return out.astype(jnp.float32)


class ViTLayer(nn.Module):
  """Pre-LayerNorm non-causal attention (biases, no rotary), then pre-LayerNorm GELU MLP."""
  num_heads: int
  mlp_hidden: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_bnw):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    head_dim = x_bnw.shape[-1] // self.num_heads
    h_bnw = norms.layer_norm("attention_norm", **kw)(x_bnw)
    h_bnw, _ = attention.CausalSelfAttention(
        self.num_heads, head_dim, use_bias=True, out_bias=True, rope=False, name="attention",
        **kw)(h_bnw, None, None, mask_b1ts=_all_keys(h_bnw))
    x_bnw = x_bnw + h_bnw
    h_bnw = norms.layer_norm("mlp_norm", **kw)(x_bnw)
    x_bnw = x_bnw + mlp_lib.MLP(self.mlp_hidden, name="mlp", **kw)(h_bnw)
    return nn.with_logical_constraint(x_bnw, ("batch", "length", "embed"))


class PixelDecoder(nn.Module):
  """features [B, N, F] -> images [B, gh·p, gw·p, C] (float32), pixels on the [-1, 1] scale.

  The output is an unbounded linear map (no tanh): the losses pull it toward targets in
  [-1, 1]; clip before quantising.
  """
  config: FAEConfig
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features_bnf):
    cfg = self.config
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=self.param_dtype)
    width = cfg.pixel_decoder_width
    x_bnw = linear.dense(width, (None, "embed"), "input_proj", **kw)(
        features_bnf.astype(kw["dtype"]))
    positions_nw = self.param("positions", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("length", "embed")), (cfg.num_tokens, width),
        self.param_dtype)
    x_bnw = x_bnw + positions_nw.astype(kw["dtype"])[None]
    for i in range(cfg.pixel_decoder_layers):
      x_bnw = ViTLayer(cfg.pixel_decoder_heads, int(cfg.pixel_decoder_mlp_ratio * width),
                       name=f"layer_{i}", **kw)(x_bnw)
    x_bnw = norms.layer_norm("final_norm", **kw)(x_bnw)
    patch_dim = cfg.pixel_patch ** 2 * cfg.channels
    patches = linear.dense(patch_dim, ("embed", "latent"), "output_proj", **kw)(x_bnw)
    return unpatchify(patches.astype(jnp.float32), cfg.grid, cfg.pixel_patch)


class FAE(nn.Module):
  """The three networks as submodules `encoder`, `feature_decoder`, `pixel_decoder` (the
  parameter tree's top-level keys, which the training stages freeze or train).

  Call one with `module.apply(params, x, method="encode" | "decode_features" |
  "decode_pixels")`; `__call__` runs all three (for `init`).
  """
  config: FAEConfig
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.encoder = FAEEncoder(self.config, self.param_dtype)
    self.feature_decoder = FeatureDecoder(self.config, self.param_dtype)
    self.pixel_decoder = PixelDecoder(self.config, self.param_dtype)

  def encode(self, features_bnf):
    """(mean, logvar) [B, N, D] of the latent."""
    return self.encoder(features_bnf)

  def decode_features(self, latent_bnd):
    """Reconstructed features [B, N, F]."""
    return self.feature_decoder(latent_bnd)

  def decode_pixels(self, features_bnf):
    """Images [B, H, W, C] on the [-1, 1] scale."""
    return self.pixel_decoder(features_bnf)

  def __call__(self, features_bnf):
    """(mean, logvar, features from the mean, images from those features)."""
    mean, logvar = self.encode(features_bnf)
    features_hat = self.decode_features(mean)
    return mean, logvar, features_hat, self.decode_pixels(features_hat)


# ---- parameter counts ---------------------------------------------------------------------

def abstract_params(config):
  """The FAE's parameter tree as ShapeDtypeStructs (nothing allocated), unboxed."""
  features = jax.ShapeDtypeStruct((1, config.num_tokens, config.feature_dim), jnp.float32)
  boxed = jax.eval_shape(FAE(config).init, jax.random.key(0), features)["params"]
  is_box = lambda b: isinstance(b, nn.meta.AxisMetadata)
  return jax.tree.map(lambda b: b.unbox(apply_constraint=False) if is_box(b) else b, boxed,
                      is_leaf=is_box)


def param_counts(config):
  """{"encoder" | "feature_decoder" | "pixel_decoder" | "total": parameter count}."""
  size = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
  params = abstract_params(config)
  counts = {name: size(sub) for name, sub in params.items()}
  counts["total"] = size(params)
  return counts


if __name__ == "__main__":
  for preset_name, preset in PRESETS.items():
    print(preset_name, {k: f"{v:,}" for k, v in param_counts(preset).items()})
