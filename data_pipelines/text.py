"""Tokenizers for the standalone caption models and the demo's tiny language model.

Each maps text to ids (`ids`), to fixed-length ids with a validity mask (`encode`) and back
(`decode`).

* `ByteTokenizer`: UTF-8 bytes (byte b -> b + 1, 257 ids); needs no vocabulary, so any text
  works, at the price of one token per byte.
* `WordTokenizer`: a fixed word list from the config (pad 0, unknown 1, then the words), so
  "a photo of a sneaker" is 5 tokens instead of 20: a shorter context makes every training step
  cheaper. Words are runs of letters, digits, `-`, `/` and `'`; other non-space characters are
  one token each. Words outside the list map to the unknown id.
* `HFTokenizer`: a Hugging Face `tokenizer.json` (Qwen2.5-VL's, in a converted checkpoint's
  directory): what real STARFlow2 runs read their records with. Loaded when first used.
"""

import os
import re

import numpy as np


def _fixed_length(token_ids, max_len, pad_id):
  if max_len < 1:
    raise ValueError(f"max_len must be >= 1, got {max_len}")
  token_ids = np.asarray(token_ids, np.int32)[:max_len]
  ids = np.full(max_len, pad_id, dtype=np.int32)
  ids[: token_ids.size] = token_ids
  mask = np.zeros(max_len, dtype=bool)
  mask[: token_ids.size] = True
  return ids, mask


def _check_range(ids, vocab_size):
  ids = np.asarray(ids).reshape(-1)
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    raise ValueError(f"token ids must be in [0, {vocab_size}), got {ids.min()}..{ids.max()}")
  return ids


class ByteTokenizer:
  """Maps text to fixed-length UTF-8 byte ids with a validity mask."""

  pad_id = 0
  byte_offset = 1
  vocab_size = 257

  def encode(self, text, max_len):
    """Returns (ids int32[max_len], mask bool[max_len]); right-padded, truncated at max_len bytes.

    Truncation may cut a multi-byte character; `decode` then replaces the broken tail.
    """
    return _fixed_length(self.ids(text), max_len, self.pad_id)

  def ids(self, text):
    """Variable-length ids of `text` (no padding)."""
    return list(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
                + self.byte_offset)

  def decode(self, ids):
    """Inverts `encode`, dropping pad ids; invalid UTF-8 becomes U+FFFD."""
    ids = _check_range(ids, self.vocab_size)
    data = ids[ids != self.pad_id] - self.byte_offset
    return data.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


_WORD = re.compile(r"[\w'/-]+|[^\w\s]")


def split_words(text):
  """The word and punctuation tokens of `text`, lower-cased."""
  return _WORD.findall(text.lower())


class WordTokenizer:
  """Maps text to ids of a fixed word list: pad 0, unknown 1, then `words` in order, then
  `specials` (markers such as `<|vision_start|>`, recognised verbatim in text: `special_id`)."""

  pad_id = 0
  unk_id = 1
  unk_token = "<unk>"

  def __init__(self, words, specials=()):
    words = [w.lower() for w in words]
    for w in words:
      if split_words(w) != [w]:
        raise ValueError(f"vocabulary entry {w!r} is not a single word or punctuation mark")
    if len(set(words)) != len(words) or len(set(specials)) != len(specials):
      raise ValueError("vocabulary has repeated words or special tokens")
    self.words = tuple(words)
    self.specials = tuple(specials)
    self._ids = {w: i + 2 for i, w in enumerate(words)}
    self._special_ids = {s: len(words) + 2 + i for i, s in enumerate(specials)}
    self.vocab_size = len(words) + len(specials) + 2
    self._special_pattern = re.compile(
        "(" + "|".join(re.escape(t) for t in self.specials) + ")") if self.specials else None

  def special_id(self, token):
    if token not in self._special_ids:
      raise KeyError(f"{token!r} is not one of the special tokens {self.specials}")
    return self._special_ids[token]

  def ids(self, text):
    """Variable-length ids of `text` (no padding); special tokens written out in the text
    (e.g. "<|vision_start|>") map to their ids."""
    if not self.specials:
      return [self._ids.get(w, self.unk_id) for w in split_words(text)]
    out = []
    for piece in self._special_pattern.split(text):
      if piece in self._special_ids:
        out.append(self._special_ids[piece])
      else:
        out += [self._ids.get(w, self.unk_id) for w in split_words(piece)]
    return out

  def encode(self, text, max_len):
    """Returns (ids int32[max_len], mask bool[max_len]); right-padded, truncated at max_len."""
    return _fixed_length(self.ids(text), max_len, self.pad_id)

  def decode(self, ids):
    """Words separated by spaces (none before punctuation), dropping pad ids."""
    ids = _check_range(ids, self.vocab_size)
    text = ""
    for i in ids[ids != self.pad_id]:
      token = (self.unk_token if i == self.unk_id else self.words[i - 2] if i < len(self.words) + 2
               else self.specials[i - 2 - len(self.words)])
      glue = " " if text and (token[0].isalnum() or token[0] == "<") else ""
      text += glue + token
    return text


def vocabulary(texts):
  """The distinct words of `texts` in order of first appearance (a `WordTokenizer` list)."""
  return list(dict.fromkeys(w for t in texts for w in split_words(t)))


class HFTokenizer:
  """A Hugging Face `tokenizer.json` (e.g. Qwen2.5-VL's); `pad_token` is its padding id."""

  def __init__(self, path, pad_token="<|endoftext|>"):
    import tokenizers   # only runs that read real text need it
    if not os.path.isfile(path or ""):
      raise FileNotFoundError(f"tokenizer file {path!r} does not exist (config.data."
                              "tokenizer_json: a converted checkpoint's tokenizer.json)")
    self._tokenizer = tokenizers.Tokenizer.from_file(path)
    self.pad_id = self.special_id(pad_token)
    self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

  def special_id(self, token):
    token_id = self._tokenizer.token_to_id(token)
    if token_id is None:
      raise ValueError(f"{token!r} is not in the tokenizer's vocabulary")
    return token_id

  def ids(self, text):
    """Variable-length ids of `text` (no padding, no special tokens added)."""
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def encode(self, text, max_len):
    return _fixed_length(self.ids(text), max_len, self.pad_id)

  def decode(self, ids):
    ids = _check_range(ids, self.vocab_size)
    return self._tokenizer.decode([int(i) for i in ids if i != self.pad_id])


def build_tokenizer(config):
  """The tokenizer a data config names: `tokenizer="bytes"`, `"words"` with `words=[...]`
  (and optionally `special_tokens=[...]`), or `"hf"` with `tokenizer_json` (a path)."""
  kind = config.get("tokenizer", "bytes")
  if kind == "bytes":
    return ByteTokenizer()
  if kind == "words":
    if not config.get("words"):
      raise ValueError("config.data.tokenizer='words' needs the word list in config.data.words")
    return WordTokenizer(list(config["words"]), tuple(config.get("special_tokens", ())))
  if kind == "hf":
    return HFTokenizer(config.get("tokenizer_json"))
  raise ValueError(f"config.data.tokenizer={kind!r}: use 'bytes', 'words' or 'hf'")
