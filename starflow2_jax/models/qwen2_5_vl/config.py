"""Qwen2.5-VL hyperparameters: typed configs, presets, and reading a Hugging Face config.json.

The hub's config.json is flat (text keys at the top level, a short `vision_config`); files
written by transformers 5 nest them under `text_config`. `from_hf_dict` accepts both. The
transformers *class defaults* are not the 7B values, so every missing key falls back to the
7B-Instruct value here, never to a class default.
"""

import dataclasses
import json
import pathlib

IMAGE_TOKEN_ID = 151655
VIDEO_TOKEN_ID = 151656
VISION_START_TOKEN_ID = 151652
VISION_END_TOKEN_ID = 151653


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The language decoder (a Qwen2 decoder with M-RoPE)."""
  vocab_size: int = 152064
  hidden_size: int = 3584
  intermediate_size: int = 18944
  num_layers: int = 28
  num_heads: int = 28
  num_kv_heads: int = 4
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  mrope_section: tuple = (16, 24, 24)
  tie_word_embeddings: bool = False

  @property
  def head_dim(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"text hidden_size {self.hidden_size} is not divisible by "
                       f"num_attention_heads {self.num_heads}")
    return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The vision tower (a ViT with 2-D RoPE, window attention and a 2×2 patch merger)."""
  hidden_size: int = 1280
  intermediate_size: int = 3420
  depth: int = 32
  num_heads: int = 16
  out_hidden_size: int = 3584
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  in_channels: int = 3
  window_size: int = 112
  fullatt_block_indexes: tuple = (7, 15, 23, 31)
  rope_theta: float = 10_000.0
  rms_norm_eps: float = 1e-6

  @property
  def head_dim(self):
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self):
    """Values per patch: channels × temporal patch × patch × patch (1176)."""
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

  @property
  def window_merged(self):
    """Window side in merged (LM) tokens: 112 px / 14 px / 2 = 4."""
    return self.window_size // self.spatial_merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
  text: TextConfig = TextConfig()
  vision: VisionConfig = VisionConfig()
  image_token_id: int = IMAGE_TOKEN_ID
  video_token_id: int = VIDEO_TOKEN_ID
  vision_start_token_id: int = VISION_START_TOKEN_ID
  vision_end_token_id: int = VISION_END_TOKEN_ID
  eos_token_ids: tuple = (151645, 151643)    # <|im_end|>, <|endoftext|>
  pad_token_id: int = 151643

  def replace(self, **kwargs):
    return dataclasses.replace(self, **kwargs)


PRESETS = {
    "7b": Qwen25VLConfig(),
    "3b": Qwen25VLConfig(
        text=TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                        num_layers=36, num_heads=16, num_kv_heads=2, tie_word_embeddings=True),
        vision=VisionConfig(out_hidden_size=2048)),
    # Small enough for a test to build, run and compare with PyTorch in seconds.
    "tiny": Qwen25VLConfig(
        text=TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=2, mrope_section=(2, 3, 3)),
        vision=VisionConfig(hidden_size=32, intermediate_size=64, depth=2, num_heads=2,
                            out_hidden_size=64, fullatt_block_indexes=(1,)),
        image_token_id=250, video_token_id=251, vision_start_token_id=252,
        vision_end_token_id=253, eos_token_ids=(254,), pad_token_id=255),
}


def preset(name):
  if name not in PRESETS:
    raise ValueError(f"unknown Qwen2.5-VL preset {name!r}: use one of {sorted(PRESETS)}")
  return PRESETS[name]


def _pick(source, defaults, fields):
  """Dataclass kwargs from `source`, renaming HF keys (`fields`: ours -> HF name)."""
  kwargs = {}
  for ours, theirs in fields.items():
    if theirs in source and source[theirs] is not None:
      value = source[theirs]
      kwargs[ours] = tuple(value) if isinstance(value, list) else value
  return dataclasses.replace(defaults, **kwargs)


_TEXT_FIELDS = dict(
    vocab_size="vocab_size", hidden_size="hidden_size", intermediate_size="intermediate_size",
    num_layers="num_hidden_layers", num_heads="num_attention_heads",
    num_kv_heads="num_key_value_heads", rms_norm_eps="rms_norm_eps", rope_theta="rope_theta",
    tie_word_embeddings="tie_word_embeddings")
_VISION_FIELDS = dict(
    hidden_size="hidden_size", intermediate_size="intermediate_size", depth="depth",
    num_heads="num_heads", out_hidden_size="out_hidden_size", patch_size="patch_size",
    temporal_patch_size="temporal_patch_size", spatial_merge_size="spatial_merge_size",
    in_channels="in_channels", window_size="window_size",
    fullatt_block_indexes="fullatt_block_indexes")
_TOP_FIELDS = dict(
    image_token_id="image_token_id", video_token_id="video_token_id",
    vision_start_token_id="vision_start_token_id", vision_end_token_id="vision_end_token_id")


def from_hf_dict(hf):
  """A config from a parsed Hugging Face config.json, flat (hub) or nested (transformers 5)."""
  if hf.get("model_type") not in (None, "qwen2_5_vl"):
    raise ValueError(f"config.json has model_type {hf.get('model_type')!r}, expected 'qwen2_5_vl'")
  text_src = dict(hf)
  text_src.update(hf.get("text_config") or {})
  rope = text_src.get("rope_parameters") or text_src.get("rope_scaling") or {}
  if "rope_theta" in rope:
    text_src.setdefault("rope_theta", rope["rope_theta"])
  if "tie_word_embeddings" in hf:                  # the outer value is the one that counts
    text_src["tie_word_embeddings"] = hf["tie_word_embeddings"]
  text = _pick(text_src, TextConfig(), _TEXT_FIELDS)
  if rope.get("mrope_section"):
    text = dataclasses.replace(text, mrope_section=tuple(rope["mrope_section"]))
  vision_src = hf.get("vision_config") or {}
  vision = _pick(vision_src, VisionConfig(out_hidden_size=text.hidden_size), _VISION_FIELDS)
  vision_rope = vision_src.get("rope_parameters") or {}
  if "rope_theta" in vision_rope:
    vision = dataclasses.replace(vision, rope_theta=vision_rope["rope_theta"])
  config = _pick(hf, Qwen25VLConfig(text=text, vision=vision), _TOP_FIELDS)
  return _with_special_tokens(config, text_src)


def _with_special_tokens(config, source):
  """Stop and pad ids from a config.json or generation_config.json, where given."""
  eos = source.get("eos_token_id")
  if eos is not None:
    config = config.replace(eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else (eos,))
  if source.get("pad_token_id") is not None:
    config = config.replace(pad_token_id=source["pad_token_id"])
  return config


def to_hf_dict(config):
  """The nested config.json layout (what transformers 5 writes); used to build references."""
  t, v = config.text, config.vision
  return dict(
      model_type="qwen2_5_vl", tie_word_embeddings=t.tie_word_embeddings,
      image_token_id=config.image_token_id, video_token_id=config.video_token_id,
      vision_start_token_id=config.vision_start_token_id,
      vision_end_token_id=config.vision_end_token_id,
      text_config=dict(
          vocab_size=t.vocab_size, hidden_size=t.hidden_size,
          intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
          num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
          rms_norm_eps=t.rms_norm_eps, max_position_embeddings=4096,
          rope_parameters=dict(rope_type="default", rope_theta=t.rope_theta,
                               mrope_section=list(t.mrope_section)),
          eos_token_id=config.eos_token_ids[0], pad_token_id=config.pad_token_id,
          bos_token_id=config.pad_token_id, tie_word_embeddings=t.tie_word_embeddings),
      vision_config=dict(
          hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, depth=v.depth,
          num_heads=v.num_heads, out_hidden_size=v.out_hidden_size, patch_size=v.patch_size,
          temporal_patch_size=v.temporal_patch_size, spatial_merge_size=v.spatial_merge_size,
          in_channels=v.in_channels, window_size=v.window_size,
          fullatt_block_indexes=list(v.fullatt_block_indexes)))


def from_pretrained_dir(directory):
  """Reads `<directory>/config.json` (and the stop ids of generation_config.json if present)."""
  path = pathlib.Path(directory) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path}: no config.json (is this a Qwen2.5-VL checkpoint directory?)")
  config = from_hf_dict(json.loads(path.read_text()))
  generation = pathlib.Path(directory) / "generation_config.json"
  if generation.exists():
    config = _with_special_tokens(config, json.loads(generation.read_text()))
  return config
