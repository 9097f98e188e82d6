"""A fast lossless PNG encoder for uint8 images: what records store.

PIL's encoder spends most of its time choosing a filter for every row; at the records'
sizes that, not the compression, dominated a conversion (15 ms per 256-px photo at PIL's
default, 5.6 ms at zlib level 1). Here every row uses the "Sub" filter (each byte minus the
byte one pixel to its left), computed for the whole image at once in numpy, and zlib level
1 with the run-length strategy: about 4× faster than PIL at level 1, with files no larger on
photos (benchmarks/convert_webdataset.py). Any PNG decoder reads the result.
"""

import struct
import zlib

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPES = {1: 0, 3: 2, 4: 6}    # channels -> PNG colour type (grey, RGB, RGBA)
_SUB_FILTER = 1


def _chunk(kind, data):
  return (struct.pack(">I", len(data)) + kind + data
          + struct.pack(">I", zlib.crc32(kind + data)))


def encode_png(pixels):
  """PNG bytes of uint8 `pixels` [H, W] (grey) or [H, W, C] with C in (1, 3, 4)."""
  pixels = np.ascontiguousarray(pixels)
  if pixels.dtype != np.uint8:
    raise ValueError(f"PNG pixels must be uint8, got {pixels.dtype}")
  if pixels.ndim == 2:
    pixels = pixels[..., None]
  if pixels.ndim != 3 or pixels.shape[-1] not in _COLOR_TYPES:
    raise ValueError(f"PNG pixels must be [H, W] or [H, W, 1|3|4], got {pixels.shape}")
  height, width, channels = pixels.shape
  rows = pixels.reshape(height, width * channels)
  scanlines = np.empty((height, width * channels + 1), np.uint8)
  scanlines[:, 0] = _SUB_FILTER
  scanlines[:, 1:channels + 1] = rows[:, :channels]
  np.subtract(rows[:, channels:], rows[:, :-channels], out=scanlines[:, channels + 1:])
  compressor = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
  data = compressor.compress(scanlines.tobytes()) + compressor.flush()
  header = struct.pack(">IIBBBBB", width, height, 8, _COLOR_TYPES[channels], 0, 0, 0)
  return _SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")
