"""The flow stream's positions see every axis of an image (SPEC §1: interleaved M-RoPE).

Qwen2.5-VL's chunked M-RoPE split gives the column axis only the lowest rotary frequencies;
a flow stream trained with it ignored columns entirely (its bits/dim did not change when the
column coordinates were mirrored) and drew streaked images. Two checks catch that class of
defect: one on the angles themselves, one on what a briefly trained flow stream learns.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import fashion_mnist_stages
from experiments import starflow2
from helpers import unboxed
from data_pipelines import mrope_positions as positions_lib
from starflow2_jax.flows import stack
from starflow2_jax.layers import rotary
from starflow2_jax.layers import transformer as transformer_lib
from starflow2_jax.models import pretzel
from starflow2_jax.models import stages
from starflow2_jax.models.qwen2_5_vl import config as qwen_config
from starflow2_jax.training import pretzel_task

# Adjacent image elements along any axis must differ by at least this rotary angle at that
# axis's highest frequency. Rotating a query–key pair by ω changes their product by ~ω of its
# size, so below a few hundredths of a radian neighbours are indistinguishable to attention
# (Qwen2.5-VL's chunked split leaves the column axis ≤ 0.0032 rad at head dim 32, 16× under
# this bound); plain 1-D RoPE's highest frequency is 1 rad, and interleaving gives the three
# axes the three highest frequencies, ≥ 0.1 rad at head dim 16 and θ = 10⁴.
MIN_ANGLE_PER_STEP = 0.05


def flow_stream_configs():
  """(name, deep Transformer config) of the flow stream at every preset in use."""
  configs = []
  for arg in ("stage=1,size=demo", "stage=1,size=tiny", "stage=3,size=demo",
              "stage=1,size=1b", "stage=3,size=paper"):
    model = pretzel_task.build_model(starflow2.get_config(arg), latent_dim=16)
    configs.append((f"starflow2:{arg}", model.config.flow.deep))
  return configs


def axis_step_angle(deep, axis, start=(5, 5, 5)):
  """The largest rotary-angle change between an image element and its neighbour along `axis`
  (0 = t, 1 = row, 2 = col), over all frequencies."""
  here = np.asarray(start)
  there = here + np.eye(3, dtype=int)[axis]
  positions_3bt = jnp.asarray(np.stack([here, there], axis=1)[:, None, :], jnp.int32)
  angles = np.asarray(deep.rotary_angles(positions_3bt))[0]
  return float(np.max(np.abs(angles[1] - angles[0])))


@pytest.mark.parametrize("name, deep", flow_stream_configs(), ids=lambda v: v
                         if isinstance(v, str) else "")
def test_every_image_axis_turns_by_a_clear_angle(name, deep):
  for axis, axis_name in enumerate(("t", "row", "col")):
    angle = axis_step_angle(deep, axis)
    assert MIN_ANGLE_PER_STEP <= angle <= np.pi, (
        f"{name}: one step along {axis_name} turns by at most {angle:.4f} rad "
        f"(layout {deep.rope_layout}, head dim {deep.head_dim})")


def test_qwen_chunked_split_is_what_the_bound_rejects():
  """The detector sees the defect: the VLM's layout (kept for its frozen weights) at the
  demo's flow head dim leaves the column axis under the bound."""
  deep = fashion_mnist_stages.get_config("stage1").model.deep
  head_dim = deep.width // deep.num_heads
  chunked = transformer_lib.TransformerConfig(
      width=deep.width, num_layers=1, num_heads=deep.num_heads, rope_layout="chunked",
      mrope_section=rotary.qwen_mrope_section(head_dim))
  assert axis_step_angle(chunked, axis=2) < MIN_ANGLE_PER_STEP
  assert axis_step_angle(chunked, axis=0) == pytest.approx(1.0)


# ---- A trained flow stream reads column order ------------------------------------------------

GRID = (4, 4)
N = GRID[0] * GRID[1]
D = 4
VISION_START, VISION_END, IMAGE_PAD = 40, 41, 42
# Each row of an image is ±PROFILE (a fair coin per row) plus noise of std 0.1: after a row's
# first element, every element is fixed by its column — which only positions tell reliably.
PROFILE = np.array([1.0, 1.0, -1.0, -1.0])
NOISE = 0.1


def column_images(rng, batch):
  signs = rng.choice([-1.0, 1.0], size=(batch, GRID[0], 1))
  x_bn = (signs * PROFILE).reshape(batch, N)
  x_bnd = np.repeat(x_bn[..., None], D, axis=-1) + NOISE * rng.normal(size=(batch, N, D))
  return jnp.asarray(x_bnd[:, None].astype(np.float32))


def image_sequence(batch, mirror_columns=False):
  """`<|vision_start|>` v_1 … v_N `<|vision_end|>` as the Pretzel's inputs (without x)."""
  positions, _ = positions_lib.span_positions([("text", 1), ("image", (1,) + GRID), ("text", 1)])
  visual = np.arange(1, N + 1)
  if mirror_columns:
    col = positions[2, visual] - positions[0, visual]
    positions[2, visual] = positions[0, visual] + GRID[1] - 1 - col
  ids = np.asarray([VISION_START] + [IMAGE_PAD] * N + [VISION_END], np.int32)
  tile = lambda a: jnp.asarray(np.broadcast_to(a, (batch,) + a.shape))
  return dict(ids_bt=tile(ids), image_positions_bmn=tile(visual[None].astype(np.int32)),
              image_valid_bm=jnp.ones((batch, 1), bool), is_visual_bt=tile(ids == IMAGE_PAD),
              positions_3bt=jnp.asarray(np.broadcast_to(positions[:, None],
                                                        (3, batch, ids.size)), jnp.int32),
              valid_bt=jnp.ones((batch, ids.size), bool),
              t_b=jnp.full((batch,), 0.02, jnp.float32))


def flow_stream_model(rope_layout):
  """A tiny Pretzel without shallow blocks: the deep stream alone learns the images."""
  vlm = qwen_config.TextConfig(vocab_size=48, hidden_size=32, intermediate_size=64,
                               num_layers=1, num_heads=4, num_kv_heads=2,
                               mrope_section=(1, 2, 1), rope_theta=10_000.0)
  deep = pretzel.with_flow_positions(
      transformer_lib.TransformerConfig(width=64, num_layers=2, num_heads=2, mlp_ratio=2.0),
      rope_layout)
  shallow = transformer_lib.TransformerConfig(width=16, num_layers=1, num_heads=2)
  flow = stack.FlowConfig(latent_dim=D, deep=deep, shallow=shallow, num_shallow_blocks=0)
  return pretzel.Pretzel(pretzel.PretzelConfig(vlm, flow, adapter_hidden=16, skips=False))


def nll_per_dim(model, params, x, seq):
  out = model.apply({"params": params}, seq["ids_bt"], x, seq["image_positions_bmn"],
                    seq["image_valid_bm"], seq["is_visual_bt"], seq["positions_3bt"],
                    seq["valid_bt"], seq["t_b"], with_logits=False)
  return jnp.mean(out.images.nll_per_dim())


def train_flow_stream(rope_layout, steps=300, batch=32):
  model = flow_stream_model(rope_layout)
  seq = image_sequence(batch)
  rng = np.random.default_rng(0)
  params = unboxed(model.init(jax.random.key(0), seq["ids_bt"], column_images(rng, batch),
                              seq["image_positions_bmn"], seq["image_valid_bm"],
                              seq["is_visual_bt"], seq["positions_3bt"], seq["valid_bt"],
                              seq["t_b"])["params"])
  frozen = {k: v for k, v in params.items() if k != "flow"}
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
  loss = lambda flow, x: nll_per_dim(model, dict(frozen, flow=flow), x, seq)

  @jax.jit
  def step(flow, opt_state, x):
    grads = jax.grad(loss)(flow, x)
    updates, opt_state = optimizer.update(grads, opt_state, flow)
    return optax.apply_updates(flow, updates), opt_state

  flow, opt_state = params["flow"], optimizer.init(params["flow"])
  for _ in range(steps):
    flow, opt_state = step(flow, opt_state, column_images(rng, batch))
  return model, dict(frozen, flow=flow)


@pytest.mark.slow      # 300 training steps (~40 s): the layout choice's evidence, not a unit check
def test_trained_flow_stream_pays_for_mirrored_columns():
  """300 steps on images whose every row follows a column profile: mirroring the column
  coordinates of held-out images (same pixels, same rows) must cost bits. A column-aware
  stream predicts the wrong sign for every element after a row's first (each costs ~2²/(2·0.1²)
  = 200 nats per dim), so even a stream that is only partly sure of columns pays far more than
  1 nat/dim; one blind to columns (Qwen's chunked split here) pays nothing (measured: 0.0004)."""
  layout = fashion_mnist_stages.get_config("stage1").model.deep.rope_layout
  model, params = train_flow_stream(layout)
  x = column_images(np.random.default_rng(1), 256)
  evaluate = jax.jit(lambda x, seq: nll_per_dim(model, params, x, seq))
  as_is = float(evaluate(x, image_sequence(256)))
  mirrored = float(evaluate(x, image_sequence(256, mirror_columns=True)))
  assert mirrored - as_is >= 1.0, (layout, as_is, mirrored)
