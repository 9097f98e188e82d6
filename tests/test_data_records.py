"""Tests for the interleaved record format and the byte tokenizer."""

import io

import msgpack
import numpy as np
import pytest
from PIL import Image

from data_pipelines import png
from data_pipelines import records
from data_pipelines import text


def _image(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


@pytest.mark.parametrize("shape, decoded_shape", [
    ((5, 7), (5, 7, 1)),
    ((5, 7, 1), (5, 7, 1)),
    ((5, 7, 3), (5, 7, 3)),
    ((5, 7, 4), (5, 7, 4)),
])
def test_image_segment_round_trips_pixels_as_3d(shape, decoded_shape):
  array = _image(shape)
  decoded = records.ImageSegment.from_array(array).to_array()
  assert decoded.dtype == np.uint8 and decoded.shape == decoded_shape
  np.testing.assert_array_equal(decoded.reshape(shape), array)


def test_record_round_trip_keeps_segment_order_and_meta():
  record = records.InterleavedRecord(
      [records.TextSegment("a cat"), records.ImageSegment.from_array(_image((4, 4, 3))),
       records.TextSegment("then ünïcode ✓"), records.ImageSegment.from_array(_image((2, 3)))],
      {"label": 3, "source": "unit", "score": 0.5})
  decoded = records.decode_record(records.encode_record(record))
  assert decoded == record
  assert [type(s).__name__ for s in decoded.segments] == [
      "TextSegment", "ImageSegment", "TextSegment", "ImageSegment"]


def test_record_rejects_bad_segments_and_meta():
  with pytest.raises(TypeError, match="segment 0"):
    records.InterleavedRecord(["just a string"], {})
  with pytest.raises(TypeError, match="meta\\['flag'\\]"):
    records.InterleavedRecord([], {"flag": True})
  with pytest.raises(ValueError, match="uint8"):
    records.ImageSegment.from_array(np.zeros((2, 2), np.float32))
  with pytest.raises(ValueError, match="shape"):
    records.ImageSegment.from_array(np.zeros((2, 2, 2, 2), np.uint8))


def _pack(payload):
  return msgpack.packb(payload, use_bin_type=True)


_GOOD = {"version": 1, "segments": [{"kind": "text", "text": "hi"}], "meta": {}}


@pytest.mark.parametrize("data, reason", [
    (b"", "not valid msgpack"),
    (b"\xc1", "not valid msgpack"),
    (_pack(_GOOD)[:-2], "not valid msgpack"),
    (_pack(_GOOD) + b"extra", "not valid msgpack"),
    (_pack([1, 2]), "not a map"),
    (_pack({**_GOOD, "version": 2}), "unsupported version 2"),
    (_pack({**_GOOD, "version": True}), "unsupported version"),
    (_pack({"version": 1, "segments": []}), "top-level keys"),
    (_pack({**_GOOD, "segments": [{"kind": "video", "mp4": b""}]}), "unknown kind 'video'"),
    (_pack({**_GOOD, "segments": [{"kind": "text"}]}), "text segment 0 has keys"),
    (_pack({**_GOOD, "segments": [{"kind": "image", "png": "str"}]}), "'png' is not bytes"),
    (_pack({**_GOOD, "segments": "text"}), "'segments' is not a list"),
    (_pack({**_GOOD, "meta": {"label": [1]}}), "meta\\['label'\\]"),
])
def test_decode_rejects_malformed_bytes(data, reason):
  with pytest.raises(records.MalformedRecordError, match=reason) as info:
    records.decode_record(data)
  assert isinstance(info.value, ValueError)


def test_to_array_rejects_bad_or_non_png_bytes():
  png = records.ImageSegment.from_array(_image((8, 8, 3))).png
  with pytest.raises(records.MalformedRecordError, match="undecodable PNG"):
    records.ImageSegment(png[: len(png) // 2]).to_array()
  jpeg = io.BytesIO()
  Image.fromarray(_image((8, 8, 3))).save(jpeg, format="JPEG")
  with pytest.raises(records.MalformedRecordError, match="JPEG, not PNG"):
    records.ImageSegment(jpeg.getvalue()).to_array()


def test_byte_tokenizer_pads_truncates_and_round_trips():
  tokenizer = text.ByteTokenizer()
  ids, mask = tokenizer.encode("héllo", max_len=8)
  assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape == (8,)
  np.testing.assert_array_equal(ids[:6], np.frombuffer("héllo".encode(), np.uint8) + 1)
  np.testing.assert_array_equal(mask, [True] * 6 + [False] * 2)
  assert ids[6:].tolist() == [tokenizer.pad_id] * 2
  assert tokenizer.decode(ids) == "héllo"
  short_ids, short_mask = tokenizer.encode("abcdef", max_len=3)
  assert tokenizer.decode(short_ids) == "abc" and short_mask.all()
  assert int(ids.max()) < tokenizer.vocab_size == 257
  with pytest.raises(ValueError, match="token ids"):
    tokenizer.decode([257])


def test_word_tokenizer_ids_unknowns_specials_and_decoding():
  words = text.vocabulary(["a photo of a t-shirt/top", "what is in this picture?"])
  assert words == ["a", "photo", "of", "t-shirt/top", "what", "is", "in", "this", "picture", "?"]
  tokenizer = text.WordTokenizer(words, specials=("<|vision_start|>",))
  assert tokenizer.vocab_size == 2 + len(words) + 1
  ids, mask = tokenizer.encode("A photo of a zebra?", max_len=8)
  np.testing.assert_array_equal(ids, [2, 3, 4, 2, tokenizer.unk_id, 11, 0, 0])
  np.testing.assert_array_equal(mask, [True] * 6 + [False] * 2)
  special = tokenizer.special_id("<|vision_start|>")
  assert special == tokenizer.vocab_size - 1
  assert tokenizer.ids("a<|vision_start|> photo") == [2, special, 3]
  assert tokenizer.decode(list(ids) + [special]) == "a photo of a <unk>? <|vision_start|>"
  assert tokenizer.encode("a a a a", max_len=2)[1].all()
  with pytest.raises(ValueError, match="single word"):
    text.WordTokenizer(["two words"])
  with pytest.raises(ValueError, match="token ids"):
    tokenizer.decode([tokenizer.vocab_size])


def test_build_tokenizer_from_config():
  assert isinstance(text.build_tokenizer({"tokenizer": "bytes"}), text.ByteTokenizer)
  words = text.build_tokenizer({"tokenizer": "words", "words": ["cat"]})
  assert words.ids("cat dog") == [2, words.unk_id]
  with pytest.raises(ValueError, match="config.data.words"):
    text.build_tokenizer({"tokenizer": "words"})
  with pytest.raises(ValueError, match="'bytes', 'words' or 'hf'"):
    text.build_tokenizer({"tokenizer": "bpe"})


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (3, 1, 3), (1, 4, 4), (2, 9, 3)])
def test_png_encoder_is_lossless_for_any_decoder(shape):
  """Records' PNGs (data_pipelines/png.py, Sub filter + zlib RLE) decode, with PIL, to the
  exact pixels in the mode their channel count names; bytes that wrap below 0 included."""
  pixels = np.random.default_rng(len(shape)).integers(0, 256, shape, dtype=np.uint8)
  pixels.flat[:2] = (255, 0)                                    # a wrapping difference
  with Image.open(io.BytesIO(png.encode_png(pixels))) as image:
    assert image.format == "PNG"
    assert image.mode == {1: "L", 3: "RGB", 4: "RGBA"}[shape[2] if len(shape) == 3 else 1]
    decoded = np.asarray(image)
  np.testing.assert_array_equal(decoded, pixels.reshape(decoded.shape))


def test_png_encoder_rejects_what_png_cannot_hold():
  with pytest.raises(ValueError, match="uint8"):
    png.encode_png(np.zeros((2, 2), np.float32))
  with pytest.raises(ValueError, match=r"\[H, W, 1\|3\|4\]"):
    png.encode_png(np.zeros((2, 2, 2), np.uint8))
