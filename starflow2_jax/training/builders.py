"""Config sections -> the pieces both tasks build: Transformer configs and the latent space."""

from starflow2_jax.latents import patch
from starflow2_jax.latents import precomputed
from starflow2_jax.layers import transformer as transformer_lib
from starflow2_jax.training import frozen


def transformer_config(cfg, model):
  """A `TransformerConfig` from a config section (width, num_layers, num_heads, mlp_ratio)
  and the model section's layer settings: `remat` (a `layers/remat.py` policy) and
  `scan_layers` (run the layers with `nn.scan`, `layers/scan.py`)."""
  return transformer_lib.TransformerConfig(
      width=cfg.width, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
      mlp_ratio=cfg.mlp_ratio, remat=model.get("remat", False),
      scan=model.get("scan_layers", False))


def build_latent(config):
  """The latent space (`latents.space.LatentSpace`) of `config.latent` for the images of
  `config.data`: "patch" (`patch_size`) or "fae" (`fae_workdir`: a trained FAE run; without
  one, records with precomputed latents of shape `grid` × `dim`)."""
  name = config.latent.name
  if name == "patch":
    return patch.PatchLatent(tuple(config.data.image_size), config.data.channels,
                             config.latent.patch_size)
  if name == "fae" and not config.latent.get("fae_workdir"):
    if not config.data.get("precomputed_latents"):
      raise ValueError("config.latent.name='fae' needs config.latent.fae_workdir (a trained "
                       "FAE run), or precomputed latents in the records "
                       "(config.data.precomputed_latents=True with latent.grid, latent.dim)")
    return precomputed.PrecomputedLatent(tuple(config.latent.grid), config.latent.dim)
  if name == "fae":
    latent = frozen.load_fae_latent(config.latent.fae_workdir)
    decoded = tuple(latent.config.image_size) + (latent.config.channels,)
    wanted = tuple(config.data.image_size) + (config.data.channels,)
    if decoded != wanted:
      raise ValueError(f"the FAE in {config.latent.fae_workdir} decodes {decoded} images; "
                       f"config.data wants {wanted}")
    return latent
  raise ValueError(f"config.latent.name={name!r} is not 'patch' or 'fae'")
