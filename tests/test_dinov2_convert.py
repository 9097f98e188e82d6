"""The DINOv2 importer: every accepted spelling gives the same parameters, layouts checked by
hand, the position table resampled as PyTorch resamples it, errors that name the file and
the tensor, Orbax copies, and config.json's defaults.

Checkpoints here are synthetic (random numpy tensors written with safetensors), so only the
resampling and config-default checks need torch / transformers; parity with the PyTorch model
itself is tests/test_dinov2_parity.py.
"""

import json

import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec
from safetensors.numpy import save_file

from starflow2_jax import sharding as sharding_lib
from starflow2_jax.convert import bicubic
from starflow2_jax.convert import dinov2 as dinov2_convert
from starflow2_jax.models.dinov2 import config as config_lib
from starflow2_jax.models.dinov2 import image_processing
from starflow2_jax.models.dinov2 import model as model_lib
from starflow2_jax.models.qwen2_5_vl import config as qwen_config_lib
from tolerance import EPS32

# Registers and SwiGLU: the spelling with the most distinct tensor names.
CONFIG = config_lib.preset("tiny-reg").replace(use_swiglu=True)
# transformers 5's in-memory spelling of the on-disk names (its conversion mapping).
IN_MEMORY = (("attention.attention.query.", "attention.q_proj."),
             ("attention.attention.key.", "attention.k_proj."),
             ("attention.attention.value.", "attention.v_proj."),
             ("attention.output.dense.", "attention.o_proj."),
             ("mlp.weights_out.", "mlp.down_proj."))


def _tensors(config=CONFIG, seed=0):
  """{on-disk name: random float32 array} of a checkpoint for `config`, mask token included."""
  rng = np.random.RandomState(seed)
  rules = dinov2_convert.tensor_rules(config, config.image_size, antialias=False)
  tensors = {name: rng.randn(*rule.shape).astype(np.float32) for name, rule in rules.items()}
  tensors["embeddings.mask_token"] = rng.randn(1, config.hidden_size).astype(np.float32)
  return tensors


def _in_memory(tensors, prefix=""):
  """The same tensors spelled as transformers 5 holds them (fused SwiGLU input split)."""
  renamed = {}
  for name, value in tensors.items():
    if ".mlp.weights_in." in name:
      gate, up = np.split(value, 2)
      renamed[prefix + name.replace("weights_in", "gate_proj")] = gate
      renamed[prefix + name.replace("weights_in", "up_proj")] = up
      continue
    for disk, memory in IN_MEMORY:
      name = name.replace(disk, memory)
    renamed[prefix + name] = value
  return renamed


def _write(directory, tensors, config=CONFIG, num_shards=1, hf=None):
  """A checkpoint directory: config.json and one safetensors file or shards + index."""
  directory.mkdir(parents=True, exist_ok=True)
  if num_shards == 1:
    save_file(tensors, str(directory / "model.safetensors"))
  else:
    names, weight_map = sorted(tensors), {}
    for i in range(num_shards):
      shard = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
      save_file({n: tensors[n] for n in names[i::num_shards]}, str(directory / shard))
      weight_map.update({n: shard for n in names[i::num_shards]})
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))
  (directory / "config.json").write_text(json.dumps(hf or config_lib.to_hf_dict(config)))
  return directory


def _flat(params):
  return traverse_util.flatten_dict(params)


def _assert_same_params(a, b):
  a, b = _flat(a), _flat(b)
  assert set(a) == set(b)
  for path in a:
    np.testing.assert_array_equal(np.asarray(a[path]), np.asarray(b[path]), err_msg=str(path))


# ---------------------------------------------------------------- names and layouts

def test_every_spelling_gives_the_same_parameters(tmp_path):
  tensors = _tensors()
  disk = _write(tmp_path / "disk", tensors)
  head = dict(tensors, **{"classifier.weight": np.ones((3, 64), np.float32),
                          "classifier.bias": np.ones((3,), np.float32)})
  classification = _write(tmp_path / "classification",
                          {"dinov2_with_registers." + n if not n.startswith("classifier") else n:
                           v for n, v in head.items()}, num_shards=3)
  memory = _write(tmp_path / "memory", _in_memory(tensors, prefix="dinov2."), num_shards=2)
  config, params, _, _ = dinov2_convert.load_hf_checkpoint(disk)
  assert config == CONFIG
  for other in (classification, memory):
    _assert_same_params(dinov2_convert.load_hf_checkpoint(other)[1], params)


def test_layouts_by_hand(tmp_path):
  tensors = _tensors()
  _, params, _, _ = dinov2_convert.load_hf_checkpoint(_write(tmp_path, tensors))
  d, p, h = CONFIG.hidden_size, CONFIG.patch_size, CONFIG.mlp_hidden
  # The patch projection is the stride-p convolution of channels-first pixels.
  pixels = np.random.RandomState(1).randn(1, CONFIG.image_size, CONFIG.image_size, 3)
  weight = tensors["embeddings.patch_embeddings.projection.weight"]
  g = CONFIG.grid
  blocks = pixels[0].reshape(g, p, g, p, 3)                          # [gy, y, gx, x, c]
  conv = np.einsum("dcyx,iyjxc->ijd", weight, blocks).reshape(g * g, d)
  ours = model_lib.patchify(pixels, p)[0] @ params["patch_embed"]["kernel"]
  np.testing.assert_allclose(ours, conv, rtol=1e-5, atol=1e-5)
  q = tensors["encoder.layer.1.attention.attention.query.weight"]   # [out, in]
  np.testing.assert_array_equal(params["layer_1"]["attention"]["query_kernel"],
                                q.T.reshape(d, CONFIG.num_heads, CONFIG.head_dim))
  fused = tensors["encoder.layer.0.mlp.weights_in.weight"]            # [gate; up]
  np.testing.assert_array_equal(params["layer_0"]["mlp"]["gate_kernel"], fused[:h].T)
  np.testing.assert_array_equal(params["layer_0"]["mlp"]["up_kernel"], fused[h:].T)
  np.testing.assert_array_equal(params["register_tokens"], tensors["embeddings.register_tokens"][0])
  np.testing.assert_array_equal(params["cls_token"], tensors["embeddings.cls_token"].reshape(d))
  assert "mask_token" not in str(list(_flat(params)))


@pytest.mark.parametrize("model_type", ["dinov2", "dinov2_with_registers"])
def test_position_table_resampled_by_the_models_recipe(tmp_path, model_type):
  config = CONFIG.replace(num_register_tokens=4 if model_type != "dinov2" else 0)
  tensors = _tensors(config)
  hf_dir = _write(tmp_path, tensors, config)
  source = tensors["embeddings.position_embeddings"][0]
  native = dinov2_convert.load_hf_checkpoint(hf_dir)[1]["position_embedding"]
  np.testing.assert_array_equal(native, source)                     # its own size: unchanged
  config_28, params, _, _ = dinov2_convert.load_hf_checkpoint(hf_dir, 28)
  table = params["position_embedding"]
  assert config_28.grid == 7 and table.shape == (1 + 49, config.hidden_size)
  np.testing.assert_array_equal(table[0], source[0])                 # [CLS] as is
  grid = source[1:].reshape(4, 4, -1)
  want = bicubic.resize(grid, 7, 7, antialias=model_type != "dinov2").reshape(49, -1)
  np.testing.assert_array_equal(table[1:], want.astype(np.float32))
  other = bicubic.resize(grid, 7, 7, antialias=model_type == "dinov2").reshape(49, -1)
  assert np.abs(other - want).max() > 0.01 * np.abs(want).max()     # the recipe matters


@pytest.mark.parametrize("size_in,size_out", [((4, 4), (6, 6)), ((4, 4), (3, 3)),
                                              ((16, 16), (37, 37)), ((37, 37), (16, 16)),
                                              ((5, 7), (9, 4)), ((37, 37), (2, 2))])
@pytest.mark.parametrize("antialias", [False, True])
def test_bicubic_matches_pytorch(size_in, size_out, antialias):
  torch = pytest.importorskip("torch")
  x = np.random.RandomState(0).randn(*size_in, 3).astype(np.float32)
  want = torch.nn.functional.interpolate(
      torch.tensor(x.transpose(2, 0, 1)[None]), size=size_out, mode="bicubic",
      align_corners=False, antialias=antialias)[0].numpy().transpose(1, 2, 0)
  got = bicubic.resize(x, *size_out, antialias=antialias)
  # PyTorch computes in float32, and rounds the sampling coordinate (i + ½)·in/out − ½ too:
  # an error of up to eps·in in the taps' offsets, which their O(1)-slope weights pass on.
  # Per pass ≈ eps·(in + taps)·scale; 4× margin per pass (tests/tolerance.py), two passes.
  taps = 4 * max(1.0, max(a / b for a, b in zip(size_in, size_out)))
  bound = 2 * 4 * EPS32 * (max(size_in) + taps) * np.abs(want).max()
  assert np.abs(got - want).max() <= bound
  if size_in == size_out:
    np.testing.assert_array_equal(got, x)


# ---------------------------------------------------------------- errors

def test_missing_directory_and_config_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
    dinov2_convert.load_hf_checkpoint(tmp_path / "nowhere")
  save_file(_tensors(), str(tmp_path / "model.safetensors"))
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "config.json")):
    dinov2_convert.convert(tmp_path, tmp_path / "out", 16)


def test_a_foreign_checkpoint_is_refused_by_name(tmp_path):
  qwen = qwen_config_lib.to_hf_dict(qwen_config_lib.preset("tiny"))
  hf_dir = _write(tmp_path / "qwen", {"model.embed_tokens.weight": np.zeros((4, 4), np.float32)},
                  hf=qwen)
  with pytest.raises(ValueError) as error:
    dinov2_convert.load_hf_checkpoint(hf_dir)
  assert str(hf_dir / "config.json") in str(error.value) and "qwen2_5_vl" in str(error.value)
  # A DINOv2 config.json over another model's tensors: all of them named at once.
  hf_dir = _write(tmp_path / "mixed", {"model.embed_tokens.weight": np.zeros((4, 4), np.float32)})
  with pytest.raises(dinov2_convert.hf_files.CheckpointMismatchError) as error:
    dinov2_convert.load_hf_checkpoint(hf_dir)
  message = str(error.value)
  assert "unexpected: model.embed_tokens.weight" in message
  expected = dinov2_convert.tensor_rules(CONFIG, CONFIG.image_size, antialias=True)
  assert f"{len(expected)} missing: embeddings.cls_token, " in message   # the first 20 listed


def test_mismatched_tensors_are_all_named_with_their_file(tmp_path):
  tensors = _in_memory(_tensors())
  tensors["encoder.layer.0.attention.q_proj.weight"] = np.zeros((31, 32), np.float32)
  tensors["encoder.layer.1.norm2.weight"] = np.zeros((33,), np.float32)
  del tensors["layernorm.bias"]
  tensors["encoder.layer.0.extra.weight"] = np.zeros((2,), np.float32)
  hf_dir = _write(tmp_path, tensors, num_shards=2)
  with pytest.raises(dinov2_convert.hf_files.CheckpointMismatchError) as error:
    dinov2_convert.load_hf_checkpoint(hf_dir)
  message = str(error.value)
  assert str(hf_dir) in message
  assert "1 missing: layernorm.bias" in message
  assert "1 unexpected: encoder.layer.0.extra.weight" in message
  shard = lambda name: dinov2_convert.hf_files.read_headers(hf_dir)[name][0].name
  assert (f"encoder.layer.0.attention.attention.query.weight: file (31, 32), config expects "
          f"(32, 32) (in {shard('encoder.layer.0.attention.q_proj.weight')} as "
          "encoder.layer.0.attention.q_proj.weight)") in message
  assert (f"encoder.layer.1.norm2.weight: file (33,), config expects (32,) "
          f"(in {shard('encoder.layer.1.norm2.weight')})") in message


# ---------------------------------------------------------------- Orbax copies

def test_orbax_copy_round_trips_with_mean_and_std(tmp_path):
  hf_dir = _write(tmp_path / "hf", _tensors())
  mean, std = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
  (hf_dir / "preprocessor_config.json").write_text(json.dumps(dict(image_mean=mean,
                                                                   image_std=std)))
  out = dinov2_convert.convert(hf_dir, tmp_path / "out", 24)
  config, params, got_mean, got_std = dinov2_convert.load_converted(out)
  want_config, want_params, _, _ = dinov2_convert.load_hf_checkpoint(hf_dir, 24)
  assert config == want_config and config.image_size == 24
  assert (got_mean, got_std) == (tuple(mean), tuple(std))
  _assert_same_params(params, want_params)
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(params))
  saved = json.loads((out / dinov2_convert.CONVERTED_JSON).read_text())
  assert saved["source"] == dict(directory=str(hf_dir.absolute()),
                                 model_type="dinov2_with_registers", image_size=16)
  # Onto a mesh, laid out by the logical axis names.
  mesh = sharding_lib.make_mesh(dict(data=1, fsdp=4, tensor=2))
  _, sharded, _, _ = dinov2_convert.load_converted(out, mesh=mesh)
  query = sharded["layer_0"]["attention"]["query_kernel"]
  assert query.sharding.spec == PartitionSpec("fsdp", "tensor", None)
  _assert_same_params(sharded, want_params)


def test_without_preprocessor_config_the_mean_and_std_are_imagenets(tmp_path):
  hf_dir = _write(tmp_path / "hf", _tensors())
  out = dinov2_convert.convert(hf_dir, tmp_path / "out", 16)
  _, _, mean, std = dinov2_convert.load_converted(out)
  assert (mean, std) == (image_processing.IMAGENET_MEAN, image_processing.IMAGENET_STD)
  with pytest.raises(FileNotFoundError, match="dinov2.json"):
    dinov2_convert.load_converted(hf_dir)


# ---------------------------------------------------------------- config.json

@pytest.mark.parametrize("model_type", ["dinov2", "dinov2_with_registers"])
def test_missing_config_keys_take_transformers_defaults(model_type):
  transformers = pytest.importorskip("transformers")
  reference = {"dinov2": transformers.Dinov2Config,
               "dinov2_with_registers": transformers.Dinov2WithRegistersConfig}[model_type]()
  config = config_lib.from_hf_dict({"model_type": model_type})
  assert (config.patch_size, config.image_size) == (reference.patch_size, reference.image_size)
  assert config.num_register_tokens == (getattr(reference, "num_register_tokens", None) or 0)
  assert (config.hidden_size, config.num_layers, config.num_heads, config.mlp_ratio,
          config.use_swiglu, config.layer_norm_eps, config.layerscale_value) == (
              reference.hidden_size, reference.num_hidden_layers, reference.num_attention_heads,
              reference.mlp_ratio, reference.use_swiglu_ffn, reference.layer_norm_eps,
              reference.layerscale_value)
  assert config_lib.from_hf_dict({"model_type": model_type, "image_size": [28, 28]},
                                 image_size=56).image_size == 56


def test_presets():
  assert {"tiny", "s14", "b14", "l14", "g14", "s14-reg", "g14-reg"} <= set(config_lib.PRESETS)
  assert config_lib.preset("b14-reg").num_register_tokens == 4
  assert config_lib.preset("g14").mlp_hidden == 4096           # SwiGLU: ⌈⅔·6144⌉₈
  assert config_lib.preset("l14").mlp_hidden == 4096           # MLP: 4·1024
  with pytest.raises(ValueError, match="unknown DINOv2 preset"):
    config_lib.preset("h14")
