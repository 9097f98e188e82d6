"""Record -> example transforms: what the Grain pipeline maps each decoded record to.

`CaptionImageExample`: one caption and one image -> fixed-shape arrays (the caption-to-image
baseline). `InterleavedExample`: any interleaved record -> fixed-shape sequence arrays for
the Pretzel model (SPEC §1); `SequenceBuilder` lays out prompts for the sampler the same way.
Both raise `pipeline.RecordMismatchError` for a record that does not fit (it is skipped).

Interleaved layout:

Every image becomes the span `<|vision_start|> v_1 … v_N <|vision_end|>`, its N visual
positions laid out on the latent grid (gh, gw) with Qwen2.5-VL's 3-D M-RoPE positions, as
Qwen places its own image tokens (`positions.span_positions`). Text is tokenised by any
`str -> ids` function. Sequences are right-padded to `max_length`; images to `max_images`.

Which parts are trained: the first `prompt_segments` segments of a record are its prompt
(meta "prompt_segments" overrides the layout's default), the rest are targets — target text
for the next-token loss, target images for the flow loss. A record whose prompt does not
come first (a multi-turn conversation: a question after an answer) says so per segment with
meta "target_segments", a string of one '1' (target) or '0' (prompt) per segment, which
then takes precedence over "prompt_segments". A target image's `<|vision_start|>` and
`<|vision_end|>` are text targets too (the model learns when to draw). Prompt text — every
non-target text segment, wherever it stands — is what classifier-free guidance drops.

One example (numpy), as the Grain pipeline batches it:
  ids [T] int32           token ids; visual positions hold `image_pad_id`
  valid [T] bool          real positions (False: padding)
  positions [3, T] int32  M-RoPE (t, row, col) positions (the model wants [3, B, T])
  is_visual [T] bool      the per-position modality
  text_target [T] bool    tokens the next-token loss predicts
  prompt_text [T] bool    prompt text (dropped for classifier-free guidance)
  images [M, H, W, C] uint8, image_positions [M, N] int32 (sequence index of each visual
  element), image_valid [M] bool, image_target [M] bool
  image_latents [M, N, D] float32  only when the layout names `latent_shape`: each image's
                          precomputed latent (`starflow2 precompute-latents`), read from
                          the record instead of encoding the pixels at every step
"""

import dataclasses
from typing import Callable

import numpy as np

from data_pipelines import mrope_positions
from data_pipelines import pipeline
from data_pipelines import records
from data_pipelines import text


@dataclasses.dataclass(frozen=True)
class SequenceLayout:
  """The fixed shapes and special ids of a batch of interleaved sequences."""
  max_length: int            # T
  max_images: int            # M
  grid: tuple                # (gh, gw): the latent grid of one image, N = gh · gw
  image_shape: tuple         # (H, W, C) of the stored images
  vision_start_id: int
  vision_end_id: int
  image_pad_id: int
  pad_id: int
  latent_shape: tuple | None = None   # (N, D): images carry precomputed latents

  @property
  def num_elements(self):
    return self.grid[0] * self.grid[1]


class SequenceBuilder:
  """Accumulates one sequence segment by segment (records for training, prompts for sampling)."""

  def __init__(self, layout):
    self.layout = layout
    self.ids, self.text_target, self.prompt_text, self.is_visual = [], [], [], []
    self.spans, self.images, self.image_positions, self.image_target = [], [], [], []
    self.latents = []

  def _text(self, ids, target, prompt):
    self.ids += list(ids)
    self.text_target += [target] * len(ids)
    self.prompt_text += [prompt] * len(ids)
    self.is_visual += [False] * len(ids)
    self.spans.append(("text", len(ids)))

  def add_text(self, ids, target):
    self._text(ids, target, prompt=not target)

  def add_image(self, image, target, latent=None):
    lay = self.layout
    if lay.latent_shape is not None:
      self.latents.append(latent)
    self._text([lay.vision_start_id], target, prompt=False)
    start = len(self.ids)
    n = lay.num_elements
    self.ids += [lay.image_pad_id] * n
    self.text_target += [False] * n
    self.prompt_text += [False] * n
    self.is_visual += [True] * n
    self.spans.append(("image", (1,) + tuple(lay.grid)))
    self.images.append(image)
    self.image_positions.append(np.arange(start, start + n))
    self.image_target.append(target)
    self._text([lay.vision_end_id], target, prompt=False)

  def begin_image(self):
    """A bare `<|vision_start|>`: a prompt that ends here makes the sampler draw an image."""
    self._text([self.layout.vision_start_id], target=False, prompt=False)

  def arrays(self):
    lay = self.layout
    length, t = len(self.ids), lay.max_length
    pad = lambda values, fill, dtype: np.asarray(
        list(values) + [fill] * (t - length), dtype)
    positions = np.zeros((3, t), np.int32)
    positions[:, :length], _ = mrope_positions.span_positions(self.spans)
    m, n = lay.max_images, lay.num_elements
    images = np.zeros((m,) + tuple(lay.image_shape), np.uint8)
    image_positions = np.zeros((m, n), np.int32)
    image_target = np.zeros((m,), bool)
    k = len(self.images)
    if k:
      images[:k] = np.stack(self.images)
      image_positions[:k] = np.stack(self.image_positions)
      image_target[:k] = self.image_target
    arrays = {}
    if lay.latent_shape is not None:
      arrays["image_latents"] = np.zeros((m,) + tuple(lay.latent_shape), np.float32)
      if k:
        arrays["image_latents"][:k] = np.stack(self.latents)
    return dict(
        arrays,
        ids=pad(self.ids, lay.pad_id, np.int32), valid=pad([True] * length, False, bool),
        positions=positions, is_visual=pad(self.is_visual, False, bool),
        text_target=pad(self.text_target, False, bool),
        prompt_text=pad(self.prompt_text, False, bool), images=images,
        image_positions=image_positions, image_valid=np.arange(m) < k, image_target=image_target)


@dataclasses.dataclass(frozen=True)
class InterleavedExample:
  """Maps an interleaved record to fixed-shape sequence arrays (see the module docstring).

  Raises `pipeline.RecordMismatchError` (the pipeline skips the record) when it does not
  fit: too long, too many images, or an image of another shape.
  """
  layout: SequenceLayout
  encode_text: Callable      # str -> sequence of token ids
  prompt_segments: int = 0

  def __call__(self, record):
    lay = self.layout
    builder = SequenceBuilder(lay)
    for segment, target in zip(record.segments, self._targets(record)):
      if isinstance(segment, records.TextSegment):
        builder.add_text(self.encode_text(segment.text), target)
        continue
      builder.add_image(_pixels(segment, lay.image_shape), target, self._latent(segment))
    if len(builder.images) > lay.max_images:
      raise pipeline.RecordMismatchError(
          f"{len(builder.images)} images, more than max_images={lay.max_images}")
    if len(builder.ids) > lay.max_length:
      raise pipeline.RecordMismatchError(
          f"{len(builder.ids)} positions, more than max_length={lay.max_length}")
    return builder.arrays()

  def _targets(self, record):
    """Per segment, whether it is a target: meta "target_segments" when present, else every
    segment after the first "prompt_segments" (meta, or this transform's default)."""
    flags = record.meta.get("target_segments")
    if flags is not None:
      if (not isinstance(flags, str) or len(flags) != len(record.segments)
          or not set(flags) <= {"0", "1"}):
        raise pipeline.RecordMismatchError(
            f"meta 'target_segments' is {flags!r}, not one '0' or '1' per segment "
            f"({len(record.segments)})")
      return [flag == "1" for flag in flags]
    prompt = record.meta.get("prompt_segments", self.prompt_segments)
    if not isinstance(prompt, int) or prompt < 0:
      raise pipeline.RecordMismatchError(f"meta 'prompt_segments' is {prompt!r}, not an int >= 0")
    return [i >= prompt for i in range(len(record.segments))]

  def _latent(self, segment):
    """The image's precomputed latent when the layout reads them (else None)."""
    shape = self.layout.latent_shape
    if shape is None:
      return None
    latent = segment.arrays.get("latent")
    if latent is None:
      raise pipeline.RecordMismatchError(
          "an image has no precomputed latent (run `starflow2 precompute-latents` on these "
          "records, or set config.data.precomputed_latents=False)")
    if latent.shape != tuple(shape):
      raise pipeline.RecordMismatchError(
          f"precomputed latent of shape {latent.shape}, expected {tuple(shape)} (N, D)")
    return latent


def _pixels(segment, image_shape):
  """An image segment's uint8 pixels, which must have `image_shape` (H, W, C)."""
  image = segment.to_array()
  if image.shape != tuple(image_shape):
    raise pipeline.RecordMismatchError(
        f"image shape {image.shape}, expected {tuple(image_shape)} (HxWxC)")
  return image


def _label(record):
  """meta "label" as int32 (-1 when absent)."""
  label = record.meta.get("label", -1)
  if not isinstance(label, int):
    raise pipeline.RecordMismatchError(f"meta 'label' is {label!r}, not an int")
  return np.int32(label)


@dataclasses.dataclass(frozen=True)
class CaptionImageExample:
  """Maps a one-caption, one-image record to fixed-shape arrays for text-image training.

  Output: {"image": uint8[H, W, C], "caption_ids": int32[L], "caption_mask": bool[L],
  "label": int32 (meta "label", or -1)}. Raises pipeline.RecordMismatchError on anything else.
  """

  image_shape: tuple
  max_caption_len: int
  tokenizer: object = dataclasses.field(default_factory=text.ByteTokenizer)  # text.*Tokenizer

  def __call__(self, record):
    texts = [s for s in record.segments if isinstance(s, records.TextSegment)]
    images = [s for s in record.segments if isinstance(s, records.ImageSegment)]
    if len(texts) != 1 or len(images) != 1:
      raise pipeline.RecordMismatchError(
          f"expected one text and one image segment, got {len(texts)} text and "
          f"{len(images)} image")
    ids, mask = self.tokenizer.encode(texts[0].text, self.max_caption_len)
    return {"image": _pixels(images[0], self.image_shape), "caption_ids": ids,
            "caption_mask": mask, "label": _label(record)}


@dataclasses.dataclass(frozen=True)
class ImageExample:
  """Maps a record to its first image and its label, for image-only training (the FAE,
  DINOv2 pre-training).

  Output: {"image": uint8[H, W, C], "label": int32 (meta "label", or -1)}. Raises
  pipeline.RecordMismatchError when the record has no image or an image of another shape.
  """

  image_shape: tuple

  def __call__(self, record):
    images = [s for s in record.segments if isinstance(s, records.ImageSegment)]
    if not images:
      raise pipeline.RecordMismatchError("the record has no image segment")
    return {"image": _pixels(images[0], self.image_shape), "label": _label(record)}
