"""The caption-to-image task: what the generic trainer needs to train a `CaptionToImageFlow`.

A task owns the model, its loss and its held-out metrics (the `tasks.Task` protocol); the
trainer owns everything else (mesh, state, data order, checkpoints, logging), and drawing
images is `sampling/`'s job.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import examples
from data_pipelines import text as text_lib
from starflow2_jax.flows import likelihood
from starflow2_jax.flows import noise
from starflow2_jax.flows import stack
from starflow2_jax.models import caption_flow
from starflow2_jax.sampling import caption_to_image as sampler
from starflow2_jax.sampling import grids
from starflow2_jax.training import builders
from starflow2_jax.training import losses


def build_model(config, latent):
  m = config.model
  flow = stack.FlowConfig(
      latent_dim=latent.token_dim,
      deep=builders.transformer_config(m.deep, m),
      shallow=builders.transformer_config(m.shallow, m),
      num_shallow_blocks=m.num_shallow_blocks,
      context_dim=m.caption_width, scale=m.scale, noise_conditioning=m.noise_conditioning)
  model_cfg = caption_flow.CaptionFlowConfig(flow, m.vocab_size, config.data.max_caption_len)
  return caption_flow.CaptionToImageFlow(model_cfg, dtype=jnp.dtype(m.dtype))


class CaptionToImageTask:
  """Caption-conditioned deep–shallow flow on the patch latent space."""

  def __init__(self, config):
    self.config = config
    self.latent = builders.build_latent(config)
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
    return examples.CaptionImageExample((h, w, self.config.data.channels),
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

  def noisy_inputs(self, batch, rng):
    """The loss's random inputs: noised latents x̃, noise levels t [B], and which captions
    are kept [B] (the others are dropped for classifier-free guidance)."""
    cfg = self.config
    x, t, rng_drop = losses.noisy_latents(rng, self.latent.encode(batch["image"]), cfg.noise,
                                          self.latent.dequantize)
    keep = jax.random.bernoulli(rng_drop, 1.0 - cfg.train.caption_dropout, (x.shape[0],))
    return x, t, keep

  def loss(self, params, batch, rng):
    """Multi-noise flow NLL, weighted per example, with caption dropout for CFG."""
    cfg = self.config
    x, t, keep = self.noisy_inputs(batch, rng)
    nll = self.nll(params, x, t, batch, keep)
    loss = jnp.mean(noise.loss_weights(t, cfg.noise.loss_weighting) * nll)
    return loss, {"loss": loss, "nll": jnp.mean(nll)}

  # ---- the loss in microbatches (`accumulation.MicrobatchLoss`) -----------------------

  def loss_inputs(self, batch, rng):
    """`loss`'s per-example inputs, drawn for the whole batch: x̃, t, kept captions and the
    loss weights (normalised over the whole batch)."""
    x, t, keep = self.noisy_inputs(batch, rng)
    return dict(x=x, t=t, keep=keep,
                weights_b=noise.loss_weights(t, self.config.noise.loss_weighting))

  def loss_totals(self, batch):
    """The denominator of `loss`'s means: the whole batch's examples."""
    return {"examples": batch["image"].shape[0]}

  def loss_share(self, params, batch, inputs, totals):
    """A slice's share of `loss` and its metrics: the slice's sums over the whole batch's
    examples; the shares of a batch's slices add up to `loss`."""
    nll = self.nll(params, inputs["x"], inputs["t"], batch, inputs["keep"])
    loss = jnp.sum(inputs["weights_b"] * nll) / totals["examples"]
    return loss, {"loss": loss, "nll": jnp.sum(nll) / totals["examples"]}

  def eval_metrics(self, params, batch, rng):
    """Held-out NLL: a variational bound on the 8-bit data (uniform dequantisation), with
    the model conditioned on the smallest noise level `eval.noise_level`."""
    x = self.latent.dequantize(rng, self.latent.encode(batch["image"]))
    t = jnp.full((x.shape[0],), self.config.eval.noise_level, jnp.float32)
    nll = jnp.mean(self.nll(params, x, t, batch))
    return {"nll": nll, **self.latent.likelihood_metrics(nll)}

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
    return grids.caption_grid(self.sample_captions, self.config.sample, params, rng)

  def warm_start(self, params):
    """The baseline always starts fresh (resume is the trainer's job)."""
    return params
