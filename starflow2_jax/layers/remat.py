"""Rematerialisation policies named in configs: what a layer keeps from its forward pass for
the backward pass, and what it computes again.

  none           keep everything: no recomputation, the most activation memory
  full           keep only each layer's input; the backward pass reruns the layer
  dots_saveable  keep the outputs of matrix products, recompute the cheap elementwise ops
                 (norms, activations, rotary) around them
  save_outs      keep each layer's attention and MLP outputs (tagged with
                 `checkpoint_name`, ATTENTION_OUT and MLP_OUT) and recompute inside them

Configs may also give True ("full") or False ("none"), as they did before names existed.
"""

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name

ATTENTION_OUT = "attention_out"
MLP_OUT = "mlp_out"

POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_outs": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT, MLP_OUT),
}


def policy_name(remat):
  """The policy's name for a config value: a name, True ("full") or False/None ("none")."""
  if remat is True:
    return "full"
  if remat is False or remat is None:
    return "none"
  if remat not in POLICIES:
    raise ValueError(f"unknown remat policy {remat!r}: one of {sorted(POLICIES)} (or a bool)")
  return remat


def remat_layer(layer_cls, remat, scanned=False):
  """`layer_cls`, rematerialised under the named policy (itself for "none"). Inside a scan
  (`scanned`) the loop already keeps XLA from merging the recomputation with the forward
  pass, so common-subexpression elimination need not be prevented (as JAX recommends)."""
  name = policy_name(remat)
  if name == "none":
    return layer_cls
  return nn.remat(layer_cls, policy=POLICIES[name], static_argnums=(), prevent_cse=not scanned)


def tag(x, name):
  """`x` named for the `save_outs` policy (the identity otherwise)."""
  return checkpoint_name(x, name)
