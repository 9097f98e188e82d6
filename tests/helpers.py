"""Tiny configs, random parameters and small utilities shared by the model and trainer tests.

Everything here is float32 and small enough to compile in a second or two on a 2-core CPU.
"""

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from starflow2_jax.flows import block as block_lib
from starflow2_jax.flows import stack
from starflow2_jax.layers import transformer as transformer_lib

LATENT_DIM = 3
NUM_ELEMENTS = 5
CONTEXT_DIM = 6
CONTEXT_LEN = 4
BATCH = 2


def transformer_config(width=16, num_layers=2, num_heads=2, mlp_ratio=2.0):
  return transformer_lib.TransformerConfig(width=width, num_layers=num_layers,
                                           num_heads=num_heads, mlp_ratio=mlp_ratio)


def flow_config(latent_dim=LATENT_DIM, context_dim=CONTEXT_DIM, scale="softplus",
                num_shallow_blocks=2, noise_conditioning=True):
  return stack.FlowConfig(
      latent_dim=latent_dim, deep=transformer_config(num_layers=2),
      shallow=transformer_config(num_layers=1), num_shallow_blocks=num_shallow_blocks,
      context_dim=context_dim, scale=scale, noise_conditioning=noise_conditioning)


def shallow_block(reverse=False, scale="softplus", latent_dim=LATENT_DIM):
  return block_lib.AffineFlowBlock(latent_dim, transformer_config(num_layers=1), scale,
                                   reverse=reverse)


def deep_block(scale="softplus", latent_dim=LATENT_DIM, context_dim=CONTEXT_DIM):
  return block_lib.AffineFlowBlock(latent_dim, transformer_config(num_layers=2), scale,
                                   context_dim=context_dim)


# The flow blocks the flow tests exercise: kind -> (module factory, takes a context).
BLOCK_KINDS = {
    "shallow": (lambda: shallow_block(reverse=False), False),
    "shallow_reverse": (lambda: shallow_block(reverse=True), False),
    "shallow_exp": (lambda: shallow_block(reverse=True, scale="exp"), False),
    "deep": (lambda: deep_block(), True),
}


def block_and_inputs(kind, batch=BATCH, seed=0):
  """A `BLOCK_KINDS[kind]` block with random (non-identity) parameters, and inputs for it:
  (block, params, x, t, context, valid); context and valid are None without a context."""
  factory, conditioned = BLOCK_KINDS[kind]
  block = factory()
  x, t = latents(batch, seed), noise_levels(batch)
  context, valid = context_inputs(batch) if conditioned else (None, None)
  params = random_params(block, x, t, context, valid, seed=seed + 11)
  return block, params, x, t, context, valid


def block_depth(block):
  """The tolerance policy's depth of one flow block: its Transformer layers and its head."""
  return block.transformer.num_layers + 1


def block_reduction(block):
  """The tolerance policy's reduction of one flow block: its longest sum (the MLP's)."""
  config = block.transformer
  return max(config.width, int(config.mlp_ratio * config.width))


def unboxed(params):
  """Plain arrays from a tree that may hold logically partitioned boxes."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, params,
                      is_leaf=is_box)


def random_params(module, *init_args, seed=0, head_scale=0.5):
  """Random, non-trivial parameters with the shapes `module.init(key, *init_args)` gives.

  Shapes come from `jax.eval_shape` and values from numpy, so nothing is compiled (JAX's
  threefry-based initialisers take seconds to compile on a small CPU). Kernels are
  fan-in scaled normals, norm scales are 1 ± 0.1, biases small, and the zero-initialised
  flow heads (kernel and bias) get `head_scale`-sized values, so every flow block has
  data-dependent means and scales far from the identity map.
  """
  shapes = unboxed(jax.eval_shape(module.init, jax.random.key(0), *init_args)["params"])
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    names = [str(getattr(p, "key", p)) for p in path]
    name, in_head = names[-1], "head" in names
    n = rng.normal(size=leaf.shape)
    if name == "scale":
      value = 1.0 + 0.1 * n
    elif name == "bias":
      value = (head_scale if in_head else 0.1) * n
    elif name.endswith("kernel"):
      fan_in = np.prod(leaf.shape[:-1]) if name == "out_kernel" else leaf.shape[0]
      value = (head_scale if in_head else 1.0) * n / np.sqrt(fan_in)
    else:  # start vectors, embeddings
      value = 0.5 * n
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def init(module, *args, seed=0):
  """`module.init(key(seed), *args)["params"]`, jit-compiled, unboxed: the real initialiser."""
  return unboxed(jax.jit(module.init)(jax.random.key(seed), *args)["params"])


def context_inputs(batch, seed=1, length=CONTEXT_LEN, dim=CONTEXT_DIM):
  """A random context whose rows have some padded (invalid) positions; the last position of
  every row is valid (it plays the start token's role)."""
  rng = np.random.default_rng(seed)
  context = rng.normal(size=(batch, length, dim)).astype(np.float32)
  valid = np.ones((batch, length), bool)
  valid[0, 0] = False                 # padding at the front of row 0
  if batch > 1:
    valid[1, 1:length - 1] = False    # row 1: only its first and last positions are real
  return jnp.asarray(context), jnp.asarray(valid)


def normal(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def latents(batch=BATCH, seed=0):
  """Random flow inputs x [batch, NUM_ELEMENTS, LATENT_DIM]."""
  return normal((batch, NUM_ELEMENTS, LATENT_DIM), seed)


def noise_levels(batch, seed=2, low=0.05, high=0.5):
  return jnp.asarray(np.random.default_rng(seed).uniform(low, high, size=(batch,)).astype(
      np.float32))


def max_abs_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def bits(x):
  """The raw bytes of an array, for bitwise comparisons (distinguishes -0.0 from 0.0)."""
  x = np.asarray(x)
  return x.dtype, x.shape, x.tobytes()


def tree_bits(tree):
  return [bits(leaf) for leaf in jax.tree.leaves(tree)]


@contextlib.contextmanager
def persistent_compilation_cache(directory):
  """JAX's persistent compilation cache in `directory` for every compiled program, however
  quick (so runs in one module compile the same steps once); the settings restored after."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  previous = {name: getattr(jax.config, name) for name in names}
  jax.config.update("jax_compilation_cache_dir", str(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  try:
    yield
  finally:
    for name, value in previous.items():
      jax.config.update(name, value)
