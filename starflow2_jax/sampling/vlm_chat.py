"""Answer one chat prompt (text and image files) with a Qwen2.5-VL checkpoint directory.

The glue behind `starflow2 generate`: load weights (converted Orbax copy or Hugging Face
safetensors), tokenizer and image settings from the directory, build the chat prompt,
generate, decode.
"""

import dataclasses

import jax
import jax.numpy as jnp

from starflow2_jax.convert import qwen as qwen_convert
from starflow2_jax.models.qwen2_5_vl import generate as generate_lib
from starflow2_jax.models.qwen2_5_vl import image_processing
from starflow2_jax.models.qwen2_5_vl import tokenizer as tokenizer_lib


@dataclasses.dataclass
class Answer:
  text: str
  token_ids: list
  prompt_tokens: int


def answer(vlm_dir, prompt, image_paths=(), *, max_new_tokens=128, greedy=True,
           temperature=0.7, top_p=0.9, seed=0, dtype=jnp.bfloat16):
  """Generates the assistant's reply to `prompt` about the images (shown before the text)."""
  tokenizer = tokenizer_lib.QwenTokenizer.from_dir(vlm_dir)
  model, params = qwen_convert.load_vlm(vlm_dir, dtype=dtype)
  config = model.config
  processor_config = image_processing.ImageProcessorConfig.from_dir(vlm_dir)
  images = [image_processing.preprocess(image_processing.load_image(p), processor_config)
            for p in image_paths]
  ids = tokenizer_lib.encode_chat(tokenizer, [tokenizer_lib.user_message(prompt, len(images))],
                                  [grid for _, grid in images], processor_config.merge_size)
  batch = generate_lib.make_prompt_batch([ids], config, images)
  stops = tuple(dict.fromkeys(config.eos_token_ids + tokenizer.stop_token_ids))
  sampling = generate_lib.SamplingConfig(
      max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature, top_p=top_p,
      stop_token_ids=stops, pad_token_id=config.pad_token_id)
  out = generate_lib.generate(model, params, batch, sampling, jax.random.key(seed))
  token_ids = [int(t) for t in out.tokens[0, :out.lengths[0]]]
  return Answer(tokenizer.decode(token_ids), token_ids, len(ids))
