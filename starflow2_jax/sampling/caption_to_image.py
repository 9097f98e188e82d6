"""Sampling images from a caption-conditioned flow (`models.caption_flow`).

Noise z ~ N(0, τ²I) goes through the deep block's KV-cached inverse (guided by a batched
unconditional copy of each caption, SPEC §6), then the shallow inverses, at the largest
training noise level; iterative Tweedie denoising with the guided score brings it down to
the smallest; the latent space decodes it to pixels.
"""

import jax
import jax.numpy as jnp

from starflow2_jax.flows import denoise
from starflow2_jax.flows import likelihood
from starflow2_jax.flows import stack


def guided_log_prob(model, params, caption_ids, caption_mask, guidance_weight):
  """(x, t) -> (1+w)·log p(x | caption, t) − w·log p(x | t): its gradient is the guided score."""
  def log_prob(x_bnd, t_b):
    num_dims = x_bnd.shape[1] * x_bnd.shape[2]
    def conditional(keep):
      out = model.apply({"params": params}, x_bnd, t_b, caption_ids, caption_mask,
                        jnp.full(t_b.shape, keep))
      return -num_dims * likelihood.nll_per_dim(out.z_bnd, out.log_det_shallow_b + out.log_det_deep_b)
    if guidance_weight is None:
      return conditional(True)
    return (1.0 + guidance_weight) * conditional(True) - guidance_weight * conditional(False)
  return log_prob


def sample_latents(model, params, caption_ids, caption_mask, rng, *, num_tokens, t_max, t_min,
                   temperature=1.0, guidance_weight=None, denoise_steps=0):
  """Latents x [B, N, D] for a batch of tokenised captions.

  Args:
    model: a `CaptionToImageFlow`.
    num_tokens: N, elements per image in the latent space.
    guidance_weight: None for plain conditional sampling; w for classifier-free guidance.
    denoise_steps: Euler steps from t_max to t_min before the final Tweedie step; -1 skips
      denoising entirely.
  """
  cfg = model.config.flow
  batch = caption_ids.shape[0]
  context, valid = model.apply({"params": params}, caption_ids, caption_mask, method="context")
  if guidance_weight is not None:
    context_u, valid_u = model.apply({"params": params}, caption_ids, caption_mask,
                                     jnp.zeros((batch,), bool), method="context")
    context = jnp.concatenate([context, context_u])
    valid = jnp.concatenate([valid, valid_u])
  z = temperature * jax.random.normal(rng, (batch, num_tokens, cfg.latent_dim), jnp.float32)
  t_b = jnp.full((batch,), t_max, jnp.float32)
  x = stack.invert(cfg, params["flow"], z, t_b, context, valid, guidance_weight, model.dtype)
  if denoise_steps < 0:
    return x
  log_prob = guided_log_prob(model, params, caption_ids, caption_mask, guidance_weight)
  return denoise.tweedie_denoise(log_prob, x, denoise.noise_ladder(t_max, t_min, denoise_steps))
