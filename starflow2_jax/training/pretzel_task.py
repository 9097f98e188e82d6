"""One STARFlow2 training stage as a task for the trainer (SPEC §4).

`config.stage` picks a row of the stage table (`models.stages.STAGES`): which losses run,
whether captions are dropped for classifier-free guidance, whether the model has the vertical
skips W_v, W_t. Which parameters train is the config's `optimizer.trainable` (regexes over
parameter names; `STAGES[k].trainable` is the default an experiment config copies); frozen
parameters get no optimizer state and stay bit-identical.

Warm start (`warm_start`): stage k starts from stage k−1's checkpoint (`init.from_workdir`,
a partial restore: the skips stage 3 adds keep their zero init) and the VLM from a converted
Qwen2.5-VL checkpoint (`init.vlm_checkpoint`).
"""

import dataclasses
import functools
import os
import re

import jax
import jax.numpy as jnp

from data_pipelines import examples
from data_pipelines import text as text_lib
from starflow2_jax.convert import qwen
from starflow2_jax.flows import noise
from starflow2_jax.flows import stack
from starflow2_jax.layers import scan
from starflow2_jax.models import pretzel
from starflow2_jax.models import stages
from starflow2_jax.models.qwen2_5_vl import config as qwen_config
from starflow2_jax.sampling import grids
from starflow2_jax.sampling import prompts
from starflow2_jax.training import builders
from starflow2_jax.training import checkpointing
from starflow2_jax.training import losses


def vlm_text_config(cfg):
  """config.model.vlm: a Qwen2.5-VL preset name or a dict of `TextConfig` fields."""
  if isinstance(cfg, str):
    return qwen_config.preset(cfg).text
  return qwen_config.TextConfig(**{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in dict(cfg).items()})


def build_model(config, latent_dim):
  """The Pretzel of `config.model` for `config.stage`."""
  m = config.model
  deep = builders.transformer_config(m.deep, m)
  deep = pretzel.with_flow_positions(deep, m.deep.rope_layout)
  flow = stack.FlowConfig(
      latent_dim=latent_dim, deep=deep,
      shallow=builders.transformer_config(m.shallow, m),
      num_shallow_blocks=m.num_shallow_blocks, scale=m.scale,
      noise_conditioning=m.noise_conditioning)
  model_cfg = pretzel.PretzelConfig(
      vlm=vlm_text_config(m.vlm), flow=flow, adapter_hidden=m.adapter_hidden,
      skips=stages.stage_of(config).skips, freeze_vlm=not stages.stage_of(config).text_only,
      vlm_dtype=m.vlm_dtype, vlm_remat=m.get("vlm_remat", "none"),
      vlm_scan=m.get("scan_layers", False))
  return pretzel.Pretzel(model_cfg, dtype=jnp.dtype(m.dtype))


def image_targets(batch):
  """The target images of a batch [B, M]: what the flow loss counts."""
  return batch["image_valid"] & batch["image_target"]


def build_layout(config, latent):
  """The sequence layout of `config.data` (images as pixels; `example_transform` adds the
  precomputed latents when `data.precomputed_latents` says the records carry them)."""
  d = config.data
  return examples.SequenceLayout(
      max_length=d.max_length, max_images=d.max_images, grid=latent.grid,
      image_shape=tuple(d.image_size) + (d.channels,), **dict(d.special_ids))


class PretzelTask:
  """One STARFlow2 stage on interleaved records (see the module docstring)."""

  def __init__(self, config):
    self.config = config
    self.stage = stages.stage_of(config)
    self.latent = builders.build_latent(config)
    self.model = build_model(config, self.latent.token_dim)
    self.layout = build_layout(config, self.latent)

  @functools.cached_property
  def tokenizer(self):
    """`config.data`'s tokenizer, built when first used (a memory plan needs none)."""
    tokenizer = text_lib.build_tokenizer(self.config.data)
    vocab = self.model.config.vlm.vocab_size
    if tokenizer.vocab_size > vocab:
      raise ValueError(f"the VLM's vocabulary ({vocab}) is smaller than the tokenizer's "
                       f"{tokenizer.vocab_size} ids (config.data.tokenizer)")
    return tokenizer

  # ---- data ---------------------------------------------------------------------------

  def example_transform(self):
    layout = self.layout
    if self.config.data.get("precomputed_latents", False):
      layout = dataclasses.replace(
          layout, latent_shape=(self.latent.num_tokens, self.latent.token_dim))
    return examples.InterleavedExample(layout, self.tokenizer.ids,
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
        image_valid=jnp.zeros((batch, m), bool), image_target=jnp.zeros((batch, m), bool),
        **({"image_latents": jnp.zeros((batch, m, n, self.latent.token_dim), jnp.float32)}
           if self.config.data.get("precomputed_latents", False) else {}))

  def encode_images(self, images_bmhwc):
    """uint8 images [B, M, H, W, C] -> latents [B, M, N, D]."""
    b, m = images_bmhwc.shape[:2]
    x = self.latent.encode(images_bmhwc.reshape((b * m,) + images_bmhwc.shape[2:]))
    return x.reshape((b, m) + x.shape[1:])

  def batch_latents(self, batch):
    """A batch's image latents: precomputed ones where the records carry them, else
    encoded from the pixels."""
    if "image_latents" in batch:
      return batch["image_latents"]
    return self.encode_images(batch["images"])

  # ---- model --------------------------------------------------------------------------

  def apply(self, params, batch, x_bmnd, t_b, valid_bt=None, method="__call__", **kwargs):
    """The Pretzel's full pass (or `method`) over a batch of sequence arrays."""
    return self.model.apply(
        {"params": params}, batch["ids"], x_bmnd, batch["image_positions"],
        batch["image_valid"], batch["is_visual"], jnp.moveaxis(batch["positions"], 1, 0),
        batch["valid"] if valid_bt is None else valid_bt, t_b, method=method, **kwargs)

  def init_params(self, rng):
    b = self.dummy_batch()
    x = self.batch_latents(b)                    # (initialisers read shapes only)
    t = jnp.full((1,), self.config.noise.t_min)
    return self.model.init(rng, b["ids"], x, b["image_positions"], b["image_valid"],
                           b["is_visual"], jnp.moveaxis(b["positions"], 1, 0), b["valid"],
                           t)["params"]

  def kept_elsewhere(self):
    """With `init.checkpoint_vlm=False`, the frozen VLM stays out of this stage's
    checkpoints and is read back from `init.vlm_checkpoint` (a converted Qwen checkpoint):
    {"vlm": (that path, load into the abstract VLM's shardings)}; else {}."""
    init = self.config.init
    if init.get("checkpoint_vlm", True):
      return {}
    if not init.vlm_checkpoint:
      raise ValueError("config.init.checkpoint_vlm=False needs config.init.vlm_checkpoint "
                       "(the converted Qwen checkpoint the VLM is read back from)")
    if self.stage.text_only or any(re.fullmatch(p, "vlm/embed_tokens/embedding")
                                   for p in self.config.optimizer.trainable):
      raise ValueError("config.init.checkpoint_vlm=False keeps the VLM out of checkpoints, "
                       "but this stage trains it (config.optimizer.trainable)")
    return {"vlm": (os.path.abspath(init.vlm_checkpoint), self.load_vlm)}

  def load_vlm(self, like=None):
    """The VLM's parameters from `init.vlm_checkpoint`, in `vlm_dtype`, placed in the
    shardings of `like` (the VLM's abstract or current parameters) when given. A scanned
    VLM gets them stacked on the devices that hold them (converted checkpoints keep one
    entry per layer), never gathered to one host."""
    qwen_params = qwen.load_converted(self.config.init.vlm_checkpoint,
                                      dtype=jnp.dtype(self.config.model.vlm_dtype))
    vlm = pretzel.vlm_params_from_qwen(qwen_params)
    shardings = None if like is None else jax.tree.map(lambda a: a.sharding, like)
    if self.model.config.vlm_scan:
      stack = functools.partial(scan.stack_layers, num_layers=self.model.config.vlm.num_layers)
      return jax.jit(stack, **({} if shardings is None else {"out_shardings": shardings}))(vlm)
    if shardings is None:
      return vlm
    return jax.tree.map(jax.device_put, vlm, shardings)

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
      params = dict(params, vlm=self.load_vlm(params["vlm"]))
    return params

  # ---- losses -------------------------------------------------------------------------

  def text_logits(self, params, batch):
    """The VLM stream's logits alone (stage 0: text records)."""
    return self.model.apply({"params": params}, batch["ids"],
                            jnp.moveaxis(batch["positions"], 1, 0), batch["valid"],
                            method="language_model")

  def text_metrics(self, params, batch):
    """Next-token loss and accuracy of the VLM stream alone (stage 0: text records)."""
    ntp, accuracy = losses.batch_text_loss(self.text_logits(params, batch), batch)
    return {"loss": ntp, "ntp": ntp, "token_accuracy": accuracy}

  def noisy_inputs(self, batch, rng):
    """The loss's random inputs: noised latents x̃ [B, M, N, D], noise levels t [B], and the
    sequence mask [B, T] without the prompts of dropped captions (where the stage drops)."""
    cfg = self.config
    x, t, rng_drop = losses.noisy_latents(rng, self.batch_latents(batch), cfg.noise,
                                          self.latent.dequantize)
    valid = batch["valid"]
    if self.stage.caption_dropout:
      keep_b = jax.random.bernoulli(rng_drop, 1.0 - cfg.train.caption_dropout, (x.shape[0],))
      valid = valid & ~(batch["prompt_text"] & ~keep_b[:, None])
    return x, t, valid

  def flow_weights(self, batch, t_b):
    """The target images [B, M] and each example's flow-loss weight [B]: t's weights average
    to 1 over the examples that have a target image."""
    targets_bm = image_targets(batch)
    weights_b = noise.loss_weights(t_b, self.config.noise.loss_weighting,
                                   jnp.any(targets_bm, axis=1))
    return targets_bm, weights_b

  def loss(self, params, batch, rng):
    """The stage's loss: L_flow (per image, weighted by t), λ·L_NTP, or both."""
    cfg, stage = self.config, self.stage
    if stage.text_only:
      metrics = self.text_metrics(params, batch)
      return metrics["loss"], metrics
    x, t, valid = self.noisy_inputs(batch, rng)
    if not stage.needs_flow_stream:
      logits = self.apply(params, batch, x, t, valid, method="understanding_logits")
      ntp, accuracy = losses.batch_text_loss(logits, batch)
      loss = cfg.loss.ntp_weight * ntp
      return loss, {"loss": loss, "ntp": ntp, "token_accuracy": accuracy}
    out = self.apply(params, batch, x, t, valid, with_logits=stage.ntp_loss,
                     isolate_flow=not cfg.loss.text_shapes_flow)
    loss, metrics = 0.0, {}
    if stage.flow_loss:
      nll_bm = out.images.nll_per_dim()
      targets_bm, weights_b = self.flow_weights(batch, t)
      flow_loss = losses.masked_mean(weights_b[:, None] * nll_bm, targets_bm)
      loss = loss + flow_loss
      metrics.update(flow_loss=flow_loss, flow_nll=losses.masked_mean(nll_bm, targets_bm))
    if stage.ntp_loss:
      ntp, accuracy = losses.batch_text_loss(out.logits_btv, batch)
      loss = loss + cfg.loss.ntp_weight * ntp
      metrics.update(ntp=ntp, token_accuracy=accuracy)
    metrics["loss"] = loss
    return loss, metrics

  # ---- the loss in microbatches (`accumulation.MicrobatchLoss`) -----------------------

  def loss_inputs(self, batch, rng):
    """`loss`'s per-example inputs [B, ...], drawn for the whole batch: x̃, t, the sequence
    mask after caption dropout, the flow-loss weights (normalised over the whole batch)."""
    if self.stage.text_only:
      return {}
    x, t, valid = self.noisy_inputs(batch, rng)
    inputs = dict(x=x, t=t, valid=valid)
    if self.stage.flow_loss:
      inputs["weights_b"] = self.flow_weights(batch, t)[1]
    return inputs

  def loss_totals(self, batch):
    """The denominators of `loss`'s means over the whole batch: target tokens and images."""
    totals = {}
    if self.stage.ntp_loss:
      totals["text"] = losses.text_target_count(batch)
    if self.stage.flow_loss:
      totals["images"] = losses.count(image_targets(batch))
    return totals

  def loss_share(self, params, batch, inputs, totals):
    """A slice's share of `loss` and its metrics: the slice's sums over the whole batch's
    `totals`, on its slice of `loss_inputs`; the shares of a batch's slices add up to `loss`."""
    cfg, stage = self.config, self.stage
    out = None
    if stage.text_only:
      logits = self.text_logits(params, batch)
    elif not stage.needs_flow_stream:
      logits = self.apply(params, batch, inputs["x"], inputs["t"], inputs["valid"],
                          method="understanding_logits")
    else:
      out = self.apply(params, batch, inputs["x"], inputs["t"], inputs["valid"],
                       with_logits=stage.ntp_loss, isolate_flow=not cfg.loss.text_shapes_flow)
      logits = out.logits_btv
    loss, metrics = 0.0, {}
    if stage.flow_loss:
      nll_bm, targets_bm = out.images.nll_per_dim(), image_targets(batch)
      flow_loss = losses.share(inputs["weights_b"][:, None] * nll_bm, targets_bm,
                               totals["images"])
      loss = loss + flow_loss
      metrics.update(flow_loss=flow_loss,
                     flow_nll=losses.share(nll_bm, targets_bm, totals["images"]))
    if stage.ntp_loss:
      ntp, accuracy = losses.text_loss_share(logits, batch, totals["text"])
      loss = loss + (1.0 if stage.text_only else cfg.loss.ntp_weight) * ntp   # as `loss`
      metrics.update(ntp=ntp, token_accuracy=accuracy)
    metrics["loss"] = loss
    return loss, metrics

  def eval_metrics(self, params, batch, rng):
    """Held-out image NLL at the lowest noise level (pixel bits/dim for the patch latent,
    bits per latent dimension for a learned one)
    and the next-token loss and accuracy on the target text."""
    if self.stage.text_only:
      return self.text_metrics(params, batch)
    x = self.latent.dequantize(rng, self.batch_latents(batch))
    t = jnp.full((x.shape[0],), self.config.eval.noise_level, jnp.float32)
    out = self.apply(params, batch, x, t, with_logits=self.stage.ntp_loss)
    metrics = {}
    if self.stage.flow_loss:        # (stage 2's records have no target images)
      nll = losses.masked_mean(out.images.nll_per_dim(),
                               batch["image_valid"] & batch["image_target"])
      metrics.update(nll=nll, **self.latent.likelihood_metrics(nll))
    if self.stage.ntp_loss:
      ntp, accuracy = losses.batch_text_loss(out.logits_btv, batch)
      metrics.update(ntp=ntp, token_accuracy=accuracy)
    return metrics

  # ---- samples (drawn by sampling/) -------------------------------------------------------

  def sample_captions(self, params, captions, rng, guidance_weight=None):
    """uint8 images [B, H, W, C], one drawn for each caption (`prompts.draw_captions`)."""
    return prompts.draw_captions(self, params, captions, rng, guidance_weight)

  def sample_grid(self, params, rng):
    """Caption -> image samples as `grids.caption_grid`; None before stage 1."""
    if not self.stage.flow_loss:
      return None
    return grids.caption_grid(self.sample_captions, self.config.sample, params, rng)
