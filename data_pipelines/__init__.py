"""Data for starflow2-jax: the interleaved record format, writers to ArrayRecord, Grain input.

This package sits below `starflow2_jax` and must not import it.
"""
