"""Import a Hugging Face Qwen2.5-VL checkpoint (safetensors shards) into sharded Flax params.

Lazy and tensor by tensor: each on-disk tensor is read alone, rearranged into the Flax layout,
cast, and placed straight onto its target sharding with `jax.make_array_from_callback`; the
host copy is dropped before the next tensor is read, so host memory peaks at about one
tensor (plus its rearranged copy), never at the model. All names and shapes are checked
from the shard headers *before* anything is read, and every problem (missing, unexpected
and mis-shaped tensors) is reported in one error.

Both name layouts are accepted: the on-disk one (`model.layers.*`, `visual.*`) and the
in-memory one of transformers 5 (`model.language_model.*`, `model.visual.*`).

`save_converted` / `load_converted` keep an Orbax copy (with config and tokenizer files) that
later runs restore quickly onto any mesh; `load_vlm` reads either kind of directory.
"""

import dataclasses
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from starflow2_jax import sharding as sharding_lib
from starflow2_jax.convert import hf_files
from starflow2_jax.models.qwen2_5_vl import config as config_lib
from starflow2_jax.models.qwen2_5_vl import model as model_lib

# Files copied next to a converted checkpoint (those present in the source directory).
SIDECAR_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.json",
                 "chat_template.jinja", "preprocessor_config.json", "special_tokens_map.json")
_PREFIX_ALIASES = (("model.language_model.", "model."), ("model.visual.", "visual."))


# ---------------------------------------------------------------- the name and layout table

# Shared with the other importers: the table entry, its layout transforms, header checks.
Rule = hf_files.Rule
CheckpointMismatchError = hf_files.CheckpointMismatchError
_keep, _transpose = hf_files.keep, hf_files.transpose
_heads_in, _heads_out = hf_files.heads_in, hf_files.heads_out


def _chunk(i, fn):
  """The i-th third along axis 0 (fused qkv), then `fn`."""
  return hf_files.chunk(i, 3, fn)


def _attention_rules(prefix, target, d, heads, kv_heads, head_dim):
  rules = {}
  for hf, ours, n in (("q_proj", "query", heads), ("k_proj", "key", kv_heads),
                      ("v_proj", "value", kv_heads)):
    rules[f"{prefix}.{hf}.weight"] = Rule((n * head_dim, d),
                                          ((target + (f"{ours}_kernel",), _heads_in(n, head_dim)),))
    rules[f"{prefix}.{hf}.bias"] = Rule((n * head_dim,),
                                        ((target + (f"{ours}_bias",), _heads_in(n, head_dim)),))
  out_kernel = target + ("out_kernel",)
  rules[f"{prefix}.o_proj.weight"] = Rule((d, heads * head_dim),
                                          ((out_kernel, _heads_out(heads, head_dim)),))
  return rules


def _mlp_rules(prefix, target, d, hidden, bias):
  rules = {}
  for name, shape in (("gate", (hidden, d)), ("up", (hidden, d)), ("down", (d, hidden))):
    kernel, bias_leaf = target + (f"{name}_kernel",), target + (f"{name}_bias",)
    rules[f"{prefix}.{name}_proj.weight"] = Rule(shape, ((kernel, _transpose),))
    if bias:
      rules[f"{prefix}.{name}_proj.bias"] = Rule(shape[:1], ((bias_leaf, _keep),))
  return rules


def _norm_rule(name, target, d):
  return {name: Rule((d,), ((target + ("scale",), _keep),))}


def tensor_rules(config):
  """{on-disk name: Rule} for every tensor of a Qwen2.5-VL checkpoint with `config`."""
  t, v = config.text, config.vision
  rules = {"model.embed_tokens.weight": Rule((t.vocab_size, t.hidden_size),
                                             ((("text", "embed_tokens", "embedding"), _keep),))}
  rules.update(_norm_rule("model.norm.weight", ("text", "final_norm"), t.hidden_size))
  if not t.tie_word_embeddings:
    rules["lm_head.weight"] = Rule((t.vocab_size, t.hidden_size),
                                   ((("text", "lm_head"), _transpose),))
  for i in range(t.num_layers):
    src, dst = f"model.layers.{i}", ("text", f"layer_{i}")
    rules.update(_norm_rule(f"{src}.input_layernorm.weight", dst + ("input_norm",),
                            t.hidden_size))
    rules.update(_norm_rule(f"{src}.post_attention_layernorm.weight",
                            dst + ("post_attention_norm",), t.hidden_size))
    rules.update(_attention_rules(f"{src}.self_attn", dst + ("attention",), t.hidden_size,
                                  t.num_heads, t.num_kv_heads, t.head_dim))
    rules.update(_mlp_rules(f"{src}.mlp", dst + ("mlp",), t.hidden_size, t.intermediate_size,
                            bias=False))
  d, hd, n = v.hidden_size, v.head_dim, v.num_heads
  rules["visual.patch_embed.proj.weight"] = Rule(
      (d, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
      ((("vision", "patch_embed"), lambda w: w.reshape(w.shape[0], -1).T),))
  for i in range(v.depth):
    src, dst = f"visual.blocks.{i}", ("vision", f"block_{i}")
    rules.update(_norm_rule(f"{src}.norm1.weight", dst + ("norm1",), d))
    rules.update(_norm_rule(f"{src}.norm2.weight", dst + ("norm2",), d))
    att = dst + ("attention",)
    rules[f"{src}.attn.qkv.weight"] = Rule((3 * d, d), tuple(
        (att + (f"{name}_kernel",), _chunk(j, _heads_in(n, hd)))
        for j, name in enumerate(("query", "key", "value"))))
    rules[f"{src}.attn.qkv.bias"] = Rule((3 * d,), tuple(
        (att + (f"{name}_bias",), _chunk(j, _heads_in(n, hd)))
        for j, name in enumerate(("query", "key", "value"))))
    rules[f"{src}.attn.proj.weight"] = Rule((d, d), ((att + ("out_kernel",), _heads_out(n, hd)),))
    rules[f"{src}.attn.proj.bias"] = Rule((d,), ((att + ("out_bias",), _keep),))
    rules.update(_mlp_rules(f"{src}.mlp", dst + ("mlp",), d, v.intermediate_size, bias=True))
  group = v.spatial_merge_size ** 2 * d
  merger = ("vision", "merger")
  rules.update(_norm_rule("visual.merger.ln_q.weight", merger + ("norm",), d))
  rules["visual.merger.mlp.0.weight"] = Rule((group, group),
                                             ((merger + ("hidden_kernel",), _transpose),))
  rules["visual.merger.mlp.0.bias"] = Rule((group,), ((merger + ("hidden_bias",), _keep),))
  rules["visual.merger.mlp.2.weight"] = Rule((v.out_hidden_size, group),
                                             ((merger + ("out_kernel",), _transpose),))
  rules["visual.merger.mlp.2.bias"] = Rule((v.out_hidden_size,),
                                           ((merger + ("out_bias",), _keep),))
  return rules


def canonical_name(name):
  """The on-disk spelling of a tensor name (`model.language_model.x` -> `model.x`)."""
  for alias, canonical in _PREFIX_ALIASES:
    if name.startswith(alias):
      return canonical + name[len(alias):]
  return name


# ---------------------------------------------------------------- reading shard headers

def read_headers(hf_dir):
  """{canonical name: (file, on-disk name, shape)} from the shard headers only."""
  return hf_files.read_headers(hf_dir, canonical_name)


def check_tensors(rules, found, hf_dir, tied):
  hf_files.check_tensors(rules, found, hf_dir, {"lm_head.weight"} if tied else ())


# ---------------------------------------------------------------- loading

@dataclasses.dataclass
class LoadStats:
  """What the loader held on the host: at most one source tensor (and one rearranged copy)."""
  tensors_read: int = 0
  max_source_tensors_alive: int = 0
  peak_host_bytes: int = 0
  largest_tensor_bytes: int = 0


def default_mesh():
  """All devices on the "fsdp" axis: weights sharded along their width."""
  return sharding_lib.make_mesh(dict(data=1, fsdp=-1, tensor=1))


def target_shardings(model, mesh, rules=sharding_lib.DEFAULT_RULES):
  """({path: ShapeDtypeStruct}, {path: NamedSharding}) of the model's parameters, flat."""
  from flax import traverse_util
  abstract = model_lib.abstract_params(model)
  shardings = sharding_lib.logical_shardings(abstract, mesh, rules)
  shapes = sharding_lib.strip_axis_names(abstract)
  return (traverse_util.flatten_dict(shapes), traverse_util.flatten_dict(shardings))


@dataclasses.dataclass
class ImportPlan:
  """Everything decided before the first tensor is read."""
  config: object
  rules: dict               # on-disk name -> Rule
  found: dict               # on-disk name -> (file, stored name, shape)
  shapes: dict              # Flax path -> ShapeDtypeStruct
  shardings: dict           # Flax path -> NamedSharding
  dtype: object


def plan_import(hf_dir, config=None, *, dtype=jnp.float32, mesh=None,
                rules=sharding_lib.DEFAULT_RULES):
  """Reads config and shard headers, checks every tensor, and computes target shardings."""
  config = config or config_lib.from_pretrained_dir(hf_dir)
  rules_table = tensor_rules(config)
  found = read_headers(hf_dir)
  check_tensors(rules_table, found, hf_dir, config.text.tie_word_embeddings)
  model = model_lib.Qwen25VL(config, dtype=dtype, param_dtype=dtype)
  shapes, shardings = target_shardings(model, mesh or default_mesh(), rules)
  return ImportPlan(config, rules_table, found, shapes, shardings, dtype)


def load_planned(plan, stats=None):
  """Reads, rearranges, casts and places each tensor in turn; returns the nested params."""
  from flax import traverse_util
  stats = stats if stats is not None else LoadStats()
  params, counted = {}, set()
  for name, source, target, host in hf_files.planned_tensors(plan.rules, plan.found,
                                                             np.dtype(plan.dtype)):
    if name not in counted:
      counted.add(name)
      stats.tensors_read += 1
      stats.max_source_tensors_alive = max(stats.max_source_tensors_alive, 1)
      stats.largest_tensor_bytes = max(stats.largest_tensor_bytes, source.nbytes)
    stats.peak_host_bytes = max(stats.peak_host_bytes, source.nbytes + host.nbytes)
    expected = plan.shapes[target].shape
    if host.shape != expected:      # a bug in the rule table, never a user error
      raise AssertionError(f"{name} -> {'/'.join(target)}: {host.shape} != {expected}")
    params[target] = jax.make_array_from_callback(
        host.shape, plan.shardings[target], lambda index, host=host: host[index])
    del host
  return traverse_util.unflatten_dict(params)


def load_hf_checkpoint(hf_dir, config=None, *, dtype=jnp.float32, mesh=None,
                       rules=sharding_lib.DEFAULT_RULES, stats=None):
  """Params (nested dict of sharded jax.Arrays in `dtype`) from a Hugging Face directory.

  Args:
    hf_dir: directory with config.json and model*.safetensors (+ index when sharded).
    config: a `Qwen25VLConfig`; default: read from `hf_dir/config.json`.
    dtype: parameter dtype (float32 or bfloat16).
    mesh, rules: where parameters go (default: all devices along "fsdp", DEFAULT_RULES).
    stats: an optional `LoadStats` the loader fills in (host memory accounting).
  """
  plan = plan_import(hf_dir, config, dtype=dtype, mesh=mesh, rules=rules)
  return load_planned(plan, stats)


# ---------------------------------------------------------------- Orbax copies

def save_converted(params, hf_dir, out_dir):
  """Writes `out_dir/params` (Orbax) and copies config and tokenizer files from `hf_dir`."""
  import orbax.checkpoint as ocp
  out_dir = pathlib.Path(out_dir).absolute()
  out_dir.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(out_dir / "params", params, force=True)
  checkpointer.wait_until_finished()
  for name in SIDECAR_FILES:
    if (pathlib.Path(hf_dir) / name).exists():
      shutil.copy2(pathlib.Path(hf_dir) / name, out_dir / name)
  return out_dir


def load_converted(out_dir, config=None, *, dtype=jnp.float32, mesh=None,
                   rules=sharding_lib.DEFAULT_RULES):
  """Params restored from `save_converted`'s directory straight onto `mesh`, in `dtype`."""
  import orbax.checkpoint as ocp
  from flax import traverse_util
  out_dir = pathlib.Path(out_dir).absolute()
  config = config or config_lib.from_pretrained_dir(out_dir)
  model = model_lib.Qwen25VL(config, dtype=dtype, param_dtype=dtype)
  shapes, shardings = target_shardings(model, mesh or default_mesh(), rules)
  target = traverse_util.unflatten_dict({
      path: jax.ShapeDtypeStruct(s.shape, dtype, sharding=shardings[path])
      for path, s in shapes.items()})
  return ocp.StandardCheckpointer().restore(out_dir / "params", target)


def is_converted(directory):
  return (pathlib.Path(directory) / "params").is_dir()


def load_vlm(directory, *, dtype=jnp.float32, mesh=None, rules=sharding_lib.DEFAULT_RULES):
  """(model, params) from a converted (Orbax) or a Hugging Face directory."""
  config = config_lib.from_pretrained_dir(directory)
  model = model_lib.Qwen25VL(config, dtype=dtype, param_dtype=dtype)
  load = load_converted if is_converted(directory) else load_hf_checkpoint
  return model, load(directory, config, dtype=dtype, mesh=mesh, rules=rules)
