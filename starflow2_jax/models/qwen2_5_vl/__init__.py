"""Qwen2.5-VL in Flax: an exact port of the Hugging Face model (text, vision, M-RoPE),
its tokenizer and image preprocessing, and KV-cached generation. See docs/qwen.md."""
