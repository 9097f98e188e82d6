"""Import a Hugging Face DINOv2 checkpoint (`Dinov2Model` or `Dinov2WithRegistersModel`,
safetensors, one file or sharded with an index) into Flax parameters, and keep an Orbax copy.

Names and shapes are checked from the headers before anything is read (every problem in one
error), then tensors are read one at a time, rearranged and cast to float32. Accepted
spellings: the on-disk one (what `save_pretrained` and the hub use: `attention.attention.
query`, a fused SwiGLU `mlp.weights_in`), transformers 5's in-memory one (`attention.q_proj`,
`mlp.gate_proj` / `up_proj`), and both under the `dinov2.` / `dinov2_with_registers.` prefix
of the classification checkpoints (whose head is ignored). The mask token is not ported.

The position table is resampled here, once, to the requested `image_size` with the
reference's own recipe (transformers 5.23's `interpolate_pos_encoding`): bicubic to
(image_size // patch)² positions from the `size`, plain (A = −0.75) for `dinov2`,
antialiased (PIL's A = −0.5) for `dinov2_with_registers`; [CLS]'s row as is, and the table
unchanged at the checkpoint's own size. (Older transformers and the original repository
passed a `scale_factor` with a +0.1 offset, which shifts the sampling positions slightly.)

`convert` writes `out/params` (Orbax) and `out/dinov2.json` (config, the preprocessor's
mean/std, the source); `load_converted` reads them back.
"""

import dataclasses
import json
import pathlib

import jax
import numpy as np

from starflow2_jax import sharding as sharding_lib
from starflow2_jax.convert import bicubic
from starflow2_jax.convert import hf_files
from starflow2_jax.models.dinov2 import config as config_lib
from starflow2_jax.models.dinov2 import image_processing
from starflow2_jax.models.dinov2 import model as model_lib

CONVERTED_JSON = "dinov2.json"
# Present in checkpoints, not ported: the pre-training mask token, a classification head.
IGNORED = ("embeddings.mask_token", "classifier.weight", "classifier.bias")
_PREFIXES = ("dinov2_with_registers.", "dinov2.")
# transformers 5's in-memory spelling -> the on-disk one (its conversion mapping, reversed).
_RENAMES = (("attention.q_proj.", "attention.attention.query."),
            ("attention.k_proj.", "attention.attention.key."),
            ("attention.v_proj.", "attention.attention.value."),
            ("attention.o_proj.", "attention.output.dense."),
            ("mlp.down_proj.", "mlp.weights_out."))
Rule = hf_files.Rule


def canonical_name(name):
  """The on-disk spelling of a tensor name, without a classification model's prefix."""
  for prefix in _PREFIXES:
    if name.startswith(prefix):
      name = name[len(prefix):]
      break
  for alias, canonical in _RENAMES:
    name = name.replace(alias, canonical)
  return name


# ---------------------------------------------------------------- the name and layout table

def _position_table(source_grid, grid, antialias):
  """[1, 1 + source_grid², D] -> [1 + grid², D], resampled as the reference does at run time."""
  def fn(w):
    table = w[0]
    if source_grid == grid:
      return table
    patches = table[1:].reshape(source_grid, source_grid, -1)
    patches = bicubic.resize(patches, grid, grid, antialias).reshape(grid * grid, -1)
    return np.concatenate([table[:1], patches.astype(table.dtype)])
  return fn


def _patch_kernel(w):
  """Conv weight [D, C, p, p] -> kernel [p·p·C, D] for patches flattened (row, col, channel)."""
  return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])


def _pair(prefix, target, shape, weight_fn=hf_files.transpose):
  """A Linear's (or the patch convolution's) weight -> target/kernel, bias -> target/bias."""
  return {f"{prefix}.weight": Rule(shape, ((target + ("kernel",), weight_fn),)),
          f"{prefix}.bias": Rule(shape[:1], ((target + ("bias",), hf_files.keep),))}


def _mlp_rules(src, dst, config, fused):
  d, h = config.hidden_size, config.mlp_hidden
  if not config.use_swiglu:
    return {**_pair(f"{src}.fc1", dst + ("fc1",), (h, d)),
            **_pair(f"{src}.fc2", dst + ("fc2",), (d, h))}
  rules = {f"{src}.weights_out.weight": Rule((d, h), ((dst + ("down_kernel",),
                                                       hf_files.transpose),)),
           f"{src}.weights_out.bias": Rule((d,), ((dst + ("down_bias",), hf_files.keep),))}
  if fused:        # weights_in = [gate; up] along the output axis
    for kind, shape, fn in (("weight", (2 * h, d), hf_files.transpose),
                            ("bias", (2 * h,), hf_files.keep)):
      leaf = "kernel" if kind == "weight" else "bias"
      rules[f"{src}.weights_in.{kind}"] = Rule(shape, tuple(
          (dst + (f"{part}_{leaf}",), hf_files.chunk(i, 2, fn))
          for i, part in enumerate(("gate", "up"))))
  else:
    for part in ("gate", "up"):
      rules[f"{src}.{part}_proj.weight"] = Rule((h, d), ((dst + (f"{part}_kernel",),
                                                           hf_files.transpose),))
      rules[f"{src}.{part}_proj.bias"] = Rule((h,), ((dst + (f"{part}_bias",), hf_files.keep),))
  return rules


def tensor_rules(config, source_image_size, *, antialias, fused_swiglu=True):
  """{on-disk name: Rule} for every tensor of a checkpoint whose own table is for
  `source_image_size`, made into parameters for `config` (whose table may be another size)."""
  d, p, n, hd = config.hidden_size, config.patch_size, config.num_heads, config.head_dim
  source_grid = source_image_size // p
  keep = hf_files.keep
  rules = {
      "embeddings.cls_token": Rule((1, 1, d), ((("cls_token",), lambda w: w.reshape(d)),)),
      "embeddings.position_embeddings": Rule(
          (1, source_grid ** 2 + 1, d),
          ((("position_embedding",), _position_table(source_grid, config.grid, antialias)),)),
      "layernorm.weight": Rule((d,), ((("final_norm", "scale"), keep),)),
      "layernorm.bias": Rule((d,), ((("final_norm", "bias"), keep),)),
  }
  rules.update(_pair("embeddings.patch_embeddings.projection", ("patch_embed",), (d, 3, p, p),
                     _patch_kernel))
  if config.num_register_tokens:
    rules["embeddings.register_tokens"] = Rule((1, config.num_register_tokens, d),
                                               ((("register_tokens",), lambda w: w[0]),))
  for i in range(config.num_layers):
    src, dst = f"encoder.layer.{i}", (f"layer_{i}",)
    for j in (1, 2):
      rules[f"{src}.norm{j}.weight"] = Rule((d,), ((dst + (f"norm{j}", "scale"), keep),))
      rules[f"{src}.norm{j}.bias"] = Rule((d,), ((dst + (f"norm{j}", "bias"), keep),))
      rules[f"{src}.layer_scale{j}.lambda1"] = Rule((d,), ((dst + (f"layer_scale{j}",), keep),))
    attention = dst + ("attention",)
    for name in ("query", "key", "value"):
      rules[f"{src}.attention.attention.{name}.weight"] = Rule(
          (d, d), ((attention + (f"{name}_kernel",), hf_files.heads_in(n, hd)),))
      if config.qkv_bias:
        rules[f"{src}.attention.attention.{name}.bias"] = Rule(
            (d,), ((attention + (f"{name}_bias",), hf_files.heads_in(n, hd)),))
    rules[f"{src}.attention.output.dense.weight"] = Rule(
        (d, d), ((attention + ("out_kernel",), hf_files.heads_out(n, hd)),))
    rules[f"{src}.attention.output.dense.bias"] = Rule((d,), ((attention + ("out_bias",), keep),))
    rules.update(_mlp_rules(f"{src}.mlp", dst + ("mlp",), config, fused_swiglu))
  return rules


# ---------------------------------------------------------------- reading a checkpoint

@dataclasses.dataclass
class ImportPlan:
  """Everything decided before the first tensor is read."""
  config: config_lib.Dinov2Config
  model_type: str
  source_image_size: int
  rules: dict               # on-disk name -> Rule
  found: dict               # on-disk name -> (file, stored name, shape)
  mean: tuple
  std: tuple


def read_hf_config(hf_dir):
  """The parsed config.json of `hf_dir`, with errors that name the directory or the file."""
  hf_dir = pathlib.Path(hf_dir)
  if not hf_dir.is_dir():
    raise FileNotFoundError(f"{hf_dir}: no such checkpoint directory")
  path = hf_dir / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path}: no config.json (is this a DINOv2 checkpoint directory?)")
  try:
    hf = json.loads(path.read_text())
    config_lib.from_hf_dict(hf).head_dim         # checks model_type and supported options
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e
  return hf


def read_mean_std(hf_dir):
  """image_mean / image_std of preprocessor_config.json, else ImageNet's."""
  path = pathlib.Path(hf_dir) / "preprocessor_config.json"
  processor = json.loads(path.read_text()) if path.exists() else {}
  mean = tuple(float(v) for v in processor.get("image_mean", image_processing.IMAGENET_MEAN))
  std = tuple(float(v) for v in processor.get("image_std", image_processing.IMAGENET_STD))
  if len(mean) != 3 or len(std) != 3:
    raise ValueError(f"{path}: image_mean / image_std need 3 values, not {mean} / {std}")
  return mean, std


def plan_import(hf_dir, image_size=None):
  """Reads config.json and the headers, and checks every tensor; reads no tensor data."""
  hf = read_hf_config(hf_dir)
  config = config_lib.from_hf_dict(hf, image_size)
  if config.grid < 1:
    raise ValueError(f"image_size {config.image_size} is smaller than one patch "
                     f"({config.patch_size} px)")
  found = hf_files.read_headers(hf_dir, canonical_name)
  fused = not any(name.endswith("mlp.gate_proj.weight") for name in found)
  native = config_lib.native_image_size(hf)
  rules = tensor_rules(config, native, antialias=hf["model_type"] == "dinov2_with_registers",
                       fused_swiglu=fused)
  hf_files.check_tensors(rules, found, hf_dir, IGNORED)
  return ImportPlan(config, hf["model_type"], native, rules, found, *read_mean_std(hf_dir))


def abstract_shapes(config):
  """{Flax path: shape} of the model's parameters."""
  from flax import traverse_util
  abstract = sharding_lib.strip_axis_names(model_lib.abstract_params(model_lib.Dinov2(config)))
  return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(abstract).items()}


def load_planned(plan):
  """Reads, rearranges and casts each tensor in turn; the nested float32 numpy params."""
  from flax import traverse_util
  shapes = abstract_shapes(plan.config)
  params = {}
  for name, _, target, host in hf_files.planned_tensors(plan.rules, plan.found, np.float32):
    if host.shape != shapes[target]:      # a bug in the rule table, never a user error
      raise AssertionError(f"{name} -> {'/'.join(target)}: {host.shape} != {shapes[target]}")
    params[target] = host
  if set(params) != set(shapes):                # likewise a bug in the table
    raise AssertionError(f"parameters without a tensor: {sorted(set(shapes) - set(params))}")
  return traverse_util.unflatten_dict(params)


def load_hf_checkpoint(hf_dir, image_size=None):
  """(config, float32 numpy params, mean, std) of a Hugging Face directory, the position
  table resampled to `image_size` (default: the checkpoint's own)."""
  plan = plan_import(hf_dir, image_size)
  return plan.config, load_planned(plan), plan.mean, plan.std


# ---------------------------------------------------------------- Orbax copies

def convert(hf_dir, out_dir, image_size):
  """Writes `out_dir/params` (Orbax) and `out_dir/dinov2.json`; returns `out_dir`."""
  import orbax.checkpoint as ocp
  plan = plan_import(hf_dir, image_size)
  params = load_planned(plan)
  out_dir = pathlib.Path(out_dir).absolute()
  out_dir.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(out_dir / "params", params, force=True)
  checkpointer.wait_until_finished()
  (out_dir / CONVERTED_JSON).write_text(json.dumps(dict(
      config=dataclasses.asdict(plan.config), image_mean=list(plan.mean),
      image_std=list(plan.std), source=dict(
          directory=str(pathlib.Path(hf_dir).absolute()), model_type=plan.model_type,
          image_size=plan.source_image_size)), indent=2))
  return out_dir


def read_converted_json(directory):
  """(config, mean, std) from `directory/dinov2.json`."""
  path = pathlib.Path(directory) / CONVERTED_JSON
  if not path.exists():
    raise FileNotFoundError(f"{path}: not a converted DINOv2 directory (write one with "
                            "`starflow2 convert-dinov2`)")
  saved = json.loads(path.read_text())
  return (config_lib.Dinov2Config(**saved["config"]), tuple(saved["image_mean"]),
          tuple(saved["image_std"]))


def load_converted(directory, *, mesh=None, rules=sharding_lib.DEFAULT_RULES):
  """(config, params, mean, std) of `convert`'s directory; params are float32 jax.Arrays on
  the default device, or laid out on `mesh` by `rules` when a mesh is given."""
  import orbax.checkpoint as ocp
  from flax import traverse_util
  directory = pathlib.Path(directory).absolute()
  config, mean, std = read_converted_json(directory)
  abstract = model_lib.abstract_params(model_lib.Dinov2(config))
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, sharding_lib.strip_axis_names(abstract))
  else:
    shardings = sharding_lib.logical_shardings(abstract, mesh, rules)
  shapes = traverse_util.flatten_dict(sharding_lib.strip_axis_names(abstract))
  placed = traverse_util.flatten_dict(shardings)
  target = traverse_util.unflatten_dict({
      path: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=placed[path])
      for path, s in shapes.items()})
  params = ocp.StandardCheckpointer().restore(directory / "params", target)
  return config, params, mean, std
