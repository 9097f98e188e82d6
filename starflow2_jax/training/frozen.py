"""Frozen networks a stage reads but does not train: DINOv2 and a trained FAE, loaded from
what earlier runs left (a converted checkpoint or a training workdir).

Their parameters are kept as host (numpy) arrays: committed to no device, they follow
whatever mesh the stage's own arrays live on (jitted steps take them as constants).
"""

import dataclasses
import json
import os

import jax
import ml_collections
import numpy as np

from data_pipelines import records as records_lib

from starflow2_jax import sharding
from starflow2_jax.convert import dinov2 as dinov2_convert
from starflow2_jax.latents import fae as fae_latent
from starflow2_jax.latents import precompute
from starflow2_jax.models import fae as fae_lib
from starflow2_jax.models.dinov2 import config as dinov2_config
from starflow2_jax.models.dinov2 import image_processing
from starflow2_jax.models.dinov2 import model as dinov2_model
from starflow2_jax.training import checkpointing

CONFIG_FILE = "config.json"    # what the trainer writes into every workdir


def read_workdir_config(workdir, task):
  """The config a `task` run in `workdir` was trained with."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: {workdir} is not a training workdir")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if config.task != task:
    raise ValueError(f"{workdir} holds a {config.task!r} run, not a {task!r} one")
  return config


def dinov2_config_from(section):
  """A `Dinov2Config` from a config mapping: a "preset" name, the other keys overriding it."""
  values = dict(section)
  base = dinov2_config.preset(values.pop("preset", "tiny"))
  return base.replace(**values)


def _restore(workdir, template):
  params, _ = checkpointing.restore_params_subset(os.path.join(workdir, "checkpoints"),
                                                  template)
  return params


def _template(init_fn):
  """Zeros of the parameters' shapes to restore into (nothing is initialised randomly)."""
  abstract = sharding.strip_axis_names(jax.eval_shape(init_fn))
  return jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), abstract)


def load_dinov2(path):
  """A `FrozenDinov2` from `starflow2 convert-dinov2`'s output or a `dinov2_pretrain`
  training workdir (its `dinov2` subtree, with ImageNet's mean and std)."""
  if os.path.exists(os.path.join(path, dinov2_convert.CONVERTED_JSON)):
    config, params, mean, std = dinov2_convert.load_converted(path)
    return fae_latent.FrozenDinov2(config, jax.device_get(params), tuple(mean), tuple(std))
  if not os.path.exists(os.path.join(path, CONFIG_FILE)):
    raise FileNotFoundError(
        f"{path} is neither a converted DINOv2 (no {dinov2_convert.CONVERTED_JSON}; see "
        "`starflow2 convert-dinov2`) nor a training workdir (no config.json)")
  config = dinov2_config_from(read_workdir_config(path, "dinov2_pretrain").dinov2.model)
  module = dinov2_model.Dinov2(config)
  pixels = dinov2_model.example_pixels(config)
  template = _template(lambda: {"dinov2": module.init(jax.random.key(0), pixels)["params"]})
  params = jax.device_get(_restore(path, template)["dinov2"])
  return fae_latent.FrozenDinov2(config, params, image_processing.IMAGENET_MEAN,
                                 image_processing.IMAGENET_STD)


def fae_config(section, dinov2, image_size, channels):
  """The FAE's `FAEConfig`: `config.fae.model` (a "preset" and overrides) with the feature
  width and grid of `dinov2` and a pixel patch that decodes to `image_size`."""
  grid = dinov2.config.grid
  h, w = image_size
  if h != w or h % grid:
    raise ValueError(f"config.data.image_size={tuple(image_size)}: the FAE decodes a "
                     f"{grid}×{grid} feature grid to square images of a multiple of {grid}")
  return fae_lib.FAEConfig.from_dict(dict(
      section, feature_dim=dinov2.config.hidden_size, grid=(grid, grid),
      pixel_patch=h // grid, channels=channels))


STATISTICS_FILE = "latent_statistics.json"
STATISTICS_IMAGES = 1000


def latent_statistics(latent, workdir, config):
  """Per-channel (shift, scale) of the FAE's posterior means over the first
  `STATISTICS_IMAGES` training images of its run, measured once and kept in
  `<workdir>/latent_statistics.json` (so every later load, precomputation and stage uses
  the same numbers)."""
  path = os.path.join(workdir, STATISTICS_FILE)
  if os.path.exists(path):
    with open(path) as f:
      stats = json.load(f)
    return np.asarray(stats["shift"], np.float32), np.asarray(stats["scale"], np.float32)
  data_dir = config.data.dir or os.path.join(workdir, "data")
  _, _, records = precompute.read_split(data_dir, config.data.train_split)
  images = []
  for record in records:
    image = next((s for s in record.segments if isinstance(s, records_lib.ImageSegment)), None)
    if image is not None:
      images.append(image.to_array())
    if len(images) == STATISTICS_IMAGES:
      break
  encode = jax.jit(latent.posterior_mean)
  means = np.concatenate([np.asarray(encode(np.stack(images[i:i + 250])))
                          for i in range(0, len(images), 250)])
  flat = means.reshape(-1, means.shape[-1])
  shift, scale = flat.mean(0), np.maximum(flat.std(0), 1e-6)
  if jax.process_index() == 0:
    with open(path + ".partial", "w") as f:
      json.dump(dict(shift=shift.tolist(), scale=scale.tolist(), images=len(images),
                     split=config.data.train_split), f, indent=2)
    os.replace(path + ".partial", path)
  return shift.astype(np.float32), scale.astype(np.float32)


def load_fae_latent(workdir):
  """The `FAELatent` of an `fae` training workdir (its DINOv2 as that run named it),
  standardised by `latent_statistics`."""
  config = read_workdir_config(workdir, "fae")
  dinov2 = load_dinov2(config.fae.dinov2)
  cfg = fae_config(config.fae.model, dinov2, config.data.image_size, config.data.channels)
  features = lambda: jax.numpy.zeros((1, cfg.num_tokens, cfg.feature_dim))
  template = _template(lambda: {"fae": fae_lib.FAE(cfg).init(jax.random.key(0),
                                                              features())["params"]})
  raw = fae_latent.FAELatent(dinov2, cfg, jax.device_get(_restore(workdir, template)["fae"]))
  shift, scale = latent_statistics(raw, workdir, config)
  return dataclasses.replace(raw, shift=shift, scale=scale)
