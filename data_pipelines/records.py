"""The interleaved record: an ordered list of text and image segments plus metadata.

Every training stage reads the same on-disk format, so a dataset is written once and
consumed by text-to-image, image-to-text and interleaved stages alike. A record is
serialised with msgpack as

  {"version": 1,
   "segments": [{"kind": "text", "text": str}
                | {"kind": "image", "png": bytes, ["arrays": {name: ARRAY}]}, ...],
   "meta": {str: int | str | float}}

Images are stored as PNG bytes (lossless, compact for small images, decodable anywhere).
An image may carry float32 arrays computed from it once (`starflow2 precompute-latents`:
its latent [N, D], its DINOv2 features [N, F]), each as
ARRAY = {"shape": [int, ...], "data": little-endian float32 bytes}.
"""

import dataclasses
import io

import msgpack
import numpy as np
from PIL import Image

from data_pipelines import png

FORMAT_VERSION = 1

_META_TYPES = (int, str, float)
_ARRAY_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_DECODED_MODES = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}


class MalformedRecordError(ValueError):
  """Raised when bytes are not a valid interleaved record (bad msgpack, schema, PNG)."""

  def __init__(self, reason):
    super().__init__(reason)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class TextSegment:
  """A run of text."""

  text: str

  def __post_init__(self):
    if not isinstance(self.text, str):
      raise TypeError(f"TextSegment.text must be str, got {type(self.text).__name__}")


@dataclasses.dataclass(frozen=True, eq=False)
class ImageSegment:
  """An image kept as PNG bytes; decoded only when a consumer asks for pixels."""

  png: bytes
  arrays: dict = dataclasses.field(default_factory=dict)   # name -> float32 ndarray

  def __post_init__(self):
    if not isinstance(self.png, bytes):
      raise TypeError(f"ImageSegment.png must be bytes, got {type(self.png).__name__}")
    arrays = {}
    for name, value in dict(self.arrays).items():
      if not isinstance(name, str):
        raise TypeError(f"ImageSegment.arrays key {name!r} must be str")
      arrays[name] = np.asarray(value, np.float32)
    object.__setattr__(self, "arrays", arrays)

  def __eq__(self, other):
    return (isinstance(other, ImageSegment) and self.png == other.png
            and self.arrays.keys() == other.arrays.keys()
            and all(np.array_equal(a, other.arrays[k]) for k, a in self.arrays.items()))

  def with_arrays(self, **arrays):
    """The same image with `arrays` added (replacing arrays of the same name)."""
    return ImageSegment(self.png, {**self.arrays, **arrays})

  @classmethod
  def from_array(cls, array):
    """PNG-encodes a uint8 array of shape [H, W] or [H, W, C] with C in (1, 3, 4)."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
      raise ValueError(f"image array must be uint8, got {array.dtype}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in _ARRAY_MODES)):
      raise ValueError(f"image array must be [H, W] or [H, W, 1|3|4], got shape {array.shape}")
    return cls(png.encode_png(array))

  def to_array(self):
    """Decodes to uint8 [H, W, C]; greyscale gives C == 1, so the result is always 3-D."""
    try:
      with Image.open(io.BytesIO(self.png)) as image:
        image.load()
        image_format, mode = image.format, image.mode
        array = np.asarray(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
      raise MalformedRecordError(f"undecodable PNG: {type(e).__name__}: {e}") from e
    if image_format != "PNG":
      raise MalformedRecordError(f"image segment holds {image_format}, not PNG")
    if mode not in _DECODED_MODES:
      raise MalformedRecordError(
          f"unsupported PNG mode {mode!r} (expected one of {sorted(_DECODED_MODES)})")
    array = array.astype(np.uint8, copy=False)
    return array[..., None] if array.ndim == 2 else array


@dataclasses.dataclass(frozen=True)
class InterleavedRecord:
  """Ordered segments plus a flat metadata dict (e.g. {"label": 3, "index": 17})."""

  segments: tuple
  meta: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    object.__setattr__(self, "segments", tuple(self.segments))
    object.__setattr__(self, "meta", dict(self.meta))
    for i, segment in enumerate(self.segments):
      if not isinstance(segment, (TextSegment, ImageSegment)):
        raise TypeError(f"segment {i} is {type(segment).__name__}, not TextSegment/ImageSegment")
    for key, value in self.meta.items():
      _check_meta_item(key, value, error=TypeError)


def _check_meta_item(key, value, error):
  """Meta keys are str and values int/str/float (bool excluded: it would not round trip)."""
  if not isinstance(key, str):
    raise error(f"meta key {key!r} must be str")
  if isinstance(value, bool) or not isinstance(value, _META_TYPES):
    raise error(f"meta[{key!r}] must be int, str or float, got {type(value).__name__}")


def _encode_segment(segment):
  if isinstance(segment, TextSegment):
    return {"kind": "text", "text": segment.text}
  item = {"kind": "image", "png": segment.png}
  if segment.arrays:
    item["arrays"] = {name: {"shape": list(a.shape), "data": a.astype("<f4").tobytes()}
                      for name, a in segment.arrays.items()}
  return item


def encode_record(record):
  """Serialises an InterleavedRecord to msgpack bytes."""
  payload = {
      "version": FORMAT_VERSION,
      "segments": [_encode_segment(s) for s in record.segments],
      "meta": record.meta,
  }
  return msgpack.packb(payload, use_bin_type=True)


def _expect(condition, reason):
  if not condition:
    raise MalformedRecordError(reason)


def _decode_segment(i, item):
  _expect(isinstance(item, dict), f"segment {i} is {type(item).__name__}, not a map")
  kind = item.get("kind")
  if kind == "text":
    _expect(set(item) == {"kind", "text"}, f"text segment {i} has keys {sorted(item)}")
    _expect(isinstance(item["text"], str), f"text segment {i}: 'text' is not a string")
    return TextSegment(item["text"])
  if kind == "image":
    _expect(set(item) in ({"kind", "png"}, {"kind", "png", "arrays"}),
            f"image segment {i} has keys {sorted(item)}")
    _expect(isinstance(item["png"], bytes), f"image segment {i}: 'png' is not bytes")
    return ImageSegment(item["png"], _decode_arrays(i, item.get("arrays", {})))
  raise MalformedRecordError(f"segment {i} has unknown kind {kind!r}")


def _decode_arrays(i, arrays):
  _expect(isinstance(arrays, dict), f"image segment {i}: 'arrays' is not a map")
  decoded = {}
  for name, a in arrays.items():
    where = f"image segment {i}: array {name!r}"
    _expect(isinstance(a, dict) and set(a) == {"shape", "data"},
            f"{where} is not a map of shape and data")
    shape, data = a["shape"], a["data"]
    _expect(isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape),
            f"{where}: shape {shape!r} is not a list of sizes")
    _expect(isinstance(data, bytes) and len(data) == 4 * int(np.prod(shape)),
            f"{where}: {len(data) if isinstance(data, bytes) else 'no'} bytes of data for "
            f"shape {shape} (float32)")
    decoded[name] = np.frombuffer(data, "<f4").reshape(shape)
  return decoded


def decode_record(data):
  """Parses msgpack bytes into an InterleavedRecord, raising MalformedRecordError."""
  try:
    payload = msgpack.unpackb(data, raw=False)
  except (ValueError, TypeError, msgpack.UnpackException) as e:
    raise MalformedRecordError(f"not valid msgpack: {type(e).__name__}: {e}") from e
  _expect(isinstance(payload, dict), f"top level is {type(payload).__name__}, not a map")
  _expect(set(payload) == {"version", "segments", "meta"},
          f"top-level keys are {sorted(map(str, payload))}, expected meta/segments/version")
  version = payload["version"]
  _expect(type(version) is int and version == FORMAT_VERSION,
          f"unsupported version {version!r} (this code reads {FORMAT_VERSION})")
  _expect(isinstance(payload["segments"], list), "'segments' is not a list")
  _expect(isinstance(payload["meta"], dict), "'meta' is not a map")
  for key, value in payload["meta"].items():
    _check_meta_item(key, value, error=MalformedRecordError)
  segments = tuple(_decode_segment(i, s) for i, s in enumerate(payload["segments"]))
  return InterleavedRecord(segments, payload["meta"])
