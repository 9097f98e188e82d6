"""A pre-norm causal Transformer whose every call can read and extend a KV cache."""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from starflow2_jax.layers import attention
from starflow2_jax.layers import kv_cache as kv_cache_lib
from starflow2_jax.layers import mlp as mlp_lib
from starflow2_jax.layers import norms
from starflow2_jax.layers import remat
from starflow2_jax.layers import rotary
from starflow2_jax.layers import scan


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """The numbers that define a Transformer; the only thing presets change."""
  width: int
  num_layers: int
  num_heads: int
  mlp_ratio: float = 4.0
  rope_theta: float = 10_000.0
  remat: bool | str = False     # a `remat.POLICIES` name (True: "full", False: "none")
  scan: bool = False            # run the layers with `nn.scan` (layers/scan.py)
  # None: 1-D positions [B, T]. "chunked" / "interleaved": M-RoPE over (t, row, col)
  # positions [3, B, T] with that frequency layout (`rotary.mrope_axis_of_frequency`);
  # "chunked" needs `mrope_section`.
  rope_layout: str | None = None
  mrope_section: tuple | None = None

  @property
  def head_dim(self):
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
    return self.width // self.num_heads

  def rotary_angles(self, positions):
    """Angles [B, T, head_dim // 2] from positions [B, T] (1-D RoPE) or [3, B, T] (M-RoPE)."""
    if self.rope_layout is None:
      return rotary.rotary_angles(positions, self.head_dim, self.rope_theta)
    return rotary.mrope_angles(positions, self.head_dim, self.rope_theta, self.mrope_section,
                               self.rope_layout)

  def empty_cache(self, batch, max_length, dtype=jnp.float32):
    return kv_cache_lib.KVCache.zeros(
        batch=batch, max_length=max_length, num_layers=self.num_layers,
        num_heads=self.num_heads, head_dim=self.head_dim, dtype=dtype, stacked=self.scan)


class TransformerLayer(nn.Module):
  config: TransformerConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_btd, positions_bt, valid_bt, layer_cache, cache_length, cache_valid_bs,
               angles_bth=None):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h_btd = norms.layer_norm("attention_norm", **kw)(x_btd)
    h_btd, layer_cache = attention.CausalSelfAttention(
        cfg.num_heads, cfg.head_dim, cfg.rope_theta, name="attention", **kw)(
            h_btd, positions_bt, valid_bt, layer_cache, cache_length, cache_valid_bs,
            angles_bth=angles_bth)
    x_btd = x_btd + remat.tag(h_btd, remat.ATTENTION_OUT)
    h_btd = norms.layer_norm("mlp_norm", **kw)(x_btd)
    h_btd = mlp_lib.MLP(int(cfg.mlp_ratio * cfg.width), name="mlp", **kw)(h_btd)
    x_btd = x_btd + remat.tag(h_btd, remat.MLP_OUT)
    return nn.with_logical_constraint(x_btd, ("batch", "length", "embed")), layer_cache


class Transformer(nn.Module):
  """Stack of pre-norm layers plus a final norm.

  `__call__(x, positions, valid, cache=None)` returns `(y, cache)`. With a cache, this
  call's tokens are appended at `cache.length` and attend to everything before them.
  Positions are [B, T], or [3, B, T] when `config.rope_layout` is set (M-RoPE).
  """
  config: TransformerConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_btd, positions_bt, valid_bt, cache=None):
    cfg = self.config
    layer_cls = remat.remat_layer(TransformerLayer, cfg.remat, scanned=cfg.scan)
    layers = scan.build_stack(layer_cls, cfg.num_layers, cfg.scan, cfg, self.dtype,
                              self.param_dtype)
    x_btd = nn.with_logical_constraint(x_btd.astype(self.dtype), ("batch", "length", "embed"))
    angles_bth = None
    if cfg.rope_layout is not None:
      angles_bth, positions_bt = cfg.rotary_angles(positions_bt), None
    x_btd, cache = scan.run_stack(layers, cfg.num_layers, x_btd,
                                  (positions_bt, valid_bt, angles_bth), 2, cache, valid_bt)
    return norms.layer_norm("final_norm", self.dtype, self.param_dtype)(x_btd), cache
