"""An independent judge of generated images: multinomial logistic regression on pixels.

Deliberately unrelated to the flow model (no shared code or features), trained on the real
training split, so that "the classifier recognises the samples" says something about the
samples and not about the model agreeing with itself.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class PixelClassifier:
  weights: np.ndarray   # [F, K]
  bias: np.ndarray      # [K]
  mean: np.ndarray      # [F] feature standardisation
  scale: np.ndarray     # [F]

  def _features(self, images):
    flat = np.asarray(images, np.float32).reshape(len(images), -1)
    return (flat - self.mean) / self.scale

  def predict(self, images):
    return np.argmax(self._features(images) @ self.weights + self.bias, axis=-1)

  def accuracy(self, images, labels):
    return float(np.mean(self.predict(images) == np.asarray(labels)))


def fit_logistic_regression(images, labels, num_classes, steps=300, learning_rate=0.05,
                            l2=1e-4):
  """Full-batch Adam on the softmax cross-entropy with an L2 penalty (deterministic)."""
  flat = np.asarray(images, np.float32).reshape(len(images), -1)
  mean, scale = flat.mean(0), flat.std(0) + 1.0
  x = jnp.asarray((flat - mean) / scale)
  y = jax.nn.one_hot(jnp.asarray(labels), num_classes)
  params = (jnp.zeros((x.shape[1], num_classes)), jnp.zeros((num_classes,)))
  opt = optax.adam(learning_rate)

  def loss_fn(params):
    w, b = params
    logits = x @ w + b
    return optax.softmax_cross_entropy(logits, y).mean() + l2 * jnp.sum(w * w)

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = opt.init(params)
  for _ in range(steps):
    params, opt_state = step(params, opt_state)
  w, b = jax.device_get(params)
  return PixelClassifier(np.asarray(w), np.asarray(b), mean, scale)
