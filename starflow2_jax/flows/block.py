"""One autoregressive affine flow block (TARFlow; SPEC §2).

A causal Transformer reads a prefix (a learned start vector, or a projected conditioning
context whose last position plays the start's role) followed by the block's own input
shifted by one, and predicts a Gaussian (mean, scale) for every element from what precedes
it. Forward (data -> noise) is one parallel call; the inverse is a KV-cached loop in
`flows.decode`. `reverse=True` scans the sequence right to left.

The Pretzel's deep stream is this block too: it reads an interleaved sequence whose context
positions carry the VLM's hidden states and whose element positions carry u
(`embed_sequence`), through the same Transformer and head (`transform`, `head_gaussians`).
"""

from typing import NamedTuple, Optional

import flax.linen as nn
import jax.numpy as jnp

from starflow2_jax.flows import affine
from starflow2_jax.layers import embeddings
from starflow2_jax.layers import linear
from starflow2_jax.layers import transformer as transformer_lib


class BlockOutput(NamedTuple):
  z_bnd: jnp.ndarray       # the block's output (float32), in the input's order
  log_det_b: jnp.ndarray   # log|det ∂z/∂x| per example


class AffineFlowBlock(nn.Module):
  """Attributes:
    latent_dim: D, channels per element.
    transformer: the causal Transformer's numbers.
    scale: "softplus" or "exp" (see `flows.affine`).
    reverse: scan right to left (shallow blocks alternate).
    context_dim: width of a conditioning context entering through P_c; None for a
      visual-only block, which starts from a learned vector instead.
    noise_conditioning: add an MLP of Fourier(log t) to every token input.
  """
  latent_dim: int
  transformer: transformer_lib.TransformerConfig
  scale: str = "softplus"
  reverse: bool = False
  context_dim: Optional[int] = None
  noise_conditioning: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    width = self.transformer.width
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.input_proj = linear.dense(width, ("latent", "embed"), "input_proj", **kw)        # P_u
    if self.context_dim is None:
      self.start = self.param("start", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ("embed",)), (width,), self.param_dtype)
    else:
      self.context_proj = linear.dense(width, ("context", "embed"), "context_proj", **kw)  # P_c
    if self.noise_conditioning:
      self.noise_embed = embeddings.NoiseLevelEmbedding(width, **kw)
    self.backbone = transformer_lib.Transformer(self.transformer, **kw)
    # Zero-init head: a fresh block predicts mean 0, scale 1, i.e. it is the identity.
    self.head = linear.dense(2 * self.latent_dim, ("embed", "latent"), "head", zero=True, **kw)

  # ---- token embeddings -------------------------------------------------------------

  def _add_noise_embedding(self, tokens_btw, t_b):
    if not self.noise_conditioning:
      return tokens_btw
    if t_b is None:
      raise ValueError("this flow block is noise-conditioned: pass the noise level t")
    return tokens_btw + self.noise_embed(t_b)[:, None, :].astype(tokens_btw.dtype)

  def embed_prefix(self, batch, t_b=None, context_blc=None, context_valid_bl=None):
    """The tokens before the first element: [B, L, W] and their validity [B, L]."""
    if self.context_dim is None:
      if context_blc is not None:
        raise ValueError("a visual-only flow block (context_dim=None) takes no context")
      tokens = jnp.broadcast_to(self.start.astype(self.dtype), (batch, 1, self.transformer.width))
      valid = jnp.ones((batch, 1), bool)
    else:
      if context_blc is None:
        raise ValueError("this flow block is conditioned: pass a context")
      tokens = self.context_proj(context_blc)
      valid = (jnp.ones(context_blc.shape[:2], bool) if context_valid_bl is None
               else context_valid_bl.astype(bool))
    return self._add_noise_embedding(tokens, t_b), valid

  def embed_elements(self, u_bnd, t_b=None):
    """P_u(u) (+ noise embedding) for elements that the Transformer reads."""
    return self._add_noise_embedding(self.input_proj(u_bnd.astype(self.dtype)), t_b)

  def embed_sequence(self, context_btc, u_btd, is_element_bt, t_b=None, element_skip_btw=None):
    """One interleaved sequence's tokens: P_c(context) at context positions, P_u(u) (plus
    `element_skip_btw`, e.g. the Pretzel's W_v h^V) at element positions, + noise embedding."""
    elements_btw = self.input_proj(u_btd.astype(self.dtype))
    if element_skip_btw is not None:
      elements_btw = elements_btw + element_skip_btw.astype(self.dtype)
    tokens_btw = jnp.where(is_element_bt[..., None], elements_btw, self.context_proj(context_btc))
    return self._add_noise_embedding(tokens_btw, t_b)

  # ---- prediction -------------------------------------------------------------------

  def transform(self, tokens_btw, positions, valid_bt, cache=None):
    """The causal Transformer over tokens: (hidden [B, T, W], cache)."""
    return self.backbone(tokens_btw, positions, valid_bt, cache)

  def head_gaussians(self, hidden_btw):
    """(mean, log_s) [B, T, D] in float32 of the element after each position (Head_F)."""
    mean, raw_scale = jnp.split(self.head(hidden_btw).astype(jnp.float32), 2, axis=-1)
    return mean, affine.log_scale(raw_scale, self.scale)

  def predict(self, tokens_btw, positions_bt, valid_bt, cache=None):
    """Runs the Transformer; returns ((mean, log_s) per position, in float32, and the cache)."""
    hidden, cache = self.transform(tokens_btw, positions_bt, valid_bt, cache)
    return self.head_gaussians(hidden), cache

  def gaussians(self, u_bnd, t_b=None, context_blc=None, context_valid_bl=None):
    """(mean, log_s) [B, N, D] for every element of u (in scan order), one parallel call."""
    batch, num = u_bnd.shape[:2]
    prefix, prefix_valid = self.embed_prefix(batch, t_b, context_blc, context_valid_bl)
    prefix_len = prefix.shape[1]
    tokens = jnp.concatenate([prefix, self.embed_elements(u_bnd[:, :-1], t_b)], axis=1)
    valid = jnp.concatenate([prefix_valid, jnp.ones((batch, num - 1), bool)], axis=1)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape[:2])
    (mean, log_s), _ = self.predict(tokens, positions, valid)
    return mean[:, prefix_len - 1:], log_s[:, prefix_len - 1:]

  # ---- the flow ---------------------------------------------------------------------

  def to_scan_order(self, x_bnd):
    """Flips the element axis for a right-to-left block (an involution)."""
    return jnp.flip(x_bnd, axis=1) if self.reverse else x_bnd

  def __call__(self, x_bnd, t_b=None, context_blc=None, context_valid_bl=None):
    """Data -> noise: z = (x − μ) / s, with the exact log-determinant."""
    u = self.to_scan_order(x_bnd)
    mean, log_s = self.gaussians(u, t_b, context_blc, context_valid_bl)
    z = affine.to_noise(u, mean, log_s)
    return BlockOutput(self.to_scan_order(z), affine.log_det(log_s))
