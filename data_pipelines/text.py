"""A byte-level tokenizer: needs no vocabulary files, so tests and toy runs are self-contained.

Token ids are UTF-8 byte values shifted past the special ids: pad = 0, byte b -> b + 1,
so the vocabulary has 257 entries.
"""

import numpy as np


class ByteTokenizer:
  """Maps text to fixed-length UTF-8 byte ids with a validity mask."""

  pad_id = 0
  byte_offset = 1
  vocab_size = 257

  def encode(self, text, max_len):
    """Returns (ids int32[max_len], mask bool[max_len]); right-padded, truncated at max_len bytes.

    Truncation may cut a multi-byte character; `decode` then replaces the broken tail.
    """
    if max_len < 1:
      raise ValueError(f"max_len must be >= 1, got {max_len}")
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)[:max_len]
    ids = np.full(max_len, self.pad_id, dtype=np.int32)
    ids[: data.size] = data.astype(np.int32) + self.byte_offset
    mask = np.zeros(max_len, dtype=bool)
    mask[: data.size] = True
    return ids, mask

  def decode(self, ids):
    """Inverts `encode`, dropping pad ids; invalid UTF-8 becomes U+FFFD."""
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f"token ids must be in [0, {self.vocab_size}), got {ids.min()}..{ids.max()}")
    data = ids[ids != self.pad_id] - self.byte_offset
    return data.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
