"""Scanned layer stacks (layers/scan.py) compute what the unrolled stacks compute.

Each check gives a scanned stack the parameters of an unrolled one, moved to the scanned
layout (`scan.scanned_layout`), and compares outputs, gradients and KV-cached decoding with
the unrolled model's full pass (the brute-force reference). The two programs round
differently (XLA compiles a loop body instead of straight-line code), so the comparisons use
the float32 policy of tests/tolerance.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import normal, random_params, transformer_config, unboxed
from tolerance import assert_float32_close
from test_pretzel import full_args, sequence, tiny_config as tiny_pretzel_config
from starflow2_jax import sharding
from starflow2_jax.layers import scan
from starflow2_jax.layers import transformer as transformer_lib
from starflow2_jax.models import pretzel
from starflow2_jax.models.qwen2_5_vl import config as qwen_config
from starflow2_jax.models.qwen2_5_vl import text as text_lib

BATCH, LENGTH, PREFIX, LAYERS = 2, 7, 3, 3


def _inputs(width):
  x = normal((BATCH, LENGTH, width), seed=3)
  positions = jnp.broadcast_to(jnp.arange(LENGTH), (BATCH, LENGTH))
  valid = np.ones((BATCH, LENGTH), bool)
  valid[0, 1] = valid[1, 0] = False          # padding inside a prefix and at a row's start
  return x, positions, jnp.asarray(valid)


def _transformers(remat="none"):
  """(config, unrolled module, scanned module, unrolled params, the same params scanned)."""
  config = dataclasses.replace(transformer_config(num_layers=LAYERS), remat=remat)
  unrolled = transformer_lib.Transformer(config)
  scanned = transformer_lib.Transformer(dataclasses.replace(config, scan=True))
  x, positions, valid = _inputs(config.width)
  params = unboxed(random_params(unrolled, x, positions, valid, seed=1))
  return config, unrolled, scanned, params, scan.scanned_layout(params)


def _prefill_then_steps(prefix, length):
  """Slices [a, b) of a sequence as cached decoding feeds it: a prompt, then one position at
  a time."""
  return [(0, prefix)] + [(i, i + 1) for i in range(prefix, length)]


def _bound(config, depth=None):
  return dict(depth=depth or config.num_layers, reduction=int(config.mlp_ratio * config.width))


def test_scanned_parameters_stack_the_layers_on_a_replicated_leading_axis():
  config = transformer_config(num_layers=LAYERS)
  module = transformer_lib.Transformer(dataclasses.replace(config, scan=True))
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), *_inputs(config.width)))
  boxed = boxed["params"]
  assert sorted(boxed) == ["final_norm", "layers"]
  query = boxed["layers"]["attention"]["query_kernel"]
  assert query.value.shape == (LAYERS, config.width, config.num_heads, config.head_dim)
  assert query.names == ("layers", "embed", "heads", "head_dim")
  # Under the default rules the layer axis is never split; the others shard as unrolled.
  mesh = jax.sharding.AbstractMesh((1, 1, 1), sharding.MESH_AXES)
  spec = sharding.logical_shardings(boxed, mesh, sharding.DEFAULT_RULES)
  assert tuple(spec["layers"]["attention"]["query_kernel"].spec) == (
      None, "fsdp", "tensor", None)


def test_layouts_round_trip_and_name_what_is_missing():
  _, _, _, params, stacked = _transformers()
  back = scan.unrolled_layout(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="missing"):
    scan.stack_layers({"layer_0": {}, "layer_2": {}}, 3)
  with pytest.raises(ValueError, match=r"beyond them \['layer_2'\]"):
    scan.stack_layers(params, 2)                  # a layer would be left behind
  with pytest.raises(ValueError, match="missing"):
    scan.scanned_layout({"layer_0": {}, "layer_2": {}})   # a gap
  with pytest.raises(ValueError, match="already scanned"):
    scan.stack_layers(stacked, LAYERS)


@pytest.mark.parametrize("rope_layout", [None, "interleaved"])
def test_scanned_full_pass_equals_unrolled(rope_layout):
  config, unrolled, scanned, params, stacked = _transformers()
  x, positions, valid = _inputs(config.width)
  if rope_layout:             # the deep stream's M-RoPE path: positions [3, B, T]
    config = pretzel.with_flow_positions(config, rope_layout)
    unrolled = transformer_lib.Transformer(config)
    scanned = transformer_lib.Transformer(dataclasses.replace(config, scan=True))
    positions = jnp.stack([positions, positions // 2, positions % 3])
  want, _ = jax.jit(unrolled.apply)({"params": params}, x, positions, valid)
  got, _ = jax.jit(scanned.apply)({"params": stacked}, x, positions, valid)
  assert_float32_close(got, want, **_bound(config))


def test_scanned_kv_cached_decode_equals_unrolled_full_pass():
  """Prefill then one token at a time through the stacked cache [L, B, S, N, H]."""
  config, unrolled, scanned, params, stacked = _transformers()
  x, positions, valid = _inputs(config.width)
  want, _ = jax.jit(unrolled.apply)({"params": params}, x, positions, valid)
  step = jax.jit(lambda x, p, v, c: scanned.apply({"params": stacked}, x, p, v, c))
  cache = dataclasses.replace(config, scan=True).empty_cache(BATCH, LENGTH)
  assert cache.layers.keys_bsnh.shape == (LAYERS, BATCH, LENGTH, config.num_heads,
                                          config.head_dim)
  pieces = []
  for a, b in _prefill_then_steps(PREFIX, LENGTH):
    y, cache = step(x[:, a:b], positions[:, a:b], valid[:, a:b], cache)
    pieces.append(y)
  assert int(cache.length) == LENGTH
  assert_float32_close(jnp.concatenate(pieces, axis=1), want, **_bound(config))


def _decode_step_temp_bytes(config, batch=8, max_length=2048):
  """(temporary bytes of one compiled decode step with the cache donated, cache bytes)."""
  module = transformer_lib.Transformer(config)
  x = jnp.zeros((batch, 1, config.width))
  positions, valid = jnp.zeros((batch, 1), jnp.int32), jnp.ones((batch, 1), bool)
  params = jax.eval_shape(lambda: module.init(jax.random.key(0), x, positions, valid))
  cache = jax.eval_shape(lambda: config.empty_cache(batch, max_length))
  step = jax.jit(lambda p, x, c: module.apply(p, x, positions, valid, c), donate_argnums=2)
  memory = step.lower(params, x, cache).compile().memory_analysis()
  return memory.temp_size_in_bytes, sum(a.size * a.dtype.itemsize
                                        for a in jax.tree.leaves(cache))


def test_a_scanned_decode_step_writes_the_cache_in_place():
  """The scan carries the stacked cache and writes each layer's new slot into it: a decode
  step needs no second cache (scanning over the cache as an input stacked the outputs into
  a new one: 48 MiB of temp for this 32 MiB cache, against 8 MiB unrolled)."""
  config = transformer_config(width=64, num_layers=4, num_heads=4)
  unrolled_temp, cache_bytes = _decode_step_temp_bytes(config)
  scanned_temp, _ = _decode_step_temp_bytes(dataclasses.replace(config, scan=True))
  assert scanned_temp < cache_bytes / 2
  assert scanned_temp <= 1.25 * unrolled_temp


@pytest.mark.parametrize("remat", ["none", "full", "save_outs"])
def test_scanned_gradients_equal_unrolled(remat):
  """The backward pass through the scan (and its rematerialisation) gives the unrolled
  gradients; depth counts the layers twice (forward and backward both cross them)."""
  config, unrolled, scanned, params, stacked = _transformers(remat)
  x, positions, valid = _inputs(config.width)
  loss = lambda module: jax.jit(jax.grad(
      lambda p: jnp.sum(jnp.sin(module.apply({"params": p}, x, positions, valid)[0]))))
  want = scan.scanned_layout(loss(unrolled)(params))
  got = loss(scanned)(stacked)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert_float32_close(g, w, **_bound(config, depth=2 * config.num_layers))


def _program_size(config, num_layers):
  """Lines of the StableHLO of a jitted gradient step of a `num_layers` Transformer."""
  config = dataclasses.replace(config, num_layers=num_layers)
  module = transformer_lib.Transformer(config)
  x, positions, valid = _inputs(config.width)
  params = jax.eval_shape(lambda: unboxed(module.init(jax.random.key(0), x, positions,
                                                      valid)["params"]))
  step = jax.jit(jax.grad(lambda p: jnp.sum(module.apply({"params": p}, x, positions,
                                                         valid)[0])))
  return len(step.lower(params).as_text().splitlines())


def test_scanned_program_does_not_grow_with_depth():
  """What the compiler is given: one layer's program for a scanned stack whatever its
  depth, L copies for an unrolled one (compile time follows the program's size)."""
  config = dataclasses.replace(transformer_config(), remat="full")
  scanned = [_program_size(dataclasses.replace(config, scan=True), n) for n in (2, 8)]
  unrolled = [_program_size(config, n) for n in (2, 8)]
  assert scanned[1] == scanned[0], scanned
  assert unrolled[1] > 3 * unrolled[0], unrolled


def _qwen_decoders():
  config = qwen_config.preset("tiny").text
  unrolled = text_lib.TextDecoder(config)
  scanned = text_lib.TextDecoder(config, scan=True)
  embeds = normal((BATCH, LENGTH, config.hidden_size), seed=5)
  positions = jnp.broadcast_to(jnp.arange(LENGTH), (3, BATCH, LENGTH))
  valid = _inputs(1)[2]
  params = unboxed(random_params(unrolled, embeds, positions, valid, seed=2))
  return config, unrolled, scanned, params, (embeds, positions, valid)


def test_scanned_qwen_decoder_equals_unrolled_full_and_cached():
  config, unrolled, scanned, params, (embeds, positions, valid) = _qwen_decoders()
  stacked = scan.scanned_layout(params)
  assert "layers" in stacked and "layer_0" not in stacked
  want, _ = jax.jit(unrolled.apply)({"params": params}, embeds, positions, valid)
  got, _ = jax.jit(scanned.apply)({"params": stacked}, embeds, positions, valid)
  bound = dict(depth=config.num_layers, reduction=config.intermediate_size)
  assert_float32_close(got, want, **bound)
  step = jax.jit(lambda e, p, v, c: scanned.apply({"params": stacked}, e, p, v, c))
  cache = text_lib.empty_cache(config, BATCH, LENGTH, jnp.float32, scan=True)
  pieces = []
  for a, b in _prefill_then_steps(PREFIX, LENGTH):
    y, cache = step(embeds[:, a:b], positions[:, :, a:b], valid[:, a:b], cache)
    pieces.append(y)
  assert_float32_close(jnp.concatenate(pieces, axis=1), want, **bound)


def _pretzel_pair():
  """A two-layer tiny Pretzel unrolled and scanned (VLM, deep and shallow stacks alike)."""
  cfg = tiny_pretzel_config()
  two = lambda t: dataclasses.replace(t, num_layers=2)
  flow = dataclasses.replace(cfg.flow, deep=two(cfg.flow.deep), shallow=two(cfg.flow.shallow))
  cfg = dataclasses.replace(cfg, vlm=dataclasses.replace(cfg.vlm, num_layers=2), flow=flow)
  scan_all = lambda t: dataclasses.replace(t, scan=True)
  scanned_cfg = dataclasses.replace(
      cfg, vlm_scan=True, flow=dataclasses.replace(flow, deep=scan_all(flow.deep),
                                                   shallow=scan_all(flow.shallow)))
  unrolled = pretzel.Pretzel(cfg)
  params = unboxed(random_params(unrolled, *full_args(sequence())))
  return unrolled, pretzel.Pretzel(scanned_cfg), params


def test_scanned_pretzel_equals_unrolled():
  """Text logits and every image's flow terms of the whole model, every stack scanned."""
  unrolled, scanned, params = _pretzel_pair()
  stacked = scan.scanned_layout(params)
  for part in ("vlm", "flow", "shallow_0"):
    assert "layer_0" not in str(jax.tree_util.tree_flatten_with_path(stacked[part])[0])
  args = full_args(sequence())
  want = jax.jit(unrolled.apply)({"params": params}, *args)
  got = jax.jit(scanned.apply)({"params": stacked}, *args)
  flow = unrolled.config.flow.deep
  # Depth: the VLM's layers, then the deep stream's and the head.
  bound = dict(depth=unrolled.config.vlm.num_layers + flow.num_layers + 1,
               reduction=max(unrolled.config.vlm.intermediate_size, 2 * flow.width))
  assert_float32_close(got.logits_btv, want.logits_btv, **bound)
  assert_float32_close(got.images.z_bmnd, want.images.z_bmnd, **bound)
  assert_float32_close(got.images.log_det_deep_bm + got.images.log_det_shallow_bm,
                       want.images.log_det_deep_bm + want.images.log_det_shallow_bm, **bound)


def test_scanned_pretzel_kv_cache_decodes_the_full_pass():
  unrolled, scanned, params = _pretzel_pair()
  stacked = scan.scanned_layout(params)
  s = sequence()
  length = s["ids_bt"].shape[1]
  u_all, _ = jax.jit(lambda p: unrolled.apply({"params": p}, s["x_bmnd"], s["t_b"],
                                              method="encode_images"))(params)
  u_seq = pretzel.place_elements(u_all, s["image_positions_bmn"], s["image_valid_bm"], length)
  inputs = (s["ids_bt"], u_seq, s["is_visual_bt"], s["positions_3bt"], s["valid_bt"])
  streams = lambda module, p: jax.jit(lambda *a: module.apply({"params": p}, *a,
                                                              method="streams"))
  full = streams(unrolled, params)(*inputs, s["t_b"])
  step = streams(scanned, stacked)
  cache = pretzel.empty_cache(scanned.config, 2, length)
  assert cache.vlm.layers.keys_bsnh.shape[0] == cache.flow.layers.keys_bsnh.shape[0] == 2
  pieces = []
  for a, b in _prefill_then_steps(3, length):
    chunk = tuple(x[:, a:b] for x in inputs[:3]) + (inputs[3][:, :, a:b], inputs[4][:, a:b])
    out = step(*chunk, s["t_b"], cache)
    cache = out.cache
    pieces.append((out.h_vlm_btc, out.g_btw))
  valid = np.asarray(s["valid_bt"])
  cfg = unrolled.config
  for got, want, depth, reduction in zip(
      [jnp.concatenate(p, axis=1) for p in zip(*pieces)], (full.h_vlm_btc, full.g_btw),
      (cfg.vlm.num_layers, cfg.vlm.num_layers + cfg.flow.deep.num_layers),
      (cfg.vlm.intermediate_size, max(cfg.vlm.intermediate_size, 2 * cfg.flow.deep.width))):
    assert_float32_close(np.asarray(got)[valid], np.asarray(want)[valid], depth=depth,
                         reduction=reduction)


def test_memory_analysis_counts_a_loop_body_s_temporaries():
  """What docs/plan.md rests on: the compiler's buffer assignment counts the temporaries
  inside a `lax.scan` body (two 64 MiB operands of a matrix product, formed per iteration)
  as it does for the unrolled loop, so scanned plans are not small by omission."""
  n = 4096
  def body(c, w):
    outer = jnp.outer(c, w)
    return c + (jnp.sin(outer) @ jnp.cos(outer)).sum(1), None
  def scanned(c, ws):
    return jax.lax.scan(body, c, ws)[0]
  def unrolled(c, ws):
    for i in range(ws.shape[0]):
      c, _ = body(c, ws[i])
    return c
  shapes = (jax.ShapeDtypeStruct((n,), jnp.float32), jax.ShapeDtypeStruct((4, n), jnp.float32))
  temp = lambda f: jax.jit(f).lower(*shapes).compile().memory_analysis().temp_size_in_bytes
  operands = 2 * n * n * 4
  assert temp(scanned) >= operands and temp(unrolled) >= operands


@pytest.mark.slow        # ~40 s: two samplers compiled
def test_the_sampler_draws_the_same_images_from_a_scanned_stage():
  """The whole caption -> image sampler (prefill, guided next-Gaussian decoding through both
  stacked caches, denoising) on the tiny stage 3, unrolled vs scanned with the same
  parameters. uint8 pixels: a float32 rounding difference may move a pixel across a
  rounding boundary, by one level, rarely (measured here: none differ)."""
  from experiments import starflow2
  from starflow2_jax.training import tasks
  built = []
  for scan_layers in (False, True):
    config = starflow2.get_config("stage=3,size=tiny")
    config.model.scan_layers = scan_layers
    built.append((config, tasks.build_task(config)))
  (config, unrolled), (_, scanned) = built
  params = sharding.strip_axis_names(jax.jit(unrolled.init_params)(jax.random.key(0)))
  noise = np.random.default_rng(0)       # away from the zero-initialised heads and skips
  params = jax.tree.map(lambda x: x + 0.05 * noise.normal(size=x.shape).astype(x.dtype),
                        jax.device_get(params))
  captions = list(config.sample.captions[:3])
  want = np.asarray(unrolled.sample_captions(params, captions, jax.random.key(1)), np.int32)
  got = np.asarray(scanned.sample_captions(scan.scanned_layout(params), captions,
                                           jax.random.key(1)), np.int32)
  assert want.shape == got.shape == (3, 28, 28, 1)
  assert np.abs(got - want).max() <= 1 and np.mean(got != want) <= 0.01
