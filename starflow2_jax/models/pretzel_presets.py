"""Pretzel presets (SPEC §7) and their parameter counts, built abstractly (`jax.eval_shape`).

    python -m starflow2_jax.models.pretzel_presets      # prints the paper preset's counts
"""

import jax
import jax.numpy as jnp
import numpy as np

from starflow2_jax import tree_paths
from starflow2_jax.flows import stack
from starflow2_jax.layers import transformer as transformer_lib
from starflow2_jax.models import pretzel
from starflow2_jax.models import stages
from starflow2_jax.models.qwen2_5_vl import config as qwen_config


def paper_config():
  """Qwen2.5-VL-7B text decoder, deep 24 layers × 3072 (head dim 64), 2 shallow blocks × 4
  layers at the same width, FAE latent D = 32, adapter hidden 3584, bf16 VLM."""
  deep = pretzel.with_flow_positions(
      transformer_lib.TransformerConfig(width=3072, num_layers=24, num_heads=48), "interleaved")
  shallow = transformer_lib.TransformerConfig(width=3072, num_layers=4, num_heads=48)
  flow = stack.FlowConfig(latent_dim=32, deep=deep, shallow=shallow, num_shallow_blocks=2)
  vlm = qwen_config.preset("7b").text
  return pretzel.PretzelConfig(vlm, flow, adapter_hidden=vlm.hidden_size,
                               vlm_dtype="bfloat16")


def abstract_params(config, grid=(2, 2)):
  """The parameter tree as ShapeDtypeStructs (nothing allocated); shapes do not depend on
  the sequence, so a one-image dummy sequence suffices."""
  model = pretzel.Pretzel(config)
  n, length = grid[0] * grid[1], grid[0] * grid[1] + 2
  ids = jnp.zeros((1, length), jnp.int32)
  x = jnp.zeros((1, 1, n, config.flow.latent_dim))
  image_positions = jnp.arange(1, n + 1)[None, None]
  is_visual = (jnp.arange(length) >= 1) & (jnp.arange(length) <= n)
  positions = jnp.zeros((3, 1, length), jnp.int32)
  args = (ids, x, image_positions, jnp.ones((1, 1), bool), is_visual[None], positions,
          jnp.ones((1, length), bool), jnp.ones((1,)))
  boxed = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
  return jax.tree.map(lambda b: b.unbox(apply_constraint=False) if hasattr(b, "unbox") else b,
                      boxed, is_leaf=lambda b: hasattr(b, "unbox"))


def param_counts(config, trainable=stages.STAGES[3].trainable):
  """{part: parameter count} for the top-level parts, plus trainable (stage 3's set by
  default) and total."""
  params = abstract_params(config)
  size = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
  counts = {name: size(sub) for name, sub in params.items()}
  labels = jax.tree.leaves(tree_paths.trainable_labels(params, trainable))
  counts["trainable"] = int(sum(np.prod(x.shape) for x, label in
                                zip(jax.tree.leaves(params), labels) if label == "train"))
  counts["total"] = size(params)
  return counts


def paper_preset_counts():
  """Prints and returns the paper preset's parameter counts."""
  counts = param_counts(paper_config())
  for name, count in counts.items():
    print(f"{name:>12}: {count / 1e9:7.3f}B  ({count:,})")
  return counts


if __name__ == "__main__":
  paper_preset_counts()
