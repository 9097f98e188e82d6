"""PyTorch's bicubic resize, `F.interpolate(mode="bicubic", align_corners=False)`, in numpy.

Importers resample position tables with it exactly as the reference model would at run
time, without importing torch. Both of PyTorch's variants are separable: each output index
is a weighted sum of input indices along one axis, a [n_out, n_in] matrix applied to rows
and then to columns.

- plain (`antialias=False`): Keys' cubic convolution with A = −0.75 at source coordinate
  (i + ½)·in/out − ½, taps i−1 … i+2 clamped to the border (aten upsample_bicubic2d);
- antialiased (`antialias=True`): PIL's filter, A = −0.5, its support widened by in/out when
  shrinking, taps cut at the border and the weights renormalised (aten
  _upsample_bicubic2d_aa).

Computed in float64; PyTorch computes in float32, so results agree to float32 rounding.
"""

import numpy as np


def cubic(x, a):
  """Keys' cubic convolution kernel with parameter `a` at distances `x`."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = (((x - 5) * x + 8) * x - 4) * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def plain_matrix(n_in, n_out, a=-0.75):
  """[n_out, n_in] weights of PyTorch's bicubic resize without antialiasing."""
  source = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
  first = np.floor(source)
  t = source - first
  matrix = np.zeros((n_out, n_in))
  for k in range(-1, 3):
    index = np.clip(first + k, 0, n_in - 1).astype(np.int64)
    np.add.at(matrix, (np.arange(n_out), index), cubic(t - k, a))
  return matrix


def antialiased_matrix(n_in, n_out, a=-0.5):
  """[n_out, n_in] weights of PyTorch's antialiased bicubic resize."""
  scale = n_in / n_out
  support = 2.0 * max(scale, 1.0)
  inverse = 1.0 / scale if scale >= 1.0 else 1.0
  matrix = np.zeros((n_out, n_in))
  for i in range(n_out):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)      # int(): truncation, as in aten
    hi = min(int(center + support + 0.5), n_in)
    weights = cubic((np.arange(lo, hi) - center + 0.5) * inverse, a)
    matrix[i, lo:hi] = weights / weights.sum()
  return matrix


def resize(x_hwc, height, width, antialias=False):
  """[H, W, C] -> float64 [height, width, C], as F.interpolate(mode="bicubic",
  align_corners=False, antialias=antialias) on the channels-first tensor."""
  matrix = antialiased_matrix if antialias else plain_matrix
  x = np.asarray(x_hwc, np.float64)
  rows, cols = matrix(x.shape[0], height), matrix(x.shape[1], width)
  return np.einsum("ih,hwc,jw->ijc", rows, x, cols)
