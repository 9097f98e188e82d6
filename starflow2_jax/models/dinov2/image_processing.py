"""Image files -> DINOv2 input pixels: RGB, N×N, scaled to [0, 1], normalised by mean/std.

Deliberately simpler than transformers' BitImageProcessor (shortest side 256, centre crop
224): an image already N×N is used as is, any other is resized to N×N with PIL's bicubic
filter (antialiased when shrinking; the aspect ratio is not kept, nothing is cropped).
"""

import numpy as np
from PIL import Image

# ImageNet's statistics: DINOv2's preprocessor_config.json, and the default without one.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_rgb(path, image_size):
  """uint8 [image_size, image_size, 3]: grayscale and palette become RGB, alpha is dropped."""
  try:
    with Image.open(path) as image:
      image = image.convert("RGB")
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: not a readable image ({e})") from e
  if image.size != (image_size, image_size):
    image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
  return np.asarray(image, np.uint8)


def normalise(rgb_hwc, mean, std):
  """uint8 RGB -> float32 (x / 255 − mean) / std per channel."""
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  return ((rgb_hwc.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


def load_pixels(path, image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """One image file as normalised float32 pixels [image_size, image_size, 3]."""
  return normalise(load_rgb(path, image_size), mean, std)
