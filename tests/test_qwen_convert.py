"""The Qwen2.5-VL importer: lazy loading into shardings, memory bound, errors, Orbax copies.

The checkpoints here are synthetic (random numpy tensors written with safetensors across
several shards and an index), so no PyTorch is needed.
"""

import json
import tracemalloc

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

from starflow2_jax import sharding as sharding_lib
from starflow2_jax.convert import qwen as qwen_convert
from starflow2_jax.models.qwen2_5_vl import config as config_lib

try:
  from tests import qwen_helpers as qh
except ImportError:
  import qwen_helpers as qh

# More, wider layers than the tiny preset, so the model is many times its largest tensor.
CONFIG = config_lib.preset("tiny").replace(text=config_lib.preset("tiny").text.__class__(
    vocab_size=512, hidden_size=64, intermediate_size=256, num_layers=6, num_heads=4,
    num_kv_heads=2, mrope_section=(2, 3, 3)))


def _write_checkpoint(directory, config=CONFIG, num_shards=3, dtype=np.float32,
                      in_memory_names=False, edit=None):
  """Random tensors for every rule, in `num_shards` files + index; returns {name: array}."""
  rng = np.random.RandomState(0)
  tensors = {name: rng.randn(*rule.shape).astype(dtype)
             for name, rule in qwen_convert.tensor_rules(config).items()}
  if edit:
    edit(tensors)
  if in_memory_names:
    rename = lambda n: ("model.language_model." + n[6:] if n.startswith("model.") else
                        "model." + n if n.startswith("visual.") else n)
    tensors = {rename(n): t for n, t in tensors.items()}
  names = sorted(tensors)
  weight_map = {}
  for i in range(num_shards):
    shard = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
    part = names[i::num_shards]
    save_file({n: tensors[n] for n in part}, str(directory / shard))
    weight_map.update({n: shard for n in part})
  (directory / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {}, "weight_map": weight_map}))
  (directory / "config.json").write_text(json.dumps(config_lib.to_hf_dict(config)))
  (directory / "tokenizer.json").write_text("{}")
  return tensors


@pytest.fixture(scope="module", name="checkpoint")
def _checkpoint(tmp_path_factory):
  directory = tmp_path_factory.mktemp("synthetic_qwen")
  return directory, _write_checkpoint(directory)


def _flat(params):
  return traverse_util.flatten_dict(params)


def _mesh():
  return sharding_lib.make_mesh(dict(data=1, fsdp=4, tensor=2))


def test_loads_every_tensor_into_its_layout_and_sharding(checkpoint):
  directory, tensors = checkpoint
  params = qwen_convert.load_hf_checkpoint(directory, mesh=_mesh())
  flat = _flat(params)
  # A few layouts checked by hand: embedding as is, q kernel [D, heads, hd], fused qkv split.
  np.testing.assert_array_equal(flat[("text", "embed_tokens", "embedding")],
                                tensors["model.embed_tokens.weight"])
  q = tensors["model.layers.2.self_attn.q_proj.weight"]
  np.testing.assert_array_equal(flat[("text", "layer_2", "attention", "query_kernel")],
                                q.T.reshape(64, 4, 16))
  qkv = tensors["visual.blocks.1.attn.qkv.weight"]
  np.testing.assert_array_equal(flat[("vision", "block_1", "attention", "value_kernel")],
                                qkv[64:].T.reshape(32, 2, 16))
  # Shardings are the logical ones: embed over fsdp, heads / mlp / vocab over tensor.
  spec = lambda path: tuple(flat[path].sharding.spec)
  assert spec(("text", "layer_0", "attention", "query_kernel")) == ("fsdp", "tensor", None)
  assert spec(("text", "layer_0", "mlp", "down_kernel")) == ("tensor", "fsdp")
  assert spec(("text", "lm_head")) == ("fsdp", "tensor")
  assert len(flat) == sum(len(r.targets) for r in qwen_convert.tensor_rules(CONFIG).values())


def test_host_memory_stays_within_one_tensor(checkpoint):
  """Bound: while tensors are read and placed, traced host memory rises by at most
  2 × the largest tensor (the tensor read and its rearranged copy) + the Python bookkeeping
  the new jax.Arrays keep (measured: what is still allocated afterwards) + 64 KiB, and no
  numpy data outlives the load. The model itself is > 8 × the largest tensor.

  Planning (headers, shape checks, target shardings: it traces the model abstractly, which
  allocates Python objects but no tensors) and a first warm-up load come first, so that
  one-off JAX caches are not counted.
  """
  directory, tensors = checkpoint
  largest = max(t.nbytes for t in tensors.values())
  total = sum(t.nbytes for t in tensors.values())
  assert total > 8 * largest
  plan = qwen_convert.plan_import(directory, mesh=_mesh())
  jax.block_until_ready(qwen_convert.load_planned(plan))
  stats = qwen_convert.LoadStats()
  tracemalloc.start()
  try:
    start, _ = tracemalloc.get_traced_memory()
    params = qwen_convert.load_planned(plan, stats)
    end, peak = tracemalloc.get_traced_memory()
    numpy_domain = tracemalloc.DomainFilter(True, 389047)     # numpy's data allocations
    numpy_left = sum(stat.size for stat in tracemalloc.take_snapshot().filter_traces(
        [numpy_domain]).statistics("filename"))
  finally:
    tracemalloc.stop()
  jax.block_until_ready(params)
  assert stats.max_source_tensors_alive == 1
  assert stats.tensors_read == len(tensors)
  assert stats.peak_host_bytes <= 2 * largest
  bookkeeping = end - start
  assert peak - start <= 2 * largest + bookkeeping + 64 * 1024, (peak - start, largest, total)
  assert numpy_left <= 64 * 1024


def test_in_memory_names_and_bfloat16(tmp_path):
  tensors = _write_checkpoint(tmp_path, num_shards=2, dtype=ml_dtypes.bfloat16,
                              in_memory_names=True)
  for dtype in (jnp.bfloat16, jnp.float32):
    flat = _flat(qwen_convert.load_hf_checkpoint(tmp_path, dtype=dtype))
    leaf = flat[("text", "layer_5", "mlp", "up_kernel")]
    assert leaf.dtype == dtype
    want = tensors["model.language_model.layers.5.mlp.up_proj.weight"].T
    np.testing.assert_array_equal(np.asarray(leaf, np.float32), want.astype(np.float32))


def test_one_error_lists_missing_unexpected_and_misshaped(tmp_path):
  def edit(tensors):
    del tensors["model.layers.1.mlp.gate_proj.weight"]
    tensors["model.layers.1.mlp.extra.weight"] = np.zeros(3, np.float32)
    tensors["visual.merger.mlp.2.bias"] = np.zeros(7, np.float32)
  _write_checkpoint(tmp_path, edit=edit)
  with pytest.raises(qwen_convert.CheckpointMismatchError) as error:
    qwen_convert.load_hf_checkpoint(tmp_path)
  message = str(error.value)
  assert str(tmp_path) in message
  assert "1 missing: model.layers.1.mlp.gate_proj.weight" in message
  assert "1 unexpected: model.layers.1.mlp.extra.weight" in message
  assert "visual.merger.mlp.2.bias: file (7,), config expects (64,)" in message


def test_orbax_copy_round_trips_onto_another_mesh(checkpoint, tmp_path):
  directory, _ = checkpoint
  params = qwen_convert.load_hf_checkpoint(directory, mesh=_mesh())
  out = qwen_convert.save_converted(params, directory, tmp_path / "converted")
  assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
  assert qwen_convert.is_converted(out)
  mesh = sharding_lib.make_mesh(dict(data=1, fsdp=8, tensor=1))
  model, restored = qwen_convert.load_vlm(out, mesh=mesh)
  assert model.config.text == CONFIG.text
  flat, flat_restored = _flat(params), _flat(restored)
  assert flat.keys() == flat_restored.keys()
  for path, value in flat.items():
    np.testing.assert_array_equal(np.asarray(flat_restored[path]), np.asarray(value))
  kernel = flat_restored[("text", "layer_0", "attention", "query_kernel")]
  assert kernel.sharding.mesh.shape == mesh.shape and kernel.sharding.spec[0] == "fsdp"
