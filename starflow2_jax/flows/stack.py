"""The deep–shallow factorisation (SPEC §3): x -> shallow blocks -> u -> deep block -> z.

Shallow blocks are visual-only and alternate their scan direction (block k reads the
sequence reversed when k is odd); the deep block runs left to right after an optional
conditioning context. Sampling runs the deep block first, then the shallow ones in reverse.
"""

import dataclasses
from typing import NamedTuple, Optional

import flax.linen as nn
import jax.numpy as jnp

from starflow2_jax.flows import block as block_lib
from starflow2_jax.flows import decode
from starflow2_jax.layers import transformer as transformer_lib


@dataclasses.dataclass(frozen=True)
class FlowConfig:
  latent_dim: int
  deep: transformer_lib.TransformerConfig
  shallow: transformer_lib.TransformerConfig
  num_shallow_blocks: int = 2
  context_dim: Optional[int] = None
  scale: str = "softplus"
  noise_conditioning: bool = True


class FlowOutput(NamedTuple):
  z_bnd: jnp.ndarray                 # the Gaussian end of the flow
  u_bnd: jnp.ndarray                 # the intermediate latent (what the deep stream reads)
  log_det_shallow_b: jnp.ndarray     # Σ_k log|det ∂f_s^k|
  log_det_deep_b: jnp.ndarray        # −Σ log s^deep


def shallow_block(config: FlowConfig, k: int, dtype=jnp.float32, param_dtype=jnp.float32):
  """The k-th shallow block as an unbound module (its params live under `shallow_{k}`)."""
  return block_lib.AffineFlowBlock(
      config.latent_dim, config.shallow, config.scale, reverse=(k % 2 == 1),
      noise_conditioning=config.noise_conditioning, dtype=dtype, param_dtype=param_dtype)


def deep_block(config: FlowConfig, dtype=jnp.float32, param_dtype=jnp.float32):
  """The deep block as an unbound module (its params live under `deep`)."""
  return block_lib.AffineFlowBlock(
      config.latent_dim, config.deep, config.scale, context_dim=config.context_dim,
      noise_conditioning=config.noise_conditioning, dtype=dtype, param_dtype=param_dtype)


def run_shallow(blocks, x_bnd, t_b=None):
  """x -> u through `blocks` (the shallow blocks, in order); returns (u, Σ log-dets [B])."""
  log_det_b = jnp.zeros(x_bnd.shape[:1], jnp.float32)
  for block in blocks:
    x_bnd, block_log_det_b = block(x_bnd, t_b)
    log_det_b = log_det_b + block_log_det_b
  return x_bnd, log_det_b


class DeepShallowFlow(nn.Module):
  config: FlowConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.shallow = [shallow_block(self.config, k, **kw).clone(name=f"shallow_{k}")
                    for k in range(self.config.num_shallow_blocks)]
    self.deep = deep_block(self.config, **kw).clone(name="deep")

  def encode_shallow(self, x_bnd, t_b=None):
    """x -> u through the shallow blocks; returns (u, Σ log-dets)."""
    return run_shallow(self.shallow, x_bnd, t_b)

  def __call__(self, x_bnd, t_b=None, context_blc=None, context_valid_bl=None):
    u, log_det_shallow = self.encode_shallow(x_bnd, t_b)
    z, log_det_deep = self.deep(u, t_b, context_blc, context_valid_bl)
    return FlowOutput(z, u, log_det_shallow, log_det_deep)


def invert_shallow(config, params, u_bnd, t_b=None, dtype=jnp.float32):
  """u -> x: the shallow blocks' inverses, last block first (each KV-cached)."""
  for k in reversed(range(config.num_shallow_blocks)):
    u_bnd = decode.invert_block(shallow_block(config, k, dtype), params[f"shallow_{k}"], u_bnd,
                                t_b)
  return u_bnd


def invert(config, params, z_bnd, t_b=None, context_blc=None, context_valid_bl=None,
           guidance_weight=None, dtype=jnp.float32):
  """z -> x for a `DeepShallowFlow`: deep inverse (optionally guided), then shallow."""
  u = decode.invert_block(deep_block(config, dtype), params["deep"], z_bnd, t_b, context_blc,
                          context_valid_bl, guidance_weight)
  return invert_shallow(config, params, u, t_b, dtype)
