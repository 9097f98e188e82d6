"""The Qwen tokenizer (tokenizer.json via the `tokenizers` library) and the Qwen2-VL chat prompt.

`render_chat` writes exactly the text of the Qwen2-VL / Qwen2.5-VL chat template (a default
system message, `<|im_start|>role\n...<|im_end|>\n` turns, one
`<|vision_start|><|image_pad|><|vision_end|>` per image); `encode_chat` then expands each
`<|image_pad|>` to the image's merged-token count, as the transformers processor does, and
tokenises. Special tokens are matched whole by `tokenizers` (no BOS is added).
"""

import pathlib

DEFAULT_SYSTEM = "You are a helpful assistant."
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
IMAGE_PLACEHOLDER = "<|vision_start|>" + IMAGE_PAD + "<|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|>" + VIDEO_PAD + "<|vision_end|>"
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


class QwenTokenizer:
  """Thin wrapper over `tokenizers.Tokenizer` with the ids generation needs."""

  def __init__(self, tokenizer_json):
    from tokenizers import Tokenizer
    path = pathlib.Path(tokenizer_json)
    if not path.exists():
      raise FileNotFoundError(f"{path}: no tokenizer.json (copy it from the Hugging Face "
                              "checkpoint; `convert-qwen` does)")
    self._tokenizer = Tokenizer.from_file(str(path))

  @classmethod
  def from_dir(cls, directory):
    return cls(pathlib.Path(directory) / "tokenizer.json")

  def token_id(self, token):
    token_id = self._tokenizer.token_to_id(token)
    if token_id is None:
      raise KeyError(f"token {token!r} is not in the tokenizer's vocabulary")
    return token_id

  @property
  def stop_token_ids(self):
    return tuple(self.token_id(t) for t in STOP_TOKENS)

  def encode(self, text):
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids, skip_special_tokens=True):
    return self._tokenizer.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)


def _render_content(content):
  if isinstance(content, str):
    return content
  parts = []
  for part in content:
    kind = part.get("type")
    if kind == "image" or "image" in part or "image_url" in part:
      parts.append(IMAGE_PLACEHOLDER)
    elif kind == "video" or "video" in part:
      parts.append(VIDEO_PLACEHOLDER)
    elif "text" in part:
      parts.append(part["text"])
  return "".join(parts)


def render_chat(messages, add_generation_prompt=True):
  """The prompt text for messages [{"role", "content": str | [{"type": "text"|"image", ...}]}]."""
  text = []
  if messages and messages[0]["role"] != "system":
    text.append(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")
  for message in messages:
    text.append(f"<|im_start|>{message['role']}\n{_render_content(message['content'])}<|im_end|>\n")
  if add_generation_prompt:
    text.append("<|im_start|>assistant\n")
  return "".join(text)


def expand_image_pads(text, tokens_per_image):
  """Replaces the i-th <|image_pad|> by tokens_per_image[i] copies of it."""
  pieces = text.split(IMAGE_PAD)
  if len(pieces) - 1 != len(tokens_per_image):
    raise ValueError(f"the prompt has {len(pieces) - 1} images but {len(tokens_per_image)} "
                     "were given")
  out = [pieces[0]]
  for count, piece in zip(tokens_per_image, pieces[1:]):
    out.append(IMAGE_PAD * count + piece)
  return "".join(out)


def encode_chat(tokenizer, messages, image_grids=(), merge_size=2, add_generation_prompt=True):
  """Token ids of a chat, with each image's pads expanded to t·h·w / merge² tokens."""
  counts = [int(t * h * w) // merge_size ** 2 for t, h, w in image_grids]
  return tokenizer.encode(expand_image_pads(render_chat(messages, add_generation_prompt), counts))


def user_message(prompt, num_images=0):
  """One user turn: the images first, then the text (the usual VQA layout)."""
  return {"role": "user", "content": [{"type": "image"}] * num_images +
          [{"type": "text", "text": prompt}]}
