"""The frozen VLM at scale: stored in bf16 with no optimizer state, and (with
`init.checkpoint_vlm=False`) left out of a stage's checkpoints and read back, bit for bit,
from the converted Qwen checkpoint that `kept_elsewhere.json` points at."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import tree_bits
from starflow2_jax import sharding
from starflow2_jax.convert import qwen
from starflow2_jax.models.qwen2_5_vl import config as qwen_config
from starflow2_jax.models.qwen2_5_vl import model as qwen_model
from starflow2_jax.training import checkpointing
from starflow2_jax.training import pretzel_task
from starflow2_jax.training import state as state_lib
from starflow2_jax.training import trainer
from test_pretzel_stages import tiny_config


def _converted_vlm(directory, text_fields, seed=3):
  """A converted Qwen2.5-VL checkpoint (random weights) whose text decoder has the tiny
  Pretzel's numbers: config.json as transformers writes it, params as `convert-qwen` saves."""
  text = qwen_config.TextConfig(**{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in dict(text_fields).items()})
  config = qwen_config.Qwen25VLConfig(
      text=text, vision=qwen_config.VisionConfig(
          hidden_size=16, intermediate_size=32, depth=1, num_heads=2,
          out_hidden_size=text.hidden_size, fullatt_block_indexes=(0,)))
  hf_dir = directory / "hf"
  hf_dir.mkdir(parents=True)
  (hf_dir / "config.json").write_text(json.dumps(qwen_config.to_hf_dict(config)))
  shapes = sharding.strip_axis_names(qwen_model.abstract_params(qwen_model.Qwen25VL(config)))
  keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(shapes))))
  params = jax.tree.map(lambda s: 0.1 * jax.random.normal(next(keys), s.shape, s.dtype), shapes)
  return qwen.save_converted(params, hf_dir, directory / "converted")


@pytest.fixture(scope="module", name="converted")
def _converted(tmp_path_factory):
  return _converted_vlm(tmp_path_factory.mktemp("qwen"), tiny_config(1).model.vlm)


def _stage(converted, vlm_dtype="float32", scan_layers=False, **init):
  config = tiny_config(1, vlm_checkpoint=str(converted), **init)
  config.model.vlm_dtype = vlm_dtype
  config.model.scan_layers = scan_layers
  config.mesh = dict(shape=dict(data=1, fsdp=-1, tensor=1),
                     rules=[list(r) for r in sharding.DEFAULT_RULES])
  task = pretzel_task.PretzelTask(config)
  mesh, rules = sharding.mesh_and_rules(config.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    plan = trainer.plan_state(config, task, mesh, rules)
    state = state_lib.create_state(task.init_params, plan.optimizer, plan.shardings,
                                   jax.random.key(0))
    state = state.replace(params=task.warm_start(state.params))
  return task, plan.abstract, state, (mesh, rules)


def _saved_tree(directory, step):
  path = os.path.join(directory, str(step), "state")
  return ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree


def test_the_frozen_vlm_is_bf16_and_has_no_optimizer_state(converted):
  _, _, state, _ = _stage(converted, vlm_dtype="bfloat16")
  vlm_leaves = jax.tree.leaves(state.params["vlm"])
  assert vlm_leaves and all(x.dtype == jnp.bfloat16 for x in vlm_leaves)
  assert all(x.dtype == jnp.float32 for k, v in state.params.items() if k != "vlm"
             for x in jax.tree.leaves(v))         # the trained parts keep float32 masters
  # Adam's two moments (and nothing else of size) exist for the trainable parameters only.
  trained = sum(x.size for k, v in state.params.items() if k != "vlm" and k != "adapter"
                for x in jax.tree.leaves(v))
  moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.size > 1)
  assert moments == 2 * trained


@pytest.mark.parametrize("scan_layers", [False, True])
def test_a_checkpoint_can_leave_the_vlm_out_and_read_it_back(converted, tmp_path, scan_layers):
  """Also with scanned layers: the converted checkpoint keeps one entry per layer, and the
  VLM reads it back stacked."""
  task, abstract, state, (mesh, rules) = _stage(converted, checkpoint_vlm=False,
                                                scan_layers=scan_layers)
  # The VLM came from the converted checkpoint (not the random init).
  source = qwen.load_converted(converted)["text"]
  np.testing.assert_array_equal(np.asarray(state.params["vlm"]["embed_tokens"]["embedding"]),
                                np.asarray(source["embed_tokens"]["embedding"]))
  query = lambda layer: np.asarray(layer["attention"]["query_kernel"])
  if scan_layers:
    assert "layer_0" not in state.params["vlm"]
    np.testing.assert_array_equal(query(state.params["vlm"]["layers"])[0],
                                  query(source["layer_0"]))
  else:
    np.testing.assert_array_equal(query(state.params["vlm"]["layer_0"]),
                                  query(source["layer_0"]))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for name, elsewhere in (("without", trainer.kept_elsewhere(task)), ("with", {})):
      checkpointer = checkpointing.Checkpointer(tmp_path / name, async_save=False,
                                                kept_elsewhere=elsewhere)
      checkpointer.save(7, state)
      checkpointer.wait()
      restored = checkpointer.restore(abstract)
      checkpointer.close()
      assert tree_bits(restored.params) == tree_bits(state.params), name
      assert tree_bits(restored.opt_state) == tree_bits(state.opt_state), name
  assert "vlm" not in _saved_tree(tmp_path / "without", 7)["params"]
  assert "vlm" in _saved_tree(tmp_path / "with", 7)["params"]
  with open(tmp_path / "without" / "kept_elsewhere.json") as f:
    assert json.load(f) == {"vlm": os.path.abspath(converted)}


def test_leaving_the_vlm_out_needs_its_checkpoint():
  task = pretzel_task.PretzelTask(tiny_config(1, checkpoint_vlm=False))
  with pytest.raises(ValueError, match="needs config.init.vlm_checkpoint"):
    trainer.kept_elsewhere(task)
