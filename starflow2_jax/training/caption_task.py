"""The caption-to-image task: what the generic trainer needs to train a `CaptionToImageFlow`.

A task owns the model, its loss, its held-out metrics and its samples; the trainer owns
everything else (mesh, state, data order, checkpoints, logging). Later STARFlow2 stages are
other tasks on the same trainer.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import pipeline
from data_pipelines import text as text_lib
from starflow2_jax import image_io
from starflow2_jax.flows import likelihood
from starflow2_jax.flows import noise
from starflow2_jax.flows import stack
from starflow2_jax.latents import patch
from starflow2_jax.layers import transformer as transformer_lib
from starflow2_jax.models import caption_flow
from starflow2_jax.sampling import caption_to_image as sampler


def transformer_config(cfg, remat=False):
  return transformer_lib.TransformerConfig(
      width=cfg.width, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
      mlp_ratio=cfg.mlp_ratio, remat=remat)


def build_latent(config):
  if config.latent.name != "patch":
    raise ValueError(f"config.latent.name={config.latent.name!r}: only 'patch' exists so far")
  return patch.PatchLatent(tuple(config.data.image_size), config.data.channels,
                           config.latent.patch_size)


def build_model(config, latent):
  m = config.model
  flow = stack.FlowConfig(
      latent_dim=latent.token_dim,
      deep=transformer_config(m.deep, m.remat),
      shallow=transformer_config(m.shallow, m.remat),
      num_shallow_blocks=m.num_shallow_blocks,
      context_dim=m.caption_width, scale=m.scale, noise_conditioning=m.noise_conditioning)
  model_cfg = caption_flow.CaptionFlowConfig(flow, m.vocab_size, config.data.max_caption_len)
  return caption_flow.CaptionToImageFlow(model_cfg, dtype=jnp.dtype(m.dtype))


def uniform_dequantize(rng, x_bnd):
  """Spreads each 8-bit bin centre uniformly over its bin (width 2/256)."""
  return x_bnd + jax.random.uniform(rng, x_bnd.shape, jnp.float32, -1 / 256, 1 / 256)


class CaptionToImageTask:
  """Caption-conditioned deep–shallow flow on the patch latent space."""

  def __init__(self, config):
    self.config = config
    self.latent = build_latent(config)
    self.model = build_model(config, self.latent)
    self.tokenizer = text_lib.build_tokenizer(config.data)
    if self.tokenizer.vocab_size > config.model.vocab_size:
      raise ValueError(f"config.model.vocab_size={config.model.vocab_size} is smaller than the "
                       f"tokenizer's {self.tokenizer.vocab_size} ids (config.data.tokenizer)")

  # ---- data ---------------------------------------------------------------------------

  def tokenize(self, captions):
    ids, masks = zip(*(self.tokenizer.encode(c, self.config.data.max_caption_len)
                       for c in captions))
    return np.stack(ids), np.stack(masks)

  def example_transform(self):
    """Record -> {"image", "caption_ids", "caption_mask", "label"} for the Grain pipeline."""
    h, w = self.config.data.image_size
    return pipeline.CaptionImageExample((h, w, self.config.data.channels),
                                        self.config.data.max_caption_len, self.tokenizer)

  @property
  def positions_per_example(self):
    """Sequence positions the deep block reads per example: caption, start, latent elements."""
    return self.config.data.max_caption_len + 1 + self.latent.num_tokens

  def dummy_batch(self, batch=1):
    """A zero batch of the training shapes (for initialisation and benchmarks)."""
    h, w = self.config.data.image_size
    length = self.config.data.max_caption_len
    return dict(image=jnp.zeros((batch, h, w, self.config.data.channels), jnp.uint8),
                caption_ids=jnp.zeros((batch, length), jnp.int32),
                caption_mask=jnp.ones((batch, length), bool))

  # ---- model --------------------------------------------------------------------------

  def init_params(self, rng):
    b = self.dummy_batch()
    x = self.latent.encode(b["image"])
    t = jnp.full((1,), self.config.noise.t_min)
    return self.model.init(rng, x, t, b["caption_ids"], b["caption_mask"])["params"]

  def nll(self, params, x_bnd, t_b, batch, keep_caption_b=None):
    """Per-example NLL in nats per dimension of x given its caption (and noise level t)."""
    out = self.model.apply({"params": params}, x_bnd, t_b, batch["caption_ids"],
                           batch["caption_mask"], keep_caption_b)
    return likelihood.nll_per_dim(out.z_bnd, out.log_det_shallow_b + out.log_det_deep_b)

  def loss(self, params, batch, rng):
    """Multi-noise flow NLL, weighted per example, with caption dropout for CFG."""
    cfg = self.config
    rng_deq, rng_t, rng_eps, rng_drop = jax.random.split(rng, 4)
    x = uniform_dequantize(rng_deq, self.latent.encode(batch["image"]))
    batch_size = x.shape[0]
    t = noise.sample_noise_levels(rng_t, batch_size, cfg.noise.t_min, cfg.noise.t_max)
    keep = jax.random.bernoulli(rng_drop, 1.0 - cfg.train.caption_dropout, (batch_size,))
    nll = self.nll(params, noise.add_noise(rng_eps, x, t), t, batch, keep)
    loss = jnp.mean(noise.loss_weights(t, cfg.noise.loss_weighting) * nll)
    return loss, {"loss": loss, "nll": jnp.mean(nll)}

  def eval_metrics(self, params, batch, rng):
    """Held-out NLL: a variational bound on the 8-bit data (uniform dequantisation), with
    the model conditioned on the smallest noise level `eval.noise_level`."""
    x = uniform_dequantize(rng, self.latent.encode(batch["image"]))
    t = jnp.full((x.shape[0],), self.config.eval.noise_level, jnp.float32)
    nll = jnp.mean(self.nll(params, x, t, batch))
    return {"nll": nll, "pixel_bpd": likelihood.pixel_bits_per_dim(nll)}

  # ---- sampling -----------------------------------------------------------------------

  @functools.partial(jax.jit, static_argnames=("self", "guidance_weight", "denoise_steps"))
  def sample(self, params, caption_ids, caption_mask, rng, guidance_weight=None,
             temperature=1.0, denoise_steps=0):
    """uint8 images [B, H, W, C] for tokenised captions."""
    cfg = self.config
    x = sampler.sample_latents(
        self.model, params, caption_ids, caption_mask, rng, num_tokens=self.latent.num_tokens,
        t_max=cfg.noise.t_max, t_min=cfg.noise.t_min, temperature=temperature,
        guidance_weight=guidance_weight, denoise_steps=denoise_steps)
    return self.latent.decode(x)

  def sample_captions(self, params, captions, rng, guidance_weight=None):
    """Images for a list of caption strings with the config's sampling settings."""
    ids, mask = self.tokenize(captions)
    s = self.config.sample
    return np.asarray(self.sample(params, jnp.asarray(ids), jnp.asarray(mask), rng,
                                  guidance_weight, s.temperature, s.denoise_steps))

  def sample_grid(self, params, rng):
    return caption_grid(self, params, rng)


def caption_grid(task, params, rng):
  """One row per caption of `sample.captions`: `per_class` plain samples, then as many guided
  ones, by `task.sample_captions`. Returns (grid uint8 [H, W, C], plain images, guided
  images, labels)."""
  s = task.config.sample
  captions = [c for c in s.captions for _ in range(s.per_class)]
  labels = np.repeat(np.arange(len(s.captions)), s.per_class)
  rng_plain, rng_guided = jax.random.split(rng)
  plain = task.sample_captions(params, captions, rng_plain)
  guided = task.sample_captions(params, captions, rng_guided, s.guidance_weight)
  rows = len(s.captions)
  grid = np.concatenate([plain.reshape(rows, s.per_class, *plain.shape[1:]),
                         guided.reshape(rows, s.per_class, *guided.shape[1:])], axis=1)
  return image_io.image_grid(grid), plain, guided, labels
