"""Qwen2.5-VL text generation speed: prefill and KV-cached decode tokens/s on this machine.

    python -m benchmarks.qwen_decode [--configs tiny,0.5b] [--batch 1] [--prompt 128] [--new 32]

`0.5b` is a Qwen2.5-0.5B-sized text decoder (width 896, 24 layers, 14 heads, 2 KV heads,
MLP 4864, vocabulary 151936, M-RoPE sections (8, 12, 12) for head_dim 64: 494M parameters)
with random float32 weights; the vision tower is the tiny one (a text-only prompt never runs
it). Decode tokens/s counts every row. Measured on the 2-core CPU (batch 1, prompt 128,
32 new tokens): tiny ~70k prefill / ~9k decode tok/s; 0.5b ~71 prefill / ~8.3 decode tok/s.
"""

import argparse
import time

import jax
import numpy as np

from starflow2_jax import sharding
from starflow2_jax.models.qwen2_5_vl import config as config_lib
from starflow2_jax.models.qwen2_5_vl import generate as generate_lib
from starflow2_jax.models.qwen2_5_vl import model as model_lib

CONFIGS = {
    "tiny": config_lib.preset("tiny"),
    "0.5b": config_lib.preset("tiny").replace(
        text=config_lib.TextConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                   num_layers=24, num_heads=14, num_kv_heads=2,
                                   mrope_section=(8, 12, 12), tie_word_embeddings=True),
        vision=config_lib.preset("tiny").vision.__class__(
            hidden_size=32, intermediate_size=64, depth=1, num_heads=2, out_hidden_size=896,
            fullatt_block_indexes=(0,))),
}


def _timed_generate(model, params, prompt, sampling):
  start = time.perf_counter()
  out = generate_lib.generate(model, params, prompt, sampling)
  return time.perf_counter() - start, out


def benchmark(name, batch, prompt_len, new_tokens):
  config = CONFIGS[name]
  model = model_lib.Qwen25VL(config)
  init = jax.jit(lambda rng: sharding.strip_axis_names(model_lib.init_params(model, rng)))
  params = init(jax.random.key(0))
  num_params = sum(x.size for x in jax.tree.leaves(params))
  rng = np.random.RandomState(0)
  prompt = generate_lib.make_prompt_batch(
      [list(rng.randint(0, 200, prompt_len)) for _ in range(batch)], config)
  timings = {}
  for n in (1, new_tokens):
    sampling = generate_lib.SamplingConfig(max_new_tokens=n, pad_token_id=config.pad_token_id)
    _timed_generate(model, params, prompt, sampling)                  # compile
    timings[n] = min(_timed_generate(model, params, prompt, sampling)[0] for _ in range(2))
  prefill_tps = batch * prompt_len / timings[1]
  decode_tps = batch * (new_tokens - 1) / (timings[new_tokens] - timings[1])
  return num_params, prefill_tps, decode_tps


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="tiny,0.5b")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--prompt", type=int, default=128)
  parser.add_argument("--new", type=int, default=32)
  args = parser.parse_args()
  print(f"devices: {jax.devices()[0].platform} ×{jax.device_count()}, batch {args.batch}, "
        f"prompt {args.prompt}, new tokens {args.new}, float32")
  print(f"{'config':8} {'params':>12} {'prefill tok/s':>14} {'decode tok/s':>13}")
  for name in args.configs.split(","):
    num_params, prefill, decode = benchmark(name, args.batch, args.prompt, args.new)
    print(f"{name:8} {num_params:>12,} {prefill:>14.1f} {decode:>13.1f}")


if __name__ == "__main__":
  main()
