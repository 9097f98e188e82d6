"""Image preprocessing equivalent to transformers' Qwen2VLImageProcessor (PIL backend).

RGB -> resize (bicubic, Pillow, on uint8) to sides that are multiples of 28 by `smart_resize`
-> scale to [0, 1] -> normalise with the CLIP mean/std -> patchify into rows of
3 × 2 × 14 × 14 values (a still image is repeated over the 2 temporal slots), ordered so
that each 2×2 merge group is 4 consecutive rows. The pixel limits come from the checkpoint's
preprocessor_config.json when there is one.
"""

import dataclasses
import json
import math
import pathlib

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
  min_pixels: int = 56 * 56
  max_pixels: int = 28 * 28 * 1280
  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2
  image_mean: tuple = CLIP_MEAN
  image_std: tuple = CLIP_STD

  @classmethod
  def from_dir(cls, directory):
    """Reads preprocessor_config.json if present (both the old and the `size` spelling)."""
    path = pathlib.Path(directory) / "preprocessor_config.json"
    if not path.exists():
      return cls()
    raw = json.loads(path.read_text())
    size = raw.get("size") or {}
    kwargs = dict(min_pixels=raw.get("min_pixels", size.get("shortest_edge")),
                  max_pixels=raw.get("max_pixels", size.get("longest_edge")),
                  patch_size=raw.get("patch_size"),
                  temporal_patch_size=raw.get("temporal_patch_size"),
                  merge_size=raw.get("merge_size"), image_mean=raw.get("image_mean"),
                  image_std=raw.get("image_std"))
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items() if v is not None}
    return cls(**kwargs)


def smart_resize(height, width, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 1280):
  """(h, w) divisible by `factor`, area within [min_pixels, max_pixels], aspect kept."""
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f"image {height}x{width}: aspect ratio must be below 200")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def patchify(image_chw, config):
  """[C, H, W] -> ([gh·gw, C·T·P·P] patches in merge-block order, (1, gh, gw))."""
  p, m, t = config.patch_size, config.merge_size, config.temporal_patch_size
  c, height, width = image_chw.shape
  gh, gw = height // p, width // p
  x = image_chw.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
  x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (t,) + x.shape[5:])
  return np.ascontiguousarray(x.reshape(gh * gw, c * t * p * p)), (1, gh, gw)


def preprocess(image, config=ImageProcessorConfig()):
  """A PIL image (or HWC uint8 array) -> (patches float32 [n, 1176], grid (1, gh, gw))."""
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  image = image.convert("RGB")
  factor = config.patch_size * config.merge_size
  height, width = smart_resize(image.height, image.width, factor, config.min_pixels,
                               config.max_pixels)
  resized = np.asarray(image.resize((width, height), resample=Image.BICUBIC))
  scaled = (resized.astype(np.float64) / 255.0).astype(np.float32)
  normed = (scaled - np.asarray(config.image_mean, np.float32)) / np.asarray(config.image_std,
                                                                              np.float32)
  return patchify(normed.transpose(2, 0, 1), config)


def load_image(path):
  """Opens an image file, with an error naming the file."""
  try:
    with Image.open(path) as image:
      return image.convert("RGB")
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: not a readable image ({e})") from e
