"""Inverting flow blocks (noise -> data), one element per step: Next Gaussian Prediction.

`invert_block` is the production path: the prefix is written into a preallocated KV cache
once, then a `lax.fori_loop` appends one element per step, exactly like LLM decoding.
`invert_block_recompute` re-runs the whole sequence at every step; it exists as the
brute-force reference for tests and benchmarks.

With `guidance_weight`, the context holds 2B rows (B conditional, then B unconditional);
both halves are fed the same guided element (SPEC §6).
"""

import functools

import jax
import jax.numpy as jnp

from starflow2_jax.flows import affine
from starflow2_jax.flows import guidance as guidance_lib


def _guided_element(z_bd, mean_rd, log_s_rd, guidance_weight):
  """One element u_j from noise z_j and the predicted Gaussian(s) of its rows."""
  if guidance_weight is None:
    return affine.from_noise(z_bd, mean_rd, log_s_rd)
  mean_c, mean_u = jnp.split(mean_rd, 2)
  log_s_c, log_s_u = jnp.split(log_s_rd, 2)
  mean, log_s = guidance_lib.guided_gaussian(mean_c, log_s_c, mean_u, log_s_u, guidance_weight)
  return affine.from_noise(z_bd, mean, log_s)


def _rows(x, guidance_weight):
  """Duplicates a per-example array for the conditional and unconditional halves."""
  if x is None or guidance_weight is None:
    return x
  return jnp.concatenate([x, x], axis=0)


def _check_guidance_rows(z_bnd, context_blc, guidance_weight):
  if guidance_weight is not None and (context_blc is None or
                                      context_blc.shape[0] != 2 * z_bnd.shape[0]):
    raise ValueError("guidance needs a context of 2B rows: B conditional, then B unconditional")


def invert_block(block, params, z_bnd, t_b=None, context_blc=None, context_valid_bl=None,
                 guidance_weight=None, cache_dtype=jnp.float32):
  """KV-cached inverse of one `AffineFlowBlock`: returns x with block(x) = z."""
  _check_guidance_rows(z_bnd, context_blc, guidance_weight)
  apply = functools.partial(block.apply, {"params": params})
  z_scan = jnp.flip(z_bnd, 1) if block.reverse else z_bnd
  batch, num, dim = z_scan.shape
  t_rows = _rows(t_b, guidance_weight)
  rows = batch if guidance_weight is None else 2 * batch

  prefix, prefix_valid = apply(rows, t_rows, context_blc, context_valid_bl,
                               method="embed_prefix")
  prefix_len = prefix.shape[1]
  cache = block.transformer.empty_cache(rows, prefix_len + num - 1, cache_dtype)
  positions = jnp.broadcast_to(jnp.arange(prefix_len), (rows, prefix_len))
  (mean, log_s), cache = apply(prefix, positions, prefix_valid, cache, method="predict")

  def step(j, carry):
    u, mean, log_s, cache = carry
    u_j = _guided_element(z_scan[:, j], mean, log_s, guidance_weight)
    u = jax.lax.dynamic_update_index_in_dim(u, u_j, j, axis=1)
    token = apply(_rows(u_j, guidance_weight)[:, None], t_rows, method="embed_elements")
    position = jnp.full((rows, 1), prefix_len + j)
    (mean, log_s), cache = apply(token, position, jnp.ones((rows, 1), bool), cache,
                                 method="predict")
    return u, mean[:, -1], log_s[:, -1], cache

  init = (jnp.zeros((batch, num, dim), jnp.float32), mean[:, -1], log_s[:, -1], cache)
  u, mean, log_s, _ = jax.lax.fori_loop(0, num - 1, step, init)
  u = u.at[:, num - 1].set(_guided_element(z_scan[:, num - 1], mean, log_s, guidance_weight))
  return jnp.flip(u, 1) if block.reverse else u


def invert_block_recompute(block, params, z_bnd, t_b=None, context_blc=None,
                           context_valid_bl=None, guidance_weight=None):
  """Reference inverse: a full parallel pass for every element (quadratic work, no cache)."""
  _check_guidance_rows(z_bnd, context_blc, guidance_weight)
  z_scan = jnp.flip(z_bnd, 1) if block.reverse else z_bnd
  t_rows = _rows(t_b, guidance_weight)

  def step(j, u):
    mean, log_s = block.apply({"params": params}, _rows(u, guidance_weight), t_rows,
                              context_blc, context_valid_bl, method="gaussians")
    u_j = _guided_element(z_scan[:, j], mean[:, j], log_s[:, j], guidance_weight)
    return jax.lax.dynamic_update_index_in_dim(u, u_j, j, axis=1)

  u = jax.lax.fori_loop(0, z_scan.shape[1], step, jnp.zeros(z_scan.shape, jnp.float32))
  return jnp.flip(u, 1) if block.reverse else u
