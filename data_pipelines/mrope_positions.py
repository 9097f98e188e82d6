"""3-D M-RoPE positions for interleaved text and image spans (Hugging Face's `get_rope_index`).

Text tokens advance all three axes together. An image span of merged grid (t, h, w) starting
at position p gets (p + frame, p + row, p + col) for each token (row-major), and the text
after it resumes at p + max(h, w). `span_positions` does this for an explicit list of spans
(STARFlow2 builds its visual spans this way); `rope_index` finds the image spans in token ids.
During decoding, a token appended after `n` real tokens sits at `n + rope_delta`.
"""

import numpy as np


def image_span(start, merged_thw):
  """Positions [3, t·h·w] of an image span whose first token is at `start`."""
  t, h, w = merged_thw
  tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
  return np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + start


def span_positions(spans):
  """Positions [3, L] and the next free position for spans [("text", length) |
  ("image", (t, h, w) merged grid), ...] laid end to end."""
  parts, current = [], 0
  for kind, value in spans:
    if kind == "text":
      parts.append(np.broadcast_to(np.arange(value) + current, (3, value)))
      current += value
    elif kind == "image":
      parts.append(image_span(current, value))
      current += max(value[1], value[2])
    else:
      raise ValueError(f"unknown span kind {kind!r}: use 'text' or 'image'")
  positions = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), np.int64)
  return positions, current


def _spans_of_row(ids, image_token_id, grids, merge):
  """Split one row of real token ids into text and image spans, consuming `grids`."""
  spans, start = [], 0
  is_image = ids == image_token_id
  boundaries = np.flatnonzero(np.diff(is_image.astype(np.int8))) + 1
  for end in list(boundaries) + [len(ids)]:
    if end == start:
      continue
    if is_image[start]:
      if not grids:
        raise ValueError("more image spans in input_ids than entries in image_grid_thw")
      t, h, w = grids.pop(0)
      merged = (int(t), int(h) // merge, int(w) // merge)
      if np.prod(merged) != end - start:
        raise ValueError(f"an image span of {end - start} <|image_pad|> tokens does not match "
                         f"its grid {(t, h, w)} ({np.prod(merged)} merged tokens)")
      spans.append(("image", merged))
    else:
      spans.append(("text", end - start))
    start = end
  return spans


def rope_index(ids_bt, valid_bt, image_grid_thw, image_token_id, spatial_merge_size):
  """(positions [3, B, T] int32, rope_delta [B] int32) as `get_rope_index` computes them.

  Images are taken from `image_grid_thw` in order of appearance (row by row). Padding slots
  (valid False) get position 0 and are skipped when counting positions.
  """
  ids_bt, valid_bt = np.asarray(ids_bt), np.asarray(valid_bt, bool)
  grids = [tuple(g) for g in np.asarray(image_grid_thw if image_grid_thw is not None else
                                        np.zeros((0, 3)), np.int64).reshape(-1, 3)]
  positions = np.zeros((3,) + ids_bt.shape, np.int32)
  deltas = np.zeros(ids_bt.shape[0], np.int32)
  for b in range(ids_bt.shape[0]):
    real = ids_bt[b][valid_bt[b]]
    pos, _ = span_positions(_spans_of_row(real, image_token_id, grids, spatial_merge_size))
    positions[:, b, valid_bt[b]] = pos
    deltas[b] = (pos.max() + 1 - len(real)) if len(real) else 0
  if grids:
    raise ValueError(f"{len(grids)} entries of image_grid_thw were not used by any image span")
  return positions, deltas
