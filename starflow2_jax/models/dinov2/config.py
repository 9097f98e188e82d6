"""DINOv2 hyperparameters: a typed config, the published sizes as presets, and reading a
Hugging Face config.json (`dinov2` or `dinov2_with_registers`).

`image_size` is the resolution the *position table* is for: a converted model runs at
exactly that size (the importer resamples the checkpoint's table to it), so it is a choice
of the conversion, not of the checkpoint; `from_hf_dict` takes it separately.
"""

import dataclasses

MODEL_TYPES = ("dinov2", "dinov2_with_registers")


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
  """A DINOv2 ViT (defaults: ViT-B/14 at its native 518-pixel table)."""
  patch_size: int = 14
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  use_swiglu: bool = False
  layerscale_value: float = 1.0
  num_register_tokens: int = 0
  layer_norm_eps: float = 1e-6
  image_size: int = 518
  qkv_bias: bool = True

  def replace(self, **kwargs):
    return dataclasses.replace(self, **kwargs)

  @property
  def head_dim(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads "
                       f"{self.num_heads}")
    return self.hidden_size // self.num_heads

  @property
  def mlp_hidden(self):
    """The feed-forward width: hidden·mlp_ratio, or for SwiGLU two thirds of it rounded up
    to a multiple of 8 (transformers' Dinov2SwiGLUFFN)."""
    hidden = int(self.hidden_size * self.mlp_ratio)
    return (int(hidden * 2 / 3) + 7) // 8 * 8 if self.use_swiglu else hidden

  @property
  def grid(self):
    """Patches per side of the position table (`image_size // patch_size`)."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self):
    return self.grid ** 2


def _sizes(hidden, layers, heads, swiglu=False):
  return dict(hidden_size=hidden, num_layers=layers, num_heads=heads, use_swiglu=swiglu)


_BASE = {
    # Small enough for a test to build, run and compare with PyTorch in seconds.
    "tiny": dict(patch_size=4, image_size=16, **_sizes(32, 2, 4)),
    "s14": _sizes(384, 12, 6),
    "b14": _sizes(768, 12, 12),
    "l14": _sizes(1024, 24, 16),
    "g14": _sizes(1536, 40, 24, swiglu=True),
}
# "<name>-reg": the same with 4 register tokens (the "with registers" checkpoints).
PRESETS = {**{name: Dinov2Config(**kw) for name, kw in _BASE.items()},
           **{f"{name}-reg": Dinov2Config(num_register_tokens=4, **kw)
              for name, kw in _BASE.items()}}


def preset(name):
  if name not in PRESETS:
    raise ValueError(f"unknown DINOv2 preset {name!r}: use one of {sorted(PRESETS)}")
  return PRESETS[name]


# transformers' class defaults, which is what a key missing from config.json means there.
_HF_DEFAULTS = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4.0,
    use_swiglu_ffn=False, layerscale_value=1.0, layer_norm_eps=1e-6, image_size=224,
    patch_size=14, qkv_bias=True, hidden_act="gelu", num_channels=3, num_register_tokens=0)
_HF_DEFAULTS_REGISTERS = dict(_HF_DEFAULTS, patch_size=16, num_register_tokens=4)


def _square(value, key):
  """An int from an int or a square [n, n] (transformers accepts both)."""
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ValueError(f"config.json: {key} {value} is not square; only square is supported")
    value = value[0]
  return int(value)


def _hf_values(hf):
  """config.json's values, missing (or null) keys filled with transformers' defaults."""
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"config.json has model_type {model_type!r}: not a DINOv2 checkpoint "
                     f"(expected one of {MODEL_TYPES})")
  defaults = _HF_DEFAULTS_REGISTERS if model_type == "dinov2_with_registers" else _HF_DEFAULTS
  values = {key: default if hf.get(key) is None else hf[key] for key, default in defaults.items()}
  if model_type == "dinov2":
    values["num_register_tokens"] = 0
  unsupported = [f"{key}={values[key]!r}" for key, ok in (("hidden_act", "gelu"),
                                                         ("num_channels", 3)) if values[key] != ok]
  if unsupported:
    raise ValueError(f"config.json: unsupported {', '.join(unsupported)}")
  return values


def native_image_size(hf):
  """The resolution a config.json's own position table is for."""
  return _square(_hf_values(hf)["image_size"], "image_size")


def from_hf_dict(hf, image_size=None):
  """A config from a parsed config.json; `image_size` (default: the checkpoint's own) is the
  resolution the converted position table will be for."""
  v = _hf_values(hf)
  return Dinov2Config(
      patch_size=_square(v["patch_size"], "patch_size"), hidden_size=int(v["hidden_size"]),
      num_layers=int(v["num_hidden_layers"]), num_heads=int(v["num_attention_heads"]),
      mlp_ratio=float(v["mlp_ratio"]), use_swiglu=bool(v["use_swiglu_ffn"]),
      layerscale_value=float(v["layerscale_value"]),
      num_register_tokens=int(v["num_register_tokens"]),
      layer_norm_eps=float(v["layer_norm_eps"]),
      image_size=int(image_size or native_image_size(hf)), qkv_bias=bool(v["qkv_bias"]))


def to_hf_dict(config):
  """The config.json of a transformers model with `config`'s sizes (used to build references)."""
  hf = dict(
      model_type="dinov2_with_registers" if config.num_register_tokens else "dinov2",
      hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads,
      mlp_ratio=int(config.mlp_ratio) if float(config.mlp_ratio).is_integer() else config.mlp_ratio,
      use_swiglu_ffn=config.use_swiglu, layerscale_value=config.layerscale_value,
      layer_norm_eps=config.layer_norm_eps, image_size=config.image_size,
      patch_size=config.patch_size, qkv_bias=config.qkv_bias)
  if config.num_register_tokens:
    hf["num_register_tokens"] = config.num_register_tokens
  return hf
