"""Convolution implementations: the canonical `lax.conv_general_dilated`, and CPU-fast
equivalents with the same signature, plugged into `flax.linen.Conv(conv_general_dilated=...)`.

Why: XLA:CPU lowers grouped (depthwise) and 1x1 convolutions to slow generic kernels.
Measured on the 2-core dev machine (jax 0.10.2, 256x16x16x64, forward+backward):
depthwise lax.conv ~800 ms vs ~126 ms as shifted multiply-adds; 1x1 ~291 ms vs ~36 ms as
a matmul. The fast forms below are the same maths (tests/test_ops.py checks outputs and
gradients against lax for every variant the models use), take the same kernel layout
(HWIO), so parameters and checkpoints are shared between implementations.

Only NHWC/HWIO layouts with zero padding and no input dilation take a fast path;
anything else falls through to lax, so the fast function is always safe to plug in.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

IMPLEMENTATIONS = ("lax", "fast", "auto")


def _is_nhwc_hwio(dimension_numbers) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    # NHWC: batch 0, feature 3, spatial (1, 2); HWIO: out 3, in 2, spatial (0, 1).
    return (tuple(dimension_numbers.lhs_spec) == (0, 3, 1, 2)
            and tuple(dimension_numbers.rhs_spec) == (3, 2, 0, 1)
            and tuple(dimension_numbers.out_spec) == (0, 3, 1, 2))
  return tuple(dimension_numbers) == ("NHWC", "HWIO", "NHWC")


def _explicit_padding(padding, in_hw, kernel_hw, strides, dilation):
  """Turns 'SAME'/'VALID'/pairs into ((lo, hi), (lo, hi)) exactly as lax does."""
  if isinstance(padding, str):
    effective = [(k - 1) * d + 1 for k, d in zip(kernel_hw, dilation)]
    return tuple(lax.padtype_to_pads(in_hw, effective, strides, padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def _taps(x, kernel_hw, strides, dilation, out_hw):
  """Yields ((i, j), view) for each kernel tap: the input pixels that tap reads for
  every output position, taken with a strided slice so strided convs compute only the
  outputs they keep."""
  (sh, sw), (dh, dw), (oh, ow) = strides, dilation, out_hw
  for i in range(kernel_hw[0]):
    for j in range(kernel_hw[1]):
      view = lax.slice(
          x,
          (0, i * dh, j * dw, 0),
          (x.shape[0], i * dh + (oh - 1) * sh + 1, j * dw + (ow - 1) * sw + 1, x.shape[3]),
          (1, sh, sw, 1))
      yield (i, j), view


def fast_conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding,
                              lhs_dilation=None, rhs_dilation=None,
                              dimension_numbers=None, feature_group_count: int = 1,
                              batch_group_count: int = 1, precision=None,
                              preferred_element_type=None):
  """Drop-in for `lax.conv_general_dilated` that is fast on XLA:CPU for the S9 ops."""
  strides = tuple(window_strides)
  dilation = tuple(rhs_dilation or (1,) * len(strides))
  if (lhs.ndim != 4 or not _is_nhwc_hwio(dimension_numbers)
      or any(d != 1 for d in (lhs_dilation or (1, 1))) or batch_group_count != 1):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
        dimension_numbers, feature_group_count, batch_group_count, precision,
        preferred_element_type)

  kh, kw, cin_per_group, cout = rhs.shape
  cin = lhs.shape[3]
  pads = _explicit_padding(padding, lhs.shape[1:3], (kh, kw), strides, dilation)
  if any(p < 0 for pair in pads for p in pair):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
        dimension_numbers, feature_group_count, batch_group_count, precision,
        preferred_element_type)
  x = jnp.pad(lhs, ((0, 0), pads[0], pads[1], (0, 0))) if any(map(any, pads)) else lhs
  out_hw = tuple((x.shape[1 + a] - ((kh, kw)[a] - 1) * dilation[a] - 1) // strides[a] + 1
                 for a in range(2))

  if feature_group_count == cin and cin_per_group == 1 and cout == cin:
    # Depthwise: one broadcast multiply-add per tap instead of a grouped conv.
    out = None
    for (i, j), view in _taps(x, (kh, kw), strides, dilation, out_hw):
      term = view * rhs[i, j, 0, :]
      out = term if out is None else out + term
    return out

  if feature_group_count == 1:
    # Dense conv as im2col: the taps side by side on the channel axis, then one matmul
    # (measured 246 ms vs 427 ms for lax and 444 ms for a sum of per-tap matmuls).
    views = [view for _, view in _taps(x, (kh, kw), strides, dilation, out_hw)]
    patches = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
    return jnp.einsum("nhwk,kd->nhwd", patches, rhs.reshape(kh * kw * cin, cout),
                      precision=precision)

  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
      dimension_numbers, feature_group_count, batch_group_count, precision,
      preferred_element_type)


def resolve(impl: str) -> str:
  """'auto' means the fast forms on CPU and XLA's own convolutions on GPU/TPU."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"conv implementation must be one of {IMPLEMENTATIONS}, got {impl!r}")
  if impl == "auto":
    return "fast" if jax.default_backend() == "cpu" else "lax"
  return impl


def conv_function(impl: str):
  """The function to pass as `nn.Conv(conv_general_dilated=...)`."""
  return fast_conv_general_dilated if resolve(impl) == "fast" else lax.conv_general_dilated
