"""Loss pieces both tasks share: dequantised, noised latents (SPEC §4), the text loss, and
masked means as shares of whole-batch counts (what microbatches add up, `accumulation`)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from starflow2_jax.flows import noise


class NoisyLatents(NamedTuple):
  x: jnp.ndarray            # x̃ = dequantised x + t ε, the shape of the input latents
  t_b: jnp.ndarray          # each example's noise level [B]
  rng_dropout: jax.Array    # a fourth key, for the caller's caption dropout


def noisy_latents(rng, x, noise_cfg, dequantize):
  """Multi-noise training inputs: dequantise (the latent space's `dequantize`), draw
  t ~ U[t_min, t_max] per example, add t ε.

  `x` is [B, N, D] or [B, M, N, D] (every image of an example shares its t)."""
  rng_deq, rng_t, rng_eps, rng_dropout = jax.random.split(rng, 4)
  x = dequantize(rng_deq, x)
  batch = x.shape[0]
  t_b = noise.sample_noise_levels(rng_t, batch, noise_cfg.t_min, noise_cfg.t_max)
  x = noise.add_noise(rng_eps, x.reshape(batch, -1, x.shape[-1]), t_b).reshape(x.shape)
  return NoisyLatents(x, t_b, rng_dropout)


def masked_mean(values, mask):
  """Mean of `values` where `mask` holds (0 where it holds nowhere)."""
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1)


def count(mask):
  """The denominator of `masked_mean` over `mask`: max(Σ mask, 1)."""
  return jnp.maximum(jnp.sum(mask), 1)


def share(values, mask, total):
  """A slice's share of a whole batch's `masked_mean`: Σ values·mask over the slice, over
  the whole batch's `count` `total`; the shares of a batch's slices add up to its mean."""
  return jnp.sum(values * mask) / total


def next_token_terms(logits_btv, ids_bt, target_bt):
  """Per position i < T − 1: the cross-entropy of logits_i against w_{i+1}, whether their
  argmax is w_{i+1}, and whether w_{i+1} is a target (each [B, T − 1])."""
  logits, labels, mask = logits_btv[:, :-1], ids_bt[:, 1:], target_bt[:, 1:]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return ce, jnp.argmax(logits, -1) == labels, mask


def next_token_loss(logits_btv, ids_bt, target_bt):
  """Mean cross-entropy of logits_i against w_{i+1} where w_{i+1} is a target; (loss, acc)."""
  ce, correct, mask = next_token_terms(logits_btv, ids_bt, target_bt)
  accuracy = masked_mean(correct, mask)
  return masked_mean(ce, mask), accuracy


def text_targets(batch):
  """Where a batch holds real target text [B, T]."""
  return batch["text_target"] & batch["valid"]


def batch_text_loss(logits_btv, batch):
  """`next_token_loss` on a batch's real target text: (loss, accuracy)."""
  return next_token_loss(logits_btv, batch["ids"], text_targets(batch))


def text_target_count(batch):
  """The denominator of `batch_text_loss`: the tokens w_{i+1}, i < T − 1, that are targets."""
  return count(text_targets(batch)[:, 1:])


def text_loss_share(logits_btv, batch, total):
  """A slice's shares of `batch_text_loss` (loss, accuracy), over the whole batch's
  `text_target_count` `total`."""
  ce, correct, mask = next_token_terms(logits_btv, batch["ids"], text_targets(batch))
  return share(ce, mask, total), share(correct, mask, total)
