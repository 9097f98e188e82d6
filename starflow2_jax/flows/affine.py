"""The affine maths of one autoregressive flow step, always in float32.

A head predicts raw values `a`; they become a Gaussian (mean, scale) for the next element.
Scale parameterisations (SPEC §2):
  "softplus": s = softplus(4·tanh(a/4) + 0.5413), so s = 1 at a = 0 (STARFlow's choice);
  "exp":      s = exp(4·tanh(a/4)) (TARFlow's, with the same soft clip for stability).
"""

import jax
import jax.numpy as jnp

SCALE_FUNCTIONS = ("softplus", "exp")
_SOFTPLUS_ONE = 0.5413248546129181  # softplus^{-1}(1)


def soft_clip(a, bound=4.0):
  return bound * jnp.tanh(a / bound)


def log_scale(a, kind):
  """log s from raw head outputs `a`, in float32."""
  a = soft_clip(a.astype(jnp.float32))
  if kind == "softplus":
    return jnp.log(jax.nn.softplus(a + _SOFTPLUS_ONE))
  if kind == "exp":
    return a
  raise ValueError(f"unknown scale function {kind!r}; expected one of {SCALE_FUNCTIONS}")


def to_noise(u, mean, log_s):
  """Data -> noise: z = (u - mean) / s."""
  return (u.astype(jnp.float32) - mean) * jnp.exp(-log_s)


def from_noise(z, mean, log_s):
  """Noise -> data: u = z · s + mean."""
  return z.astype(jnp.float32) * jnp.exp(log_s) + mean


def log_det(log_s_bnd):
  """log|det ∂z/∂u| per example: −Σ_j Σ_d log s."""
  return -jnp.sum(log_s_bnd, axis=(1, 2))
