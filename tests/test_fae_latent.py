"""The FAE latent space end to end at the tiny preset: DINOv2 pre-training and FAE runs on
the trainer, the latent interface, precomputed latents in the records, and STARFlow2's
stages reading images or precomputed latents with the same losses."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fake_data
from data_pipelines import records
from demos import staged_demo
from experiments import fashion_mnist_fae as experiment
from starflow2_jax import cli
from starflow2_jax.latents import precompute
from starflow2_jax.models import fae as fae_lib
from starflow2_jax.models.dinov2 import model as dinov2_model
from starflow2_jax.training import builders
from starflow2_jax.training import tasks
from starflow2_jax.training import trainer
from tolerance import assert_float32_close


def _config(root, preset, **fields):
  c = experiment.get_config(preset)
  c.data.dir, c.data.source_dir = str(root / "data"), str(root / "idx")
  for key, value in fields.items():
    section, field = key.split("__")
    c[section][field] = value
  return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Records, a pre-trained tiny DINOv2 and a tiny FAE (3 steps each)."""
  root = tmp_path_factory.mktemp("fae")
  fake_data.write_fake_fashion_mnist(str(root / "idx"), num_train=16, num_test=8)
  staged_demo.prepare_records(_config(root, "stage1-tiny"))
  trainer.train(_config(root, "dinov2-tiny"), str(root / "dinov2"))
  trainer.train(_config(root, "fae-tiny", fae__dinov2=str(root / "dinov2")), str(root / "fae"))
  return root


def _stage_config(root, stage, **fields):
  config = _config(root, f"stage{stage}-tiny", latent__fae_workdir=str(root / "fae"), **fields)
  config.evals = {"bpd": {}}         # the demo's judges are not what these runs check
  return config


def test_image_segment_arrays_round_trip_and_are_checked():
  latent = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
  image = records.ImageSegment.from_array(np.zeros((2, 2, 1), np.uint8)).with_arrays(
      latent=latent)
  record = records.InterleavedRecord([records.TextSegment("a"), image])
  decoded = records.decode_record(records.encode_record(record))
  assert decoded == record
  np.testing.assert_array_equal(decoded.segments[1].arrays["latent"], latent)
  broken = records.encode_record(record).replace(b"shape\x92\x03\x04", b"shape\x92\x03\x05")
  with pytest.raises(records.MalformedRecordError, match="array 'latent'.*bytes of data"):
    records.decode_record(broken)


def test_fae_latent_is_dinov2_then_the_encoder_mean(runs):
  """encode = the FAE encoder's posterior mean of DINOv2's patch features, recomputed here
  from the two modules' own apply; decode gives uint8 images of the data's shape."""
  latent = builders.build_latent(_stage_config(runs, 1))
  images = fake_data.class_template_images(np.arange(4), np.random.default_rng(0))[..., None]
  x = latent.encode(images)
  assert x.shape == (4, latent.num_tokens, latent.token_dim) == (4, 49, 4)
  pixels = jnp.repeat(jnp.asarray(images, jnp.float32) / 255.0, 3, axis=-1)
  pixels = (pixels - jnp.asarray(latent.dinov2.mean)) / jnp.asarray(latent.dinov2.std)
  features = dinov2_model.Dinov2(latent.dinov2.config).apply(
      {"params": latent.dinov2.params}, pixels)[:, 1:]
  mean, _ = fae_lib.FAE(latent.config).apply({"params": latent.params}, features,
                                             method="encode")
  # Same operations: equal up to float32 rounding through DINOv2's patch embedding, layer
  # and final norm and the encoder's layer (depth 4), longest sum the MLP's 128 terms.
  standardised = (mean - latent.shift) / latent.scale
  assert_float32_close(x, standardised, depth=4, reduction=128)
  decoded = latent.decode(x)
  assert decoded.shape == images.shape and decoded.dtype == jnp.uint8
  assert latent.dequantize(jax.random.key(0), x) is x
  assert set(latent.likelihood_metrics(jnp.float32(1.0))) == {"latent_bpd"}


def test_fae_latents_are_standardised_by_their_training_images(runs):
  """shift and scale are the training images' per-channel statistics: their standardised
  latents, recomputed here, have mean 0 and std 1 in every channel; and the statistics are
  kept beside the run, so a second load reads the same numbers."""
  latent = builders.build_latent(_stage_config(runs, 1))
  _, count, recs = precompute.read_split(str(runs / "data"), "generate_train")
  images = np.stack([s.to_array() for r in recs for s in r.segments
                     if isinstance(s, records.ImageSegment)])
  assert len(images) == count == 16
  x = np.asarray(latent.encode(images)).reshape(-1, latent.token_dim)
  # Means of 16·49 float32 values of unit scale: rounding far below 1e-4.
  np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(x.std(0), 1.0, rtol=1e-4)
  assert not np.allclose(latent.scale, 1.0)          # the raw posterior means are not unit
  again = builders.build_latent(_stage_config(runs, 1))
  np.testing.assert_array_equal(again.shift, latent.shift)
  np.testing.assert_array_equal(again.scale, latent.scale)


def test_precomputed_records_hold_each_images_latent(runs):
  latent = builders.build_latent(_stage_config(runs, 1))
  out = runs / "latents"
  summary = precompute.precompute_split(latent, str(runs / "data"), str(out), "generate_test",
                                        batch_size=3, features=True)
  _, count, originals = precompute.read_split(str(runs / "data"), "generate_test")
  _, count_out, converted = precompute.read_split(str(out), "generate_test")
  assert summary.written == count == count_out == 8
  for before, after in zip(originals, converted):
    assert [type(s) for s in before.segments] == [type(s) for s in after.segments]
    assert before.meta == after.meta
    (image,) = [s for s in after.segments if isinstance(s, records.ImageSegment)]
    pixels = image.to_array()[None]
    # One image vs a padded batch of 3 through the same layers (bound as above).
    assert_float32_close(image.arrays["latent"], latent.encode(pixels)[0], depth=4,
                         reduction=128)
    assert_float32_close(image.arrays["features"], latent.dinov2.features(pixels)[0],
                         depth=3, reduction=128)


# Stage 3 (CI) reads both kinds of records and runs both losses; stages 1 and 2 (slow)
# repeat the check on their own records.
@pytest.mark.parametrize("stage", [pytest.param(1, marks=pytest.mark.slow),
                                   pytest.param(2, marks=pytest.mark.slow), 3])
def test_stages_read_images_or_precomputed_latents_with_the_same_loss(runs, stage):
  split = {1: "generate_train", 2: "understand_train", 3: "mixture_train"}[stage]
  out = runs / f"latents_stage{stage}"
  assert cli.run(["starflow2", "precompute-latents", "--config",
           os.path.join(os.path.dirname(experiment.__file__), "fashion_mnist_fae.py") +
           f":stage{stage}-tiny", f"--config.latent.fae_workdir={runs / 'fae'}",
           "--records", str(runs / "data"), "--out", str(out), "--splits", split]) == 0
  from_images = tasks.build_task(_stage_config(runs, stage))
  from_latents = tasks.build_task(_stage_config(runs, stage, data__precomputed_latents=True,
                                                data__dir=str(out)))
  _, _, raw = precompute.read_split(str(runs / "data"), split)
  _, _, with_latents = precompute.read_split(str(out), split)
  batches = []
  for task, recs in ((from_images, raw), (from_latents, with_latents)):
    examples = [task.example_transform()(r) for r, _ in zip(recs, range(4))]
    batches.append({k: jnp.asarray(np.stack([e[k] for e in examples])) for k in examples[0]})
  assert "image_latents" in batches[1] and "image_latents" not in batches[0]
  params = from_images.init_params(jax.random.key(stage))
  losses = [task.loss(params, batch, jax.random.key(7))[0]
            for task, batch in ((from_images, batches[0]), (from_latents, batches[1]))]
  assert np.isfinite(float(losses[0]))
  # The same computation but for the latents' origin (one batch of 3 vs 4 images through
  # the encoder): float32 rounding of the latents, carried through the flow's NLL.
  assert abs(float(losses[0]) - float(losses[1])) <= 1e-5 * max(1.0, abs(float(losses[0])))


def test_stages_1_to_3_train_on_fae_latents(runs):
  """Each stage warm-starts from the one before: stage 1 encodes the images at every step,
  stages 2 and 3 read precomputed latents."""
  latent = builders.build_latent(_stage_config(runs, 1))
  out = runs / "latents_chain"
  for split in ("understand_train", "understand_test", "mixture_train", "mixture_test"):
    precompute.precompute_split(latent, str(runs / "data"), str(out), split)
  previous = ""
  for stage in (1, 2, 3):
    fields = dict(train__steps=2, init__from_workdir=previous)
    if stage > 1:
      fields.update(data__dir=str(out), data__precomputed_latents=True)
    workdir = str(runs / f"chain_stage{stage}")
    result = trainer.train(_stage_config(runs, stage, **fields), workdir)
    assert np.isfinite(result.summary["train_loss"]), stage
    assert result.summary["stopped_early"] is False, stage
    previous = workdir


def test_fae_run_reports_reconstruction_metrics(runs):
  config = _config(runs, "fae-tiny", fae__dinov2=str(runs / "dinov2"))
  task, params, _ = trainer.restore_params(config, str(runs / "fae"))
  params = jax.tree.map(np.asarray, params)      # off the tests' 8-device mesh
  batch = task.dummy_batch(2)
  metrics = task.eval_metrics(params, batch, jax.random.key(0))
  assert {"feature_cosine", "psnr", "latent_std_min", "latent_abs_mean_max"} <= set(metrics)
  assert -1.0 <= float(metrics["feature_cosine"]) <= 1.0 and float(metrics["psnr"]) > 0.0
