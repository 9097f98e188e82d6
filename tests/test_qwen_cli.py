"""`starflow2 convert-qwen` and `starflow2 generate` end to end on a tiny random checkpoint
with a tiny word-level tokenizer whose special tokens sit at the tiny config's ids."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from starflow2_jax.models.qwen2_5_vl import config as config_lib

try:
  from tests import qwen_helpers as qh
except ImportError:
  import qwen_helpers as qh

pytest.importorskip("torch")
tokenizers = pytest.importorskip("tokenizers")

SPECIAL = ("<|im_start|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
           "<|vision_end|>", "<|im_end|>", "<|endoftext|>")          # ids 249 .. 255


def _write_tiny_tokenizer(directory, config):
  words = ["[UNK]", "system", "user", "assistant", "You", "are", "a", "helpful",
           "assistant.", "What", "is", "this?"]
  vocab = {w: i for i, w in enumerate(words)}
  vocab.update({f"w{i}": i for i in range(len(words), 249)})
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                          for t in SPECIAL])
  assert tok.token_to_id("<|image_pad|>") == config.image_token_id
  assert tok.token_to_id("<|im_end|>") == config.eos_token_ids[0]
  tok.save(str(directory / "tokenizer.json"))


def _cli(*args):
  result = subprocess.run([sys.executable, "-m", "starflow2_jax.cli", *args],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_convert_then_generate(tmp_path):
  config = qh.tiny_config()
  hf_dir = tmp_path / "hf"
  qh.build_reference(hf_dir)
  _write_tiny_tokenizer(hf_dir, config)
  Image.fromarray((np.random.RandomState(0).rand(60, 80, 3) * 255).astype(np.uint8)).save(
      tmp_path / "x.png")
  out = tmp_path / "converted"
  assert "wrote" in _cli("convert-qwen", f"--hf_dir={hf_dir}", f"--out={out}", "--dtype=float32")
  assert (out / "tokenizer.json").exists() and config_lib.from_pretrained_dir(out) == \
      config_lib.from_pretrained_dir(hf_dir)
  runs = [json.loads(_cli("generate", f"--vlm={d}", "--message=What is this?",
                          f"--image={tmp_path / 'x.png'}", "--max_new_tokens=8", "--greedy",
                          "--dtype=float32", "--json").strip().splitlines()[-1])
          for d in (out, hf_dir)]
  assert runs[0] == runs[1]
  assert 1 <= len(runs[0]["token_ids"]) <= 8 and runs[0]["prompt_tokens"] > 20
