"""The adapter (SPEC §1, §4): what the frozen VLM reads at a visual position.

The flow's intermediate latent u [B, N, D] becomes a VLM input embedding [B, N, H_vlm]:
a small MLP, then FiLM on the noise level (adaptive LayerNorm: a parameter-free LayerNorm
scaled and shifted by an MLP of Fourier(log t)). The FiLM output layer starts at zero, so a
fresh adapter is the MLP followed by a plain LayerNorm, whatever t.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from starflow2_jax.layers import embeddings
from starflow2_jax.layers.linear import dense


class Adapter(nn.Module):
  """u [B, N, D], t [B] -> VLM input embeddings [B, N, out_width].

  Attributes:
    out_width: the VLM's hidden size.
    hidden: the MLP's hidden width.
  """
  out_width: int
  hidden: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, u_bnd, t_b):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h_bnf = jax.nn.gelu(dense(self.hidden, ("latent", "mlp"), "mlp_in", **kw)(
        u_bnd.astype(self.dtype)))
    h_bnh = dense(self.out_width, ("mlp", "embed"), "mlp_out", **kw)(h_bnf)
    h_bnh = nn.LayerNorm(use_scale=False, use_bias=False, dtype=self.dtype, name="norm")(h_bnh)
    cond_bf = embeddings.NoiseLevelEmbedding(self.hidden, name="noise_embed", **kw)(t_b)
    film_b2h = dense(2 * self.out_width, ("mlp", "embed"), "film", zero=True, **kw)(
        jax.nn.silu(cond_bf))
    scale_bh, shift_bh = jnp.split(film_b2h, 2, axis=-1)
    return h_bnh * (1.0 + scale_bh[:, None, :]) + shift_bh[:, None, :]
