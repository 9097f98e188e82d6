"""Config sections -> the pieces both tasks build: Transformer configs and the latent space."""

from starflow2_jax.latents import patch
from starflow2_jax.layers import transformer as transformer_lib


def transformer_config(cfg, remat=False):
  """A `TransformerConfig` from a config section (width, num_layers, num_heads, mlp_ratio)."""
  return transformer_lib.TransformerConfig(
      width=cfg.width, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
      mlp_ratio=cfg.mlp_ratio, remat=remat)


def build_latent(config):
  """The latent space of `config.latent` for the images of `config.data`."""
  if config.latent.name != "patch":
    raise ValueError(f"config.latent.name={config.latent.name!r}: only 'patch' exists so far")
  return patch.PatchLatent(tuple(config.data.image_size), config.data.channels,
                           config.latent.patch_size)
