"""Importers of Hugging Face checkpoints into sharded Flax parameters."""
