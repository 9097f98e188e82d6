"""Encoded image bytes (JPEG, PNG, WebP, …) -> uint8 pixels at the records' resolution.

What every converter does with an image: decode it, convert it to RGB (greyscale stays L),
and with a target size S resize the shorter side to S (bicubic, antialiased) and take the
centre S × S; the original size is returned for the record's meta.
"""

import io
import re

import numpy as np
from PIL import Image


class UnreadableImage(ValueError):
  """The bytes are not a decodable image (unknown format, truncated, too large)."""


def resize_and_crop(image, size):
  """Shorter side to `size` (bicubic, antialiased), then the centre `size` × `size`."""
  scale = size / min(image.width, image.height)
  width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
  image = image.resize((width, height), Image.Resampling.BICUBIC)
  left, top = (width - size) // 2, (height - size) // 2
  return image.crop((left, top, left + size, top + size))


def decode_image(data, image_size=None):
  """(pixels uint8 [H, W] or [H, W, 3], (original width, original height)) of encoded
  `data`, resized and centre-cropped to `image_size` × `image_size` when given.

  Raises:
    UnreadableImage: naming the decoder's complaint.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      image = image.convert("L" if image.mode == "L" else "RGB")
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    # PIL names the in-memory file by its address: dropped, so messages repeat across runs.
    message = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
    raise UnreadableImage(f"{type(e).__name__}: {message}") from e
  original = (image.width, image.height)
  if image_size is not None:
    image = resize_and_crop(image, image_size)
  return np.asarray(image), original
