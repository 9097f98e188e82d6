"""The Pretzel model: zero-init skips, frozen VLM, exact per-image likelihood, KV-cached decoding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import max_abs_diff, random_params, tree_bits
from tolerance import assert_float32_close
from data_pipelines import mrope_positions as positions_lib
from starflow2_jax.flows import affine
from starflow2_jax.flows import likelihood
from starflow2_jax.flows import stack
from starflow2_jax.layers import transformer as transformer_lib
from starflow2_jax.models import pretzel
from starflow2_jax.models.qwen2_5_vl import config as qwen_config

D, GRID = 4, (2, 2)
N = GRID[0] * GRID[1]
VISION_START, VISION_END, IMAGE_PAD = 40, 41, 42


def tiny_config(skips=True):
  vlm = qwen_config.TextConfig(vocab_size=48, hidden_size=32, intermediate_size=64,
                               num_layers=1, num_heads=4, num_kv_heads=2,
                               mrope_section=(1, 2, 1), rope_theta=10_000.0)
  deep = pretzel.with_flow_positions(
      transformer_lib.TransformerConfig(width=16, num_layers=1, num_heads=2, mlp_ratio=2.0))
  shallow = transformer_lib.TransformerConfig(width=16, num_layers=1, num_heads=2,
                                              mlp_ratio=2.0)
  flow = stack.FlowConfig(latent_dim=D, deep=deep, shallow=shallow, num_shallow_blocks=2)
  return pretzel.PretzelConfig(vlm, flow, adapter_hidden=16, skips=skips)


def sequence(seed=0, batch=2):
  """Two rows "t t [img] t [img] t" (row 1 padded at the end), as model inputs."""
  text = [3, 5, 7]
  spans, ids, image_positions = [], [], []
  for i, chunk in enumerate([text[:2], [9], [11, 12]]):
    ids += chunk
    spans.append(("text", len(chunk)))
    if i < 2:
      ids.append(VISION_START)
      spans.append(("text", 1))
      image_positions.append(np.arange(len(ids), len(ids) + N))
      ids += [IMAGE_PAD] * N
      spans.append(("image", (1,) + GRID))
      ids.append(VISION_END)
      spans.append(("text", 1))
  length = len(ids)
  pos, _ = positions_lib.span_positions(spans)
  ids_bt = np.tile(np.asarray(ids, np.int32), (batch, 1))
  valid_bt = np.ones((batch, length), bool)
  valid_bt[1, -1] = False
  is_visual_bt = ids_bt == IMAGE_PAD
  rng = np.random.default_rng(seed)
  return dict(
      ids_bt=jnp.asarray(ids_bt), valid_bt=jnp.asarray(valid_bt),
      positions_3bt=jnp.asarray(np.broadcast_to(pos[:, None], (3, batch, length)), jnp.int32),
      is_visual_bt=jnp.asarray(is_visual_bt),
      x_bmnd=jnp.asarray(rng.normal(size=(batch, 2, N, D)).astype(np.float32)),
      image_positions_bmn=jnp.asarray(np.broadcast_to(np.stack(image_positions),
                                                      (batch, 2, N)), jnp.int32),
      image_valid_bm=jnp.ones((batch, 2), bool),
      t_b=jnp.asarray(rng.uniform(0.05, 0.5, size=batch).astype(np.float32)))


@functools.lru_cache(maxsize=None)
def jitted(model, method="__call__", **kwargs):
  """`model.apply(variables, *args, method=method, **kwargs)`, compiled (eager is slow)."""
  return jax.jit(lambda params, *args: model.apply({"params": params}, *args, method=method,
                                                   **kwargs))


def full_args(s):
  return (s["ids_bt"], s["x_bmnd"], s["image_positions_bmn"], s["image_valid_bm"],
          s["is_visual_bt"], s["positions_3bt"], s["valid_bt"], s["t_b"])


@pytest.fixture(scope="module")
def model_and_params():
  model = pretzel.Pretzel(tiny_config())
  return model, random_params(model, *full_args(sequence()))


def test_stage3_start_equals_stage2_model_exactly():
  s = sequence()
  stage2 = pretzel.Pretzel(tiny_config(skips=False))
  stage3 = pretzel.Pretzel(tiny_config(skips=True))
  params2 = random_params(stage2, *full_args(s))
  assert set(random_params(stage3, *full_args(s))) - set(params2) == {"w_v", "w_t"}
  # The stage-3 model's own initialiser, run for the skips alone (a full init compiles slowly).
  h_vlm, g = jnp.ones((1, 1, 32)), jnp.ones((1, 1, 16))
  skips = stage3.init(jax.random.key(0), h_vlm, g,
                      method=lambda m, h, g: (m.w_v(h), m.w_t(g)))["params"]
  params3 = dict(params2, **jax.tree.map(lambda b: b.unbox(), skips,
                                         is_leaf=lambda x: hasattr(x, "unbox")))
  out2 = jitted(stage2)(params2, *full_args(s))
  out3 = jitted(stage3)(params3, *full_args(s))
  assert tree_bits(out3) == tree_bits(out2)
  # The equality is the skips' zero init, not an unused code path: a non-zero W_t changes
  # the logits, a non-zero W_v the flow.
  rng = np.random.default_rng(0)
  bumped = dict(params3, **{k: {"kernel": rng.normal(size=params3[k]["kernel"].shape).astype(
      np.float32)} for k in ("w_v", "w_t")})
  out_bumped = jitted(stage3)(bumped, *full_args(s))
  assert max_abs_diff(out_bumped.logits_btv, out2.logits_btv) > 1e-3
  assert max_abs_diff(out_bumped.images.z_bmnd, out2.images.z_bmnd) > 1e-3


def test_frozen_vlm_gets_no_gradient_and_adapter_does(model_and_params):
  model, params = model_and_params
  s = sequence()

  def loss(p):
    out = model.apply({"params": p}, *full_args(s))
    return jnp.mean(out.logits_btv ** 2) + jnp.mean(out.images.nll_per_dim())

  grads = jax.jit(jax.grad(loss))(params)
  assert all(not np.any(g) for g in jax.tree.leaves(grads["vlm"]))
  for name in ("adapter", "flow", "shallow_0", "w_v", "w_t"):
    assert any(np.any(g) for g in jax.tree.leaves(grads[name])), name


def test_isolate_flow_keeps_values_and_keeps_text_gradients_out_of_the_flow(model_and_params):
  """`isolate_flow` changes no value; the text loss then trains the adapter and W_t but gives
  the flow (deep stream and shallow blocks) exactly zero gradient — and without it, not."""
  model, params = model_and_params
  s = sequence()
  plain = jitted(model)(params, *full_args(s))
  isolated = jitted(model, isolate_flow=True)(params, *full_args(s))
  np.testing.assert_array_equal(isolated.logits_btv, plain.logits_btv)
  np.testing.assert_array_equal(isolated.images.z_bmnd, plain.images.z_bmnd)

  def text_grads(isolate_flow):
    loss = lambda p: jnp.mean(model.apply({"params": p}, *full_args(s),
                                          isolate_flow=isolate_flow).logits_btv ** 2)
    return jax.jit(jax.grad(loss))(params)

  isolated_grads, joint_grads = text_grads(True), text_grads(False)
  for name in ("flow", "shallow_0", "shallow_1"):
    assert all(not np.any(g) for g in jax.tree.leaves(isolated_grads[name])), name
    assert any(np.any(g) for g in jax.tree.leaves(joint_grads[name])), name
  for name in ("adapter", "w_t"):
    assert any(np.any(g) for g in jax.tree.leaves(isolated_grads[name])), name


def _deep_terms_step_by_step(model, params, s, row, image):
  """log N(z) and −Σ log s of one image from the shallow blocks alone, then KV-cached
  single-position steps over its context (not the parallel pass under test)."""
  cfg = model.config
  x_nd = s["x_bmnd"][row, image]
  t_1 = s["t_b"][row:row + 1]
  u, log_det_shallow = x_nd[None], 0.0
  for k in range(cfg.flow.num_shallow_blocks):
    out = jitted(stack.shallow_block(cfg.flow, k))(params[f"shallow_{k}"], u, t_1)
    u, log_det_shallow = out.z_bnd, log_det_shallow + out.log_det_b
  # u of every image of the row (the context may hold earlier images), then the sequence
  # up to this image's last element, one position per step.
  u_all, _ = jitted(model, "encode_images")(params, s["x_bmnd"][row:row + 1], t_1)
  u_seq = pretzel.place_elements(u_all, s["image_positions_bmn"][row:row + 1],
                                 s["image_valid_bm"][row:row + 1], s["ids_bt"].shape[1])
  last = int(s["image_positions_bmn"][row, image, -1])
  cache = pretzel.empty_cache(cfg, 1, last + 1)
  z, log_det_deep, mean, log_s = [], 0.0, None, None
  for i in range(last + 1):
    sl = slice(i, i + 1)
    if bool(s["is_visual_bt"][row, i]) and i >= int(s["image_positions_bmn"][row, image, 0]):
      u_j = u_seq[0, i]
      z.append(affine.to_noise(u_j, mean, log_s))
      log_det_deep = log_det_deep - jnp.sum(log_s)
    streams = jitted(model, "streams")(
        params, s["ids_bt"][row:row + 1, sl], u_seq[:, sl], s["is_visual_bt"][row:row + 1, sl],
        s["positions_3bt"][:, row:row + 1, sl], s["valid_bt"][row:row + 1, sl], t_1, cache)
    cache = streams.cache
    mean, log_s = jitted(model, "gaussians")(params, streams.g_btw)
    mean, log_s = mean[0, 0], log_s[0, 0]
  # Two routes through the shallow blocks (each a Transformer layer of width 16, MLP 32, and
  # a head): depth = blocks × (layers + 1).
  shallow = cfg.flow.shallow
  assert_float32_close(u[0], u_all[0, image],
                       depth=cfg.flow.num_shallow_blocks * (shallow.num_layers + 1),
                       reduction=int(shallow.width * shallow.mlp_ratio))
  return jnp.stack(z), log_det_shallow[0], log_det_deep


@pytest.mark.parametrize("row, image", [(0, 0), (1, 1)])
def test_image_log_likelihood_is_shallow_plus_deep(model_and_params, row, image):
  model, params = model_and_params
  s = sequence()
  terms = jitted(model, with_logits=False)(params, *full_args(s)).images
  z, log_det_shallow, log_det_deep = _deep_terms_step_by_step(model, params, s, row, image)
  np.testing.assert_allclose(terms.z_bmnd[row, image], z, atol=1e-5)
  np.testing.assert_allclose(terms.log_det_shallow_bm[row, image], log_det_shallow, atol=1e-5)
  np.testing.assert_allclose(terms.log_det_deep_bm[row, image], log_det_deep, atol=1e-5)
  # eq. 3.3: log p(x | c) = log N(z; 0, I) − Σ log s^deep + Σ_k log|det ∂f_s^k|
  log_p = (-0.5 * jnp.sum(z ** 2) - N * D * likelihood.HALF_LOG_2PI + log_det_deep
           + log_det_shallow)
  np.testing.assert_allclose(terms.nll_per_dim()[row, image], -log_p / (N * D), rtol=1e-5)


def test_deep_log_det_matches_jacobian(model_and_params):
  """−Σ log s^deep is log|det ∂z/∂u| of the deep stream, with u entering both streams."""
  model, params = model_and_params
  s = sequence()
  row, image = 0, 1

  def z_of_u(u_nd):
    u_all, _ = model.apply({"params": params}, s["x_bmnd"][row:row + 1], s["t_b"][row:row + 1],
                           method="encode_images")
    u_all = u_all.at[0, image].set(u_nd)
    u_seq = pretzel.place_elements(u_all, s["image_positions_bmn"][row:row + 1],
                                   s["image_valid_bm"][row:row + 1], s["ids_bt"].shape[1])
    streams = model.apply({"params": params}, s["ids_bt"][row:row + 1], u_seq,
                          s["is_visual_bt"][row:row + 1], s["positions_3bt"][:, row:row + 1],
                          s["valid_bt"][row:row + 1], s["t_b"][row:row + 1], method="streams")
    mean, log_s = model.apply({"params": params}, streams.g_btw, method="gaussians")
    index = s["image_positions_bmn"][row:row + 1, image:image + 1]
    valid = s["valid_bt"][row:row + 1]
    mean = pretzel.predictions_for_elements(mean, index, valid)[0, 0]
    log_s = pretzel.predictions_for_elements(log_s, index, valid)[0, 0]
    return affine.to_noise(u_nd, mean, log_s).reshape(-1), -jnp.sum(log_s)

  u_all, _ = jitted(model, "encode_images")(params, s["x_bmnd"][row:row + 1],
                                            s["t_b"][row:row + 1])
  u_nd = u_all[0, image]
  jacobian = jax.jit(jax.jacfwd(lambda u: z_of_u(u)[0]))(u_nd).reshape(N * D, N * D)
  _, log_det = np.linalg.slogdet(np.asarray(jacobian, np.float64))
  np.testing.assert_allclose(jax.jit(z_of_u)(u_nd)[1], log_det, atol=1e-4)


def test_kv_cached_decoding_equals_full_pass(model_and_params):
  model, params = model_and_params
  s = sequence()
  length = s["ids_bt"].shape[1]
  u_all, _ = jitted(model, "encode_images")(params, s["x_bmnd"], s["t_b"])
  u_seq = pretzel.place_elements(u_all, s["image_positions_bmn"], s["image_valid_bm"], length)
  inputs = (s["ids_bt"], u_seq, s["is_visual_bt"], s["positions_3bt"], s["valid_bt"])

  def outputs(streams):
    logits = jitted(model, "text_logits")(params, streams.h_vlm_btc, streams.g_btw)
    return (logits,) + jitted(model, "gaussians")(params, streams.g_btw)

  full = outputs(jitted(model, "streams")(params, *inputs, s["t_b"]))
  step = lambda chunk, cache: jitted(model, "streams")(params, *chunk, s["t_b"], cache)
  cache = pretzel.empty_cache(model.config, 2, length)
  prefill = 3                                      # a prompt, then one position per step
  chunks = [(0, prefill)] + [(i, i + 1) for i in range(prefill, length)]
  pieces = []
  for a, b in chunks:
    chunk = tuple(x[:, a:b] for x in inputs[:3]) + (inputs[3][:, :, a:b], inputs[4][:, a:b])
    streams = step(chunk, cache)
    cache = streams.cache
    pieces.append(outputs(streams))
  cached = [jnp.concatenate(p, axis=1) for p in zip(*pieces)]
  valid = np.asarray(s["valid_bt"])
  for got, want in zip(cached, full):
    assert max_abs_diff(np.asarray(got)[valid], np.asarray(want)[valid]) < 1e-5


def test_understanding_logits_skip_the_flow_stream_exactly_without_skips():
  s = sequence()
  model = pretzel.Pretzel(tiny_config(skips=False))
  params = random_params(model, *full_args(s))
  full = jitted(model)(params, *full_args(s)).logits_btv
  fast = jitted(model, "understanding_logits")(params, *full_args(s))
  assert max_abs_diff(fast, full) < 1e-6
  with pytest.raises(ValueError, match="skips"):
    pretzel.Pretzel(tiny_config(skips=True)).apply(
        {"params": params}, *full_args(s), method="understanding_logits")
