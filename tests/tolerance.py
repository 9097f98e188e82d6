"""The suite's float32 tolerance policy: bounds derived from the computation, not from luck.

Two float32 computations of the same quantity that round differently (another summation
order, a KV cache instead of a full pass, padding that changes the shapes XLA tiles) differ
by rounding error that scales with the *magnitude of what is compared* and grows with the
work between the inputs and the compared values. The bound used throughout:

    max |actual − desired|  ≤  per_layer · depth · √reduction · eps32 · max |desired|

- `max |desired|`: the magnitude of the compared array, not of each element — an element
  near zero is a difference of terms of the array's size and carries their rounding;
- `√reduction`: rounding in a length-K float32 sum grows like √K · eps relative to its terms
  (the random-walk model of floating-point summation); K is the longest reduction in a layer
  (its width or MLP hidden size);
- `depth`: the sequential layers (Transformer layers, flow blocks, the output head) in which
  the two computations may round differently; errors add across them;
- `per_layer` = 4: a layer runs a handful of such reductions one after another (norm,
  attention projections, softmax, MLP).

Never an absolute 1e-6 on values near 7, never a bound loosened until a test passes: when a
bound fails, find out why. Bitwise claims (a fresh flow is the identity, resume is exact)
stay `assert_array_equal`.
"""

import math

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)
PER_LAYER = 4


def float32_bound(scale, depth, reduction, per_layer=PER_LAYER):
  """The policy's bound on |actual − desired| for values of magnitude `scale`."""
  return per_layer * depth * math.sqrt(reduction) * EPS32 * scale


def assert_float32_close(actual, desired, *, depth, reduction, per_layer=PER_LAYER):
  """Asserts the policy's bound (see the module docstring) between two arrays."""
  actual = np.asarray(actual, np.float64)
  desired = np.asarray(desired, np.float64)
  assert actual.shape == desired.shape, (actual.shape, desired.shape)
  scale = float(np.max(np.abs(desired)))
  bound = float32_bound(scale, depth, reduction, per_layer)
  error = float(np.max(np.abs(actual - desired)))
  assert error <= bound, (
      f"max |actual − desired| = {error:.3g} exceeds the float32 bound {bound:.3g} "
      f"(= {per_layer} · depth {depth} · √{reduction} · eps · scale {scale:.3g})")
