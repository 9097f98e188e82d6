"""Interleaved batches and the STARFlow2 stages: layout, frozen sets, warm starts."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from data_pipelines import records
from helpers import tree_bits
from tolerance import assert_float32_close
from data_pipelines import mrope_positions as positions_lib
from starflow2_jax import tree_paths
from starflow2_jax.models import stages
from starflow2_jax.training import checkpointing
from starflow2_jax.training import optimizer as optimizer_lib
from starflow2_jax.training import pretzel_task
from starflow2_jax.training import state as state_lib
from starflow2_jax.training import trainer

SPECIAL = dict(vision_start_id=257, vision_end_id=258, image_pad_id=259, pad_id=0)


def tiny_config(stage, **init):
  c = ml_collections.ConfigDict()
  c.task, c.stage, c.seed = "pretzel", stage, 0
  c.data = dict(image_size=(4, 4), channels=1, max_length=24, max_images=2,
                prompt_segments=1, special_ids=SPECIAL)
  c.latent = dict(name="patch", patch_size=2)
  c.model = dict(
      vlm=dict(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=1,
               num_heads=4, num_kv_heads=2, mrope_section=(1, 2, 1), rope_theta=10_000.0),
      vlm_dtype="float32", adapter_hidden=16,
      deep=dict(width=16, num_layers=1, num_heads=2, mlp_ratio=2.0, rope_layout="interleaved"),
      shallow=dict(width=16, num_layers=1, num_heads=2, mlp_ratio=2.0),
      num_shallow_blocks=2, scale="softplus", noise_conditioning=True, dtype="float32",
      remat=False)
  c.init = dict(dict(from_workdir="", vlm_checkpoint="", reinitialise=[]), **init)
  c.loss = dict(ntp_weight=0.5, text_shapes_flow=True)
  c.noise = dict(t_min=0.02, t_max=0.3, loss_weighting="t")
  c.train = dict(steps=2, caption_dropout=0.5)
  c.optimizer = dict(learning_rate=1e-2, warmup_steps=0, min_learning_rate=1e-6, b1=0.9,
                     b2=0.95, eps=1e-8, weight_decay=1e-4, grad_clip_norm=1.0,
                     trainable=stages.STAGES[stage].trainable)
  c.eval = dict(noise_level=0.02)
  return c


def image(seed):
  return np.random.default_rng(seed).integers(0, 256, (4, 4, 1), dtype=np.uint8)


def record(prompt_segments=None):
  meta = {} if prompt_segments is None else {"prompt_segments": prompt_segments}
  return records.InterleavedRecord(
      [records.TextSegment("ab"), records.ImageSegment.from_array(image(0)),
       records.TextSegment("c"), records.ImageSegment.from_array(image(1))], meta)


def batch_of(task, recs):
  examples = [task.example_transform()(r) for r in recs]
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def test_interleaved_example_layout():
  task = pretzel_task.PretzelTask(tiny_config(3))
  ex = task.example_transform()(record(prompt_segments=2))
  lay = task.layout
  ids = [98, 99, 257, 259, 259, 259, 259, 258, 100, 257, 259, 259, 259, 259, 258]
  length = len(ids)
  np.testing.assert_array_equal(ex["ids"], ids + [0] * (lay.max_length - length))
  np.testing.assert_array_equal(ex["valid"], np.arange(lay.max_length) < length)
  np.testing.assert_array_equal(ex["is_visual"][:length], np.asarray(ids) == 259)
  np.testing.assert_array_equal(ex["image_positions"], [[3, 4, 5, 6], [10, 11, 12, 13]])
  # Positions as Qwen2.5-VL's own rope index places a 2×2 image (merge size 1).
  want, _ = positions_lib.rope_index(np.asarray([ids]), np.ones((1, length), bool),
                                     [(1, 2, 2), (1, 2, 2)], 259, 1)
  np.testing.assert_array_equal(ex["positions"][:, :length], want[:, 0])
  np.testing.assert_array_equal(ex["positions"][:, length:], 0)
  # Segments 0-1 are the prompt; the text "c" and the second image (with its vision
  # start/end tokens) are targets.
  target = np.zeros(lay.max_length, bool)
  target[[8, 9, 14]] = True
  np.testing.assert_array_equal(ex["text_target"], target)
  np.testing.assert_array_equal(ex["prompt_text"][:length], [1, 1] + [0] * (length - 2))
  np.testing.assert_array_equal(ex["image_target"], [False, True])
  np.testing.assert_array_equal(ex["images"][1], image(1))


def test_interleaved_example_rejects_what_does_not_fit():
  from data_pipelines import pipeline
  task = pretzel_task.PretzelTask(tiny_config(3))
  long = records.InterleavedRecord([records.TextSegment("x" * 30)])
  with pytest.raises(pipeline.RecordMismatchError, match="max_length"):
    task.example_transform()(long)


def _state(task, config, rng=0):
  optimizer, schedule = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
  params = jax.tree.map(lambda b: b.unbox() if hasattr(b, "unbox") else b,
                        jax.jit(task.init_params)(jax.random.key(rng)),
                        is_leaf=lambda x: hasattr(x, "unbox"))
  state = state_lib.TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
  return state, optimizer, schedule


def _split(params, patterns):
  labels = tree_paths.trainable_labels(params, patterns)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {tree_paths.path_name(p): (v, l) for (p, v), l in zip(flat, jax.tree.leaves(labels))}


TRAINED = {0: {"vlm"}, 1: {"flow", "shallow_0", "shallow_1"}, 2: {"adapter"},
           3: {"flow", "shallow_0", "shallow_1", "adapter", "w_v", "w_t"}}


def _step_gradients(task, trainable, seed, state, batch):
  """The gradient the train step takes at `state`: of the task's loss through
  `trainer.frozen_without_gradient`, with that step's rng (as `trainer.make_train_step`)."""
  def loss(params, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    return task.loss(trainer.frozen_without_gradient(params, trainable), batch, rng)[0]
  return jax.jit(jax.grad(loss))(state.params, batch)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stage_steps_change_only_the_trainable_set(stage):
  """Two steps: every trainable leaf gets a gradient, every frozen one exactly none, and
  frozen leaves stay bitwise (AdamW's weight decay moves trainable leaves even without a
  gradient, so "they changed" alone would prove nothing)."""
  config = tiny_config(stage)
  trainable = config.optimizer.trainable
  task = pretzel_task.PretzelTask(config)
  state, optimizer, schedule = _state(task, config)
  before = _split(state.params, trainable)
  step = jax.jit(trainer.make_train_step(task, optimizer, schedule, config.seed, trainable))
  batch = batch_of(task, [record(), record(prompt_segments=2)])
  state, _ = step(state, batch)
  # The second step's gradient. (The first step's is zero, legitimately, for every leaf
  # upstream of a zero-initialised layer: the flow blocks' heads and the adapter's FiLM
  # output. One step makes those layers non-zero.)
  grads = _step_gradients(task, trainable, config.seed, state, batch)
  state, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  for name, (grad, label) in _split(grads, trainable).items():
    if label == "train":
      assert np.any(np.asarray(grad) != 0), f"trainable {name} has no gradient"
    else:
      assert not np.any(np.asarray(grad)), f"frozen {name} has a gradient"
  # ... and it is the step's own: the step reports its norm. (The same sums in another
  # program: rounding through the model's layers and the norm's sum over all entries.)
  m = config.model
  depth = (m.vlm.num_layers + 1                                  # the VLM and its LM head
           + m.deep.num_layers + 1                               # the deep block and its head
           + m.num_shallow_blocks * (m.shallow.num_layers + 1))  # the shallow blocks
  entries = sum(np.size(g) for g in jax.tree.leaves(grads))
  assert_float32_close(metrics["grad_norm"], optax.global_norm(grads), depth=depth,
                       reduction=entries)
  after = _split(state.params, trainable)
  trained = [k for k, (_, label) in before.items() if label == "train"]
  assert {k.split("/")[0] for k in trained} == TRAINED[stage]
  for name, (value, label) in before.items():
    same = tree_bits(value) == tree_bits(after[name][0])
    assert same == (label == "freeze"), name
  # No optimizer moments for frozen parameters: the state holds two per trainable value.
  trainable_size = sum(v.size for v, label in before.values() if label == "train")
  state_size = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
  assert state_size == 2 * trainable_size


def _saved_stage2(workdir):
  """A stage-2 task and state, its checkpoint written under `workdir` (for warm starts)."""
  stage2 = pretzel_task.PretzelTask(tiny_config(2))
  state2, _, _ = _state(stage2, stage2.config, rng=1)
  checkpointer = checkpointing.Checkpointer(workdir / "checkpoints", async_save=False)
  checkpointer.save(5, state2)
  checkpointer.wait()
  checkpointer.close()
  return stage2, state2


def test_stage3_warm_start_restores_stage2_and_zero_skips(tmp_path):
  stage2, state2 = _saved_stage2(tmp_path)
  stage3 = pretzel_task.PretzelTask(tiny_config(3, from_workdir=str(tmp_path)))
  fresh3, _, _ = _state(stage3, stage3.config, rng=2)
  warm = stage3.warm_start(fresh3.params)
  assert tree_bits({k: v for k, v in warm.items() if k not in ("w_v", "w_t")}) == \
      tree_bits(state2.params)
  assert all(not np.any(x) for x in jax.tree.leaves((warm["w_v"], warm["w_t"])))
  # Stage 3 starts where stage 2 ended: same logits, same flow.
  batch = batch_of(stage2, [record(), record(prompt_segments=2)])
  x = stage2.encode_images(batch["images"]).astype(jnp.float32)
  t = jnp.full((2,), 0.1)
  out2 = jax.jit(stage2.apply)(state2.params, batch, x, t)
  out3 = jax.jit(stage3.apply)(warm, batch, x, t)
  assert tree_bits(out3) == tree_bits(out2)


def test_warm_start_with_other_shapes_fails_unless_reinitialised(tmp_path):
  """A stage whose flow is wider than the checkpoint's must not silently keep fresh weights:
  the error names every mismatched path with both shapes; listed paths start fresh."""
  _, state2 = _saved_stage2(tmp_path)

  def wider_stage3(**init):
    config = tiny_config(3, from_workdir=str(tmp_path), **init)
    config.model.deep.width = 32
    task = pretzel_task.PretzelTask(config)
    return task, _state(task, config, rng=2)[0].params

  task, fresh = wider_stage3()
  with pytest.raises(ValueError) as error:
    task.warm_start(fresh)
  message = str(error.value)
  assert "flow/input_proj/kernel: checkpoint (4, 16), model (4, 32)" in message
  assert "flow/backbone/layer_0/mlp" in message and "adapter" not in message

  task, fresh = wider_stage3(reinitialise=[r"flow/.*"])
  warm = task.warm_start(fresh)
  assert tree_bits(warm["flow"]) == tree_bits(fresh["flow"])          # kept fresh
  assert tree_bits(warm["adapter"]) == tree_bits(state2.params["adapter"])


def test_warm_start_across_layer_layouts_is_an_error(tmp_path):
  """A scanned stage 3 from an unrolled stage 2 would share no layer with the checkpoint
  (`layers` vs layer_0, …) and keep fresh layers: the error names the stacks instead."""
  _saved_stage2(tmp_path)
  config = tiny_config(3, from_workdir=str(tmp_path))
  config.model.scan_layers = True
  task = pretzel_task.PretzelTask(config)
  with pytest.raises(ValueError, match="lay out the layers of") as error:
    task.warm_start(_state(task, config, rng=2)[0].params)
  for stack in ("vlm", "flow/backbone", "shallow_0/backbone"):
    assert f"'{stack}'" in str(error.value)


def test_resume_across_layer_layouts_is_an_error(tmp_path):
  """Resuming an unrolled run's checkpoint with `model.scan_layers` switched on is a config
  error that names the stacks, not a checkpoint "that cannot be read" at every step."""
  _saved_stage2(tmp_path)
  config = tiny_config(2)
  config.model.scan_layers = True
  task = pretzel_task.PretzelTask(config)
  state = _state(task, config, rng=2)[0]
  checkpointer = checkpointing.Checkpointer(tmp_path / "checkpoints", async_save=False)
  with pytest.raises(ValueError, match="lay out the layers of .*'flow/backbone'"):
    checkpointer.restore(state)
  checkpointer.close()
