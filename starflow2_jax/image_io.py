"""Image grids and PNG files for samples."""

import os

import numpy as np
from PIL import Image


def image_grid(images_rchwc, pad=2):
  """[rows, cols, H, W, C] uint8 -> one [rows·(H+pad), cols·(W+pad), C] image (white gaps)."""
  rows, cols, h, w, c = images_rchwc.shape
  padded = np.pad(images_rchwc, ((0, 0), (0, 0), (0, pad), (0, pad), (0, 0)), constant_values=255)
  return padded.transpose(0, 2, 1, 3, 4).reshape(rows * (h + pad), cols * (w + pad), c)


def save_png(image_hwc, path):
  """Writes a uint8 [H, W, C] image (C = 1 or 3) as PNG, creating the directory."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  image = np.asarray(image_hwc)
  Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(path)
  return path
