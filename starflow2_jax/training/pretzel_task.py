"""The STARFlow2 training stages (SPEC §4; stage 0 for the demo) as one task for the trainer.

`config.stage` picks a row of `STAGES`: which losses run, whether captions are dropped for
classifier-free guidance, whether the model has the vertical skips W_v, W_t. Which
parameters train is the config's `optimizer.trainable` (regexes over parameter names;
`STAGES[k].trainable` is the default an experiment config copies); frozen parameters get no
optimizer state and stay bit-identical.

  stage 0  language model  L_NTP on text      trains vlm/ (demo only: real runs load Qwen)
  stage 1  text -> image   L_flow             trains flow/, shallow_k/
  stage 2  understanding   L_NTP              trains adapter/
  stage 3  interleaved     L_flow + λ L_NTP   trains flow/, shallow_k/, adapter/, w_v, w_t

Warm start (`warm_start`): stage k starts from stage k−1's checkpoint (`init.from_workdir`,
a partial restore: the skips stage 3 adds keep their zero init) and the VLM from a converted
Qwen2.5-VL checkpoint (`init.vlm_checkpoint`).
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_pipelines import text as text_lib
from starflow2_jax.flows import likelihood
from starflow2_jax.flows import noise
from starflow2_jax.flows import stack
from starflow2_jax.models import pretzel
from starflow2_jax.models.qwen2_5_vl import config as qwen_config
from starflow2_jax.training import caption_to_image
from starflow2_jax.training import checkpointing
from starflow2_jax.training import interleaved

FLOW = (r"flow/.*", r"shallow_\d+/.*")


@dataclasses.dataclass(frozen=True)
class Stage:
  flow_loss: bool
  ntp_loss: bool
  caption_dropout: bool
  skips: bool
  trainable: tuple
  text_only: bool = False    # the VLM stream alone, on text records, its parameters trained


# Stage 0 stands in for a pretrained VLM where none can be loaded (the demo): it pretrains
# the VLM's text decoder on text alone. Real runs start stage 1 from converted Qwen weights.


STAGES = {
    0: Stage(flow_loss=False, ntp_loss=True, caption_dropout=False, skips=False,
             trainable=(r"vlm/.*",), text_only=True),
    1: Stage(flow_loss=True, ntp_loss=False, caption_dropout=True, skips=False, trainable=FLOW),
    2: Stage(flow_loss=False, ntp_loss=True, caption_dropout=False, skips=False,
             trainable=(r"adapter/.*",)),
    3: Stage(flow_loss=True, ntp_loss=True, caption_dropout=True, skips=True,
             trainable=FLOW + (r"adapter/.*", r"w_v/.*", r"w_t/.*")),
}


def stage_of(config):
  if config.stage not in STAGES:
    raise ValueError(f"config.stage={config.stage!r} is not one of {sorted(STAGES)}")
  return STAGES[config.stage]


def vlm_text_config(cfg):
  """config.model.vlm: a Qwen2.5-VL preset name or a dict of `TextConfig` fields."""
  if isinstance(cfg, str):
    return qwen_config.preset(cfg).text
  return qwen_config.TextConfig(**{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in dict(cfg).items()})


def build_model(config, latent_dim):
  """The Pretzel of `config.model` for `config.stage`."""
  m = config.model
  deep = caption_to_image.transformer_config(m.deep, m.remat)
  deep = pretzel.with_flow_positions(deep, m.deep.rope_layout)
  flow = stack.FlowConfig(
      latent_dim=latent_dim, deep=deep,
      shallow=caption_to_image.transformer_config(m.shallow, m.remat),
      num_shallow_blocks=m.num_shallow_blocks, scale=m.scale,
      noise_conditioning=m.noise_conditioning)
  model_cfg = pretzel.PretzelConfig(
      vlm=vlm_text_config(m.vlm), flow=flow, adapter_hidden=m.adapter_hidden,
      skips=stage_of(config).skips, freeze_vlm=not stage_of(config).text_only,
      vlm_dtype=m.vlm_dtype)
  return pretzel.Pretzel(model_cfg, dtype=jnp.dtype(m.dtype))


def build_layout(config, latent):
  d = config.data
  return interleaved.SequenceLayout(
      max_length=d.max_length, max_images=d.max_images, grid=latent.grid,
      image_shape=tuple(d.image_size) + (d.channels,), **dict(d.special_ids))


def next_token_loss(logits_btv, ids_bt, target_bt):
  """Mean cross-entropy of logits_i against w_{i+1} where w_{i+1} is a target; (loss, acc)."""
  logits, labels, mask = logits_btv[:, :-1], ids_bt[:, 1:], target_bt[:, 1:]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  count = jnp.maximum(jnp.sum(mask), 1)
  accuracy = jnp.sum((jnp.argmax(logits, -1) == labels) & mask) / count
  return jnp.sum(ce * mask) / count, accuracy


def batch_text_loss(logits_btv, batch):
  """`next_token_loss` on a batch's real target text: (loss, accuracy)."""
  return next_token_loss(logits_btv, batch["ids"], batch["text_target"] & batch["valid"])


def masked_mean(values, mask):
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1)


class PretzelTask:
  """One STARFlow2 stage on interleaved records (see the module docstring)."""

  def __init__(self, config):
    self.config = config
    self.stage = stage_of(config)
    self.latent = caption_to_image.build_latent(config)
    self.model = build_model(config, self.latent.token_dim)
    self.layout = build_layout(config, self.latent)
    self.tokenizer = text_lib.build_tokenizer(config.data)
    self._generators = {}
    vocab = self.model.config.vlm.vocab_size
    if self.tokenizer.vocab_size > vocab:
      raise ValueError(f"the VLM's vocabulary ({vocab}) is smaller than the tokenizer's "
                       f"{self.tokenizer.vocab_size} ids (config.data.tokenizer)")

  # ---- data ---------------------------------------------------------------------------

  def example_transform(self):
    return interleaved.InterleavedExample(self.layout, self.tokenizer.ids,
                                          self.config.data.prompt_segments)

  @property
  def positions_per_example(self):
    return self.layout.max_length

  def dummy_batch(self, batch=1):
    """A zero batch of the training shapes (for initialisation and benchmarks)."""
    lay = self.layout
    t, m, n = lay.max_length, lay.max_images, lay.num_elements
    return dict(
        ids=jnp.zeros((batch, t), jnp.int32), valid=jnp.ones((batch, t), bool),
        positions=jnp.zeros((batch, 3, t), jnp.int32), is_visual=jnp.zeros((batch, t), bool),
        text_target=jnp.zeros((batch, t), bool), prompt_text=jnp.zeros((batch, t), bool),
        images=jnp.zeros((batch, m) + tuple(lay.image_shape), jnp.uint8),
        image_positions=jnp.zeros((batch, m, n), jnp.int32),
        image_valid=jnp.zeros((batch, m), bool), image_target=jnp.zeros((batch, m), bool))

  def latents(self, images_bmhwc):
    b, m = images_bmhwc.shape[:2]
    x = self.latent.encode(images_bmhwc.reshape((b * m,) + images_bmhwc.shape[2:]))
    return x.reshape((b, m) + x.shape[1:])

  # ---- model --------------------------------------------------------------------------

  def apply(self, params, batch, x_bmnd, t_b, valid_bt=None, method="__call__", **kwargs):
    """The Pretzel's full pass (or `method`) over a batch of sequence arrays."""
    return self.model.apply(
        {"params": params}, batch["ids"], x_bmnd, batch["image_positions"],
        batch["image_valid"], batch["is_visual"], jnp.moveaxis(batch["positions"], 1, 0),
        batch["valid"] if valid_bt is None else valid_bt, t_b, method=method, **kwargs)

  def init_params(self, rng):
    b = self.dummy_batch()
    x = self.latents(b["images"])
    t = jnp.full((1,), self.config.noise.t_min)
    return self.model.init(rng, b["ids"], x, b["image_positions"], b["image_valid"],
                           b["is_visual"], jnp.moveaxis(b["positions"], 1, 0), b["valid"],
                           t)["params"]

  def warm_start(self, params):
    """Params of the previous stage (`init.from_workdir`) and of the converted VLM
    (`init.vlm_checkpoint`) in place of fresh ones; anything else keeps its init. A shape
    mismatch is an error unless `init.reinitialise` (regexes) names the parameter."""
    init = self.config.init
    if init.from_workdir:
      params, _ = checkpointing.restore_params_subset(
          os.path.join(init.from_workdir, "checkpoints"), params,
          reinitialise=tuple(init.reinitialise))
    if init.vlm_checkpoint:
      from starflow2_jax.convert import qwen
      qwen_params = qwen.load_converted(init.vlm_checkpoint,
                                        dtype=jnp.dtype(self.config.model.vlm_dtype))
      params = dict(params, vlm=pretzel.vlm_params_from_qwen(qwen_params))
    return params

  # ---- losses -------------------------------------------------------------------------

  def text_metrics(self, params, batch):
    """Next-token loss and accuracy of the VLM stream alone (stage 0: text records)."""
    logits = self.model.apply({"params": params}, batch["ids"],
                              jnp.moveaxis(batch["positions"], 1, 0), batch["valid"],
                              method="language_model")
    ntp, accuracy = batch_text_loss(logits, batch)
    return {"loss": ntp, "ntp": ntp, "token_accuracy": accuracy}

  def loss(self, params, batch, rng):
    """The stage's loss: L_flow (per image, weighted by t), λ·L_NTP, or both."""
    cfg, stage = self.config, self.stage
    if stage.text_only:
      metrics = self.text_metrics(params, batch)
      return metrics["loss"], metrics
    rng_deq, rng_t, rng_eps, rng_drop = jax.random.split(rng, 4)
    x = caption_to_image.uniform_dequantize(rng_deq, self.latents(batch["images"]))
    batch_size = x.shape[0]
    t = noise.sample_noise_levels(rng_t, batch_size, cfg.noise.t_min, cfg.noise.t_max)
    x = noise.add_noise(rng_eps, x.reshape(batch_size, -1, x.shape[-1]), t).reshape(x.shape)
    valid = batch["valid"]
    if stage.caption_dropout:
      keep_b = jax.random.bernoulli(rng_drop, 1.0 - cfg.train.caption_dropout, (batch_size,))
      valid = valid & ~(batch["prompt_text"] & ~keep_b[:, None])
    if not stage.flow_loss and not stage.skips:    # stage 2: the flow stream is not needed
      logits = self.apply(params, batch, x, t, valid, method="understanding_logits")
      ntp, accuracy = batch_text_loss(logits, batch)
      loss = cfg.loss.ntp_weight * ntp
      return loss, {"loss": loss, "ntp": ntp, "token_accuracy": accuracy}
    out = self.apply(params, batch, x, t, valid, with_logits=stage.ntp_loss,
                     isolate_flow=not cfg.loss.text_shapes_flow)
    loss, metrics = 0.0, {}
    if stage.flow_loss:
      nll_bm = out.images.nll_per_dim()
      targets = batch["image_valid"] & batch["image_target"]
      weights = noise.loss_weights(t, cfg.noise.loss_weighting)[:, None]
      loss = loss + masked_mean(weights * nll_bm, targets)
      metrics["flow_nll"] = masked_mean(nll_bm, targets)
    if stage.ntp_loss:
      ntp, accuracy = batch_text_loss(out.logits_btv, batch)
      loss = loss + cfg.loss.ntp_weight * ntp
      metrics.update(ntp=ntp, token_accuracy=accuracy)
    metrics["loss"] = loss
    return loss, metrics

  def eval_metrics(self, params, batch, rng):
    """Held-out image NLL at the lowest noise level (pixel bits/dim for the patch latent)
    and the next-token loss and accuracy on the target text."""
    if self.stage.text_only:
      return self.text_metrics(params, batch)
    x = caption_to_image.uniform_dequantize(rng, self.latents(batch["images"]))
    t = jnp.full((x.shape[0],), self.config.eval.noise_level, jnp.float32)
    out = self.apply(params, batch, x, t, with_logits=self.stage.ntp_loss)
    metrics = {}
    if self.stage.flow_loss:        # (stage 2's records have no target images)
      nll = masked_mean(out.images.nll_per_dim(), batch["image_valid"] & batch["image_target"])
      metrics.update(nll=nll, pixel_bpd=likelihood.pixel_bits_per_dim(nll))
    if self.stage.ntp_loss:
      ntp, accuracy = batch_text_loss(out.logits_btv, batch)
      metrics.update(ntp=ntp, token_accuracy=accuracy)
    return metrics

  # ---- sampling -------------------------------------------------------------------------

  def generator(self, **spec_overrides):
    """A compiled `sampling.prompts.Generator` (cached per spec overrides)."""
    from starflow2_jax.sampling import prompts
    key = tuple(sorted(spec_overrides.items()))
    if key not in self._generators:
      self._generators[key] = prompts.Generator(self, **spec_overrides)
    return self._generators[key]

  def sample_captions(self, params, captions, rng, guidance_weight=None):
    """uint8 images [B, H, W, C], one drawn for each caption."""
    from starflow2_jax.sampling import prompts
    gen = self.generator(guidance_weight=guidance_weight, max_new=self.layout.num_elements + 1)
    results = gen.generate(params, [[c, prompts.DRAW] for c in captions], rng)
    return np.stack([r.images[0] for r in results])

  def answer(self, params, images, question, rng):
    """Greedy text answers to `question` about each uint8 image, at the lowest noise level."""
    gen = self.generator(guidance_weight=None, noise_level=self.config.noise.t_min)
    return [r.text for r in gen.generate(params, [[image, question] for image in images], rng)]

  def sample_grid(self, params, rng):
    """Caption -> image samples as `caption_to_image.caption_grid`; None before stage 1."""
    if not self.stage.flow_loss:
      return None
    return caption_to_image.caption_grid(self, params, rng)
