"""Convolution implementations: the canonical `lax.conv_general_dilated`, and CPU-fast
equivalents with the same signature, plugged into `flax.linen.Conv(conv_general_dilated=...)`;
and CPU-fast BatchNorm and dropout masks for the models' own modules.

Why: XLA:CPU lowers grouped (depthwise) and 1x1 convolutions to slow generic kernels.
Measured on the 2-core dev machine (jax 0.10.2, 256x16x16x64, forward+backward):
depthwise lax.conv ~800 ms vs ~126 ms as shifted multiply-adds; 1x1 ~291 ms vs ~36 ms as
a matmul. The fast forms below are the same maths (tests/test_ops.py checks outputs and
gradients against lax for every variant the models use), take the same kernel layout
(HWIO), so parameters and checkpoints are shared between implementations.

Their gradients are custom VJPs (the textbook transposes), arranged so that XLA:CPU
writes no full-size temporary it can avoid: on this machine that, not arithmetic, is what
a step costs (see `_sum_over_nhw`). With them, `batch_norm_train` (BatchNorm's reductions
done the same way) and `COMPILER_OPTIONS`, the s9net train step went from 560 to ~1,075
images/s (batch 256, 2 cores).

Only NHWC/HWIO layouts with zero padding and no input dilation take a fast path;
anything else falls through to lax, so the fast function is always safe to plug in.

'native' goes further where XLA's fusions stop: depthwise convs, dense 3x3 convs and
BatchNorm's sums as C++ kernels (native.py), same maths again: ~1.2x on the whole step
for the depthwise and BatchNorm kernels, ~1.15x more for the dense ones (fast.py's
network, batch 128); and `separable`, the one op here that is not a conv function: a
depthwise conv and its 1x1 in one C++ call each way (models.SeparableConv uses it with
the C++ kernels), ~1.1x more (fast.py; ~1.16x tiny.py, whose 16-channel 1x1s at 32x32
spent most in memory passes); `separable_of_normalised`, the same op applying the
BatchNorm and ReLU before it as it reads (with `batch_moments`, the statistics with their
own gradient), ~1.03-1.05x more.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from s9jax import native

IMPLEMENTATIONS = ("lax", "fast", "native", "auto")

# Compiler options for the jitted steps. XLA:CPU hands dots and reductions to YNNPACK by
# default; its reductions cannot read a strided slice or fuse their producer, so every
# BatchNorm statistic and kernel-gradient sum first wrote its operand to memory. Dots
# only: s9net train step 922 -> 1003 images/s on the 2-core dev machine. It is an XLA:CPU
# option, so `compiler_options` passes it to XLA:CPU alone.
COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def compiler_options(backend: str) -> dict:
  """The jitted train step's compiler options on `backend` ('cpu', 'gpu', 'tpu')."""
  return dict(COMPILER_OPTIONS) if backend == "cpu" else {}


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


def _tap_views(x, kernel_hw, strides, dilation, out_hw):
  """Yields ((i, j), view) for each kernel tap: the (already padded) input pixels that
  tap reads for every output position, taken with a strided slice so strided convs
  compute only the outputs they keep."""
  (sh, sw), (dh, dw), (oh, ow) = strides, dilation, out_hw
  for i in range(kernel_hw[0]):
    for j in range(kernel_hw[1]):
      view = lax.slice(
          x,
          (0, i * dh, j * dw, 0),
          (x.shape[0], i * dh + (oh - 1) * sh + 1, j * dw + (ow - 1) * sw + 1, x.shape[3]),
          (1, sh, sw, 1))
      yield (i, j), view


def _out_hw(in_hw, kernel_hw, strides, dilation, pads):
  return tuple((in_hw[a] + sum(pads[a]) - (kernel_hw[a] - 1) * dilation[a] - 1) // strides[a] + 1
               for a in range(2))


def _pad_hw(x, pads):
  """Zero-pads (or, for negative amounts, crops) the two spatial axes of NHWC `x`;
  `pads` holds (lo, hi, interior) per spatial axis."""
  return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), *pads, (0, 0, 0)))


def _pad_input(x, pads):
  """The conv's own zero padding, ((lo, hi), (lo, hi)), of its input."""
  return _pad_hw(x, [(lo, hi, 0) for lo, hi in pads]) if any(map(any, pads)) else x


def _sum(terms):
  """Adds a sequence of arrays (one chain XLA fuses; no zero array to start from)."""
  return functools.reduce(operator.add, terms)


def _tap_to_input(cotangent, tap, in_hw, strides, dilation, pads):
  """The transpose of one tap's strided view: places its cotangent (N, OH, OW, C) back
  at the input pixels it read, zeros elsewhere, as one `lax.pad` (interior zeros for the
  stride, negative edges for the conv's padding) so XLA fuses the sum over taps."""
  out_hw = cotangent.shape[1:3]
  config = []
  for a in range(2):
    lo = tap[a] * dilation[a] - pads[a][0]
    hi = in_hw[a] - 1 - lo - (out_hw[a] - 1) * strides[a]
    config.append((lo, hi, strides[a] - 1))
  return _pad_hw(cotangent, config)


# Why custom VJPs: autodiff of the tap slices gave XLA:CPU one materialised full-size
# tensor per tap for the kernel gradient and a chain of pads for the input gradient:
# 216 ms of a 457 ms s9net step (batch 256) in pad/slice fusions. The rules below are
# the textbook transposes, written so that each gradient is one fused pass.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _depthwise(x, w, strides, dilation, pads, use_native=False):
  """Depthwise conv, NHWC x, HWIO w with I == 1 and O == C: one multiply-add per tap
  (or one C++ kernel, native.py)."""
  kernel_hw = w.shape[:2]
  out_hw = _out_hw(x.shape[1:3], kernel_hw, strides, dilation, pads)
  if use_native:
    return native.depthwise_forward(x, w[:, :, 0, :], out_hw, strides, dilation, pads)
  return _sum(view * w[i, j, 0, :] for (i, j), view
              in _tap_views(_pad_input(x, pads), kernel_hw, strides, dilation, out_hw))


def _depthwise_fwd(x, w, strides, dilation, pads, use_native):
  return _depthwise(x, w, strides, dilation, pads, use_native), (x, w)


def _depthwise_bwd(strides, dilation, pads, use_native, residuals, dy):
  x, w = residuals
  kernel_hw, in_hw = w.shape[:2], x.shape[1:3]
  if use_native:
    dx, dw = native.depthwise_backward(x, w[:, :, 0, :], dy, strides, dilation, pads)
    return dx, dw.reshape(w.shape)
  dx = _sum(_tap_to_input(dy * w[i, j, 0, :], (i, j), in_hw, strides, dilation, pads)
            for i in range(kernel_hw[0]) for j in range(kernel_hw[1]))
  taps = [_sum_over_nhw(view, dy) for _, view
          in _tap_views(_pad_input(x, pads), kernel_hw, strides, dilation, dy.shape[1:3])]
  dw = jnp.stack(taps).reshape(w.shape).astype(w.dtype)
  return dx.astype(x.dtype), dw


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def _sum_over_nhw(a, b=None):
  """Per-channel sum over N, H and W of `a` (or of `a * b`), without materialising
  `a * b` or a strided `a`.

  XLA:CPU fuses no producer into a reduction: `jnp.sum(view * dy, (0, 1, 2))` writes the
  full-size product to memory first, and a strided `view` is copied too (~37 ms for the
  nine taps of one 256x16x16x48 layer). Summing the W columns as explicit slices is one
  elementwise fusion writing a W-times smaller array (~3 ms for the nine taps); only that
  is left to `jnp.sum`. Accumulates in float32.
  """
  def column(q):
    term = a[:, :, q, :].astype(jnp.float32)
    return term if b is None else term * b[:, :, q, :].astype(jnp.float32)
  return jnp.sum(_sum(column(q) for q in range(a.shape[2])), axis=(0, 1))


def _im2col(x, kernel_hw, strides, dilation, pads):
  """The taps side by side on the channel axis: (N, OH, OW, KH*KW*C)."""
  out_hw = _out_hw(x.shape[1:3], kernel_hw, strides, dilation, pads)
  views = [view for _, view
           in _tap_views(_pad_input(x, pads), kernel_hw, strides, dilation, out_hw)]
  return views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _dense(x, w, strides, dilation, pads, use_native=False, bf16=False):
  """Dense conv as im2col and one matmul (measured 246 ms vs 427 ms for lax and 444 ms
  for a sum of per-tap matmuls), or as C++ kernels that read x in place (native.py),
  which with `bf16` take bfloat16-rounded operands and sum in float32."""
  return _dense_fwd(x, w, strides, dilation, pads, use_native, bf16)[0]


def _dense_fwd(x, w, strides, dilation, pads, use_native, bf16):
  kh, kw, cin, cout = w.shape
  if use_native:
    out_hw = _out_hw(x.shape[1:3], (kh, kw), strides, dilation, pads)
    return (native.dense_forward(x, w, out_hw, strides, dilation, pads, bf16),
            (x, x.shape[1:3], w))
  patches = _im2col(x, (kh, kw), strides, dilation, pads)
  out = jnp.einsum("nhwk,kd->nhwd", patches, w.reshape(kh * kw * cin, cout))
  return out, (patches, x.shape[1:3], w)


def _dense_bwd(strides, dilation, pads, use_native, bf16, residuals, dy):
  patches, in_hw, w = residuals  # With use_native, x itself: the kernels need no im2col.
  kh, kw, cin, cout = w.shape
  if use_native:
    return (native.dense_input_grad(dy, w, in_hw, strides, dilation, pads, bf16),
            native.dense_kernel_grad(patches, dy, (kh, kw), strides, dilation, pads, bf16))
  # The kernel gradient contracts over pixels, so XLA transposes one operand. The barrier
  # makes that a plain copy of the stored patches; without it XLA fused the patches'
  # producers (BatchNorm, ReLU, the depthwise taps) into the transpose and recomputed
  # them in cache-hostile order (~50 ms of a 280 ms step). As 2-D "mk,md" it needs no
  # second transpose.
  patches = lax.optimization_barrier(patches)
  dw = jnp.einsum("mk,md->kd", patches.reshape(-1, kh * kw * cin),
                  dy.reshape(-1, cout)).reshape(w.shape)
  dpatches = jnp.einsum("nhwd,kd->nhwk", dy, w.reshape(kh * kw * cin, cout))
  dx = _sum(_tap_to_input(dpatches[..., t * cin:(t + 1) * cin], tap, in_hw, strides,
                          dilation, pads)
            for t, tap in enumerate((i, j) for i in range(kh) for j in range(kw)))
  return dx.astype(patches.dtype), dw.astype(w.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def separable(x, depthwise, pointwise, strides, dilation, pads, bf16=False, sums=False):
  """A depthwise-separable conv as one C++ op (native.py): NHWC float32 x, the depthwise
  kernel HWIO (KH, KW, 1, C) and the 1x1 kernel (1, 1, C, F), exactly the two convs'
  kernels; the depthwise output stays in cache, image by image (kernels.cc). `bf16`: the
  1x1's operands rounded to bfloat16, forward and backward, its sums in float32.

  With `sums`, returns (y, y's (2, F) channel sums and sums of squares), the statistics
  a BatchNorm of y reads (`batch_norm_train`, `batch_moments`), summed as y is written
  instead of in a pass over it. They carry no gradient: the BatchNorm's backward counts
  how its statistics depend on y."""
  return _separable_fwd(x, depthwise, pointwise, strides, dilation, pads, bf16, sums)[0]


def _separable_forward(x, depthwise, pointwise, strides, dilation, pads, prologue=None,
                       bf16=False, sums=False):
  """native.separable_forward on the HWIO kernels."""
  out_hw = _out_hw(x.shape[1:3], depthwise.shape[:2], strides, dilation, pads)
  return native.separable_forward(x, depthwise[:, :, 0, :], pointwise[0, 0], out_hw, strides,
                                  dilation, pads, prologue, bf16, sums)


def _separable_backward(x, depthwise, pointwise, dy, strides, dilation, pads, prologue=None,
                        bf16=False):
  """native.separable_backward on the HWIO kernels: their gradients in HWIO too."""
  dx, ddepthwise, dpointwise, *sums = native.separable_backward(
      x, depthwise[:, :, 0, :], pointwise[0, 0], dy, strides, dilation, pads, prologue, bf16)
  return (dx, ddepthwise.reshape(depthwise.shape), dpointwise.reshape(pointwise.shape),
          *sums)


def _separable_fwd(x, depthwise, pointwise, strides, dilation, pads, bf16, sums):
  out = _separable_forward(x, depthwise, pointwise, strides, dilation, pads, bf16=bf16,
                           sums=sums)
  return out, (x, depthwise, pointwise)


def _separable_bwd(strides, dilation, pads, bf16, sums, residuals, cotangent):
  dy = cotangent[0] if sums else cotangent  # The sums' own is dropped (see `separable`).
  return _separable_backward(*residuals, dy, strides, dilation, pads, bf16=bf16)


separable.defvjp(_separable_fwd, _separable_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def separable_of_normalised(x, shift, scale, bias, depthwise, pointwise, strides, dilation,
                            pads, bf16=False, sums=False):
  """`separable` of relu(scale * (x - shift) + bias), per channel: the previous layer's
  BatchNorm and ReLU applied by the C++ op as it reads x, so their output is never
  written (forward) and their backward comes out of the op's (the ReLU's mask and the
  sums for shift, scale and bias). `sums` as in `separable`."""
  return _separable_of_normalised_fwd(x, shift, scale, bias, depthwise, pointwise, strides,
                                      dilation, pads, bf16, sums)[0]


def _separable_of_normalised_fwd(x, shift, scale, bias, depthwise, pointwise, strides,
                                 dilation, pads, bf16, sums):
  prologue = jnp.stack([shift, scale, bias])
  out = _separable_forward(x, depthwise, pointwise, strides, dilation, pads, prologue, bf16,
                           sums)
  return out, (x, prologue, depthwise, pointwise)


def _separable_of_normalised_bwd(strides, dilation, pads, bf16, sums, residuals, cotangent):
  dy = cotangent[0] if sums else cotangent  # The sums' own is dropped (see `separable`).
  x, prologue, depthwise, pointwise = residuals
  dx, ddepthwise, dpointwise, relu_sums = _separable_backward(
      x, depthwise, pointwise, dy, strides, dilation, pads, prologue, bf16)
  # The ReLU's input gradient g summed, and g * (x - shift) summed, per channel.
  dshift = -prologue[1] * relu_sums[0]
  return dx, dshift, relu_sums[1], relu_sums[0], ddepthwise, dpointwise


separable_of_normalised.defvjp(_separable_of_normalised_fwd, _separable_of_normalised_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x, scale, bias, epsilon: float, use_native: bool = False, sums=None):
  """Training-mode BatchNorm over N, H, W of NHWC `x`: returns (y, mean, var), with the
  batch statistics in float32 and y in x's dtype. The same maths as `nn.BatchNorm`
  (biased variance as E[x^2] - E[x]^2, clipped at 0), with every reduction, forward and
  backward, done by `_sum_over_nhw` (or, with `use_native` and float32 `x`, one C++ pass
  each): XLA's own reductions cost ~45 ms of a ~250 ms s9net step here. `mean` and `var`
  are for the running averages only: no gradient flows through them (their cotangents
  are ignored). `sums`: x's (2, C) channel sums and sums of squares where the op that
  made x gave them (`separable`), read in place of a pass over x; as functions of x,
  they take no gradient of their own."""
  return _batch_norm_fwd(x, scale, bias, epsilon, use_native, sums)[0]


def _pixels(x):
  return x.shape[0] * x.shape[1] * x.shape[2]


def _moments(x, use_native, sums=None):
  count = _pixels(x)
  if sums is not None or (use_native and x.dtype == jnp.float32):
    total, squares = native.channel_sums(x, x) if sums is None else (sums[0], sums[1])
    mean = total / count
    var = jnp.maximum(squares / count - mean * mean, 0.0)
  else:
    mean = _sum_over_nhw(x) / count
    var = jnp.maximum(_sum_over_nhw(x, x) / count - mean * mean, 0.0)
  return mean, var


def _no_cotangent(sums):
  """The cotangent of a `sums` argument, made in the backward: none (see
  `batch_norm_train`)."""
  return None if sums is None else jnp.zeros_like(sums)


def _batch_norm_fwd(x, scale, bias, epsilon, use_native, sums):
  mean, var = _moments(x, use_native, sums)
  inv = lax.rsqrt(var + epsilon)
  y = ((x.astype(jnp.float32) - mean) * (inv * scale) + bias).astype(x.dtype)
  return (y, mean, var), (x, mean, inv, scale, sums)


def _batch_norm_bwd(epsilon, use_native, residuals, cotangents):
  del epsilon
  x, mean, inv, scale, sums = residuals
  dy = cotangents[0]
  count = _pixels(x)
  x_hat = (x.astype(jnp.float32) - mean) * inv
  if use_native and x.dtype == jnp.float32:
    # The mean is subtracted inside the sum, as in x_hat, so nothing cancels.
    dbias, centred = native.channel_sums(x, dy, mean)
    dscale = centred * inv
  else:
    dbias = _sum_over_nhw(dy)
    dscale = _sum_over_nhw(dy, x_hat)
  # d/dx of (x - mean) * inv with mean and inv functions of the batch: the textbook form.
  dx = (scale * inv) * (dy.astype(jnp.float32) - (dbias + x_hat * dscale) / count)
  return (dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype),
          _no_cotangent(sums))


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def batch_moments(x, use_native: bool = False, sums=None):
  """(mean, var) of NHWC `x` over N, H, W in float32, as `batch_norm_train` computes them,
  differentiable: for a BatchNorm whose normalisation is applied elsewhere
  (`separable_of_normalised`), autodiff through these and the op's own gradients gives
  `batch_norm_train`'s backward. `sums` as in `batch_norm_train`."""
  return _moments(x, use_native, sums)


def _batch_moments_fwd(x, use_native, sums):
  mean, var = _moments(x, use_native, sums)
  return (mean, var), (x, mean, sums)


def _batch_moments_bwd(use_native, residuals, cotangents):
  del use_native
  x, mean, sums = residuals
  dmean, dvar = cotangents
  # d var / d x = 2 (x - mean) / count: var's own mean term cancels in the sum.
  dx = (dmean + 2.0 * dvar * (x.astype(jnp.float32) - mean)) / _pixels(x)
  return dx.astype(x.dtype), _no_cotangent(sums)


batch_moments.defvjp(_batch_moments_fwd, _batch_moments_bwd)


def _fmix32(h):
  """murmur3's 32-bit finaliser: a bijection on uint32 in which every input bit flips each
  output bit with probability ~1/2."""
  h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
  h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def dropout_keep_mask(rng, rate: float, shape) -> jax.Array:
  """A Bernoulli(1 - rate) keep mask for dropout, made by hashing each element's index
  (two rounds of `_fmix32`, keyed by two words drawn from `rng`) instead of
  `jax.random.bernoulli`'s threefry.

  Why: XLA:CPU took ~190 ms to draw one 128x34x34x128 mask with threefry, ~3 ms with the
  hash; the seed network's 14 dropout layers were about half its train step. Dropout needs
  independent, evenly spread bits, not a cryptographic stream; the rate is quantised to
  multiples of 2**-32."""
  size = math.prod(shape)
  if size >= 2**32:  # The index would wrap.
    return jax.random.bernoulli(rng, 1.0 - rate, shape)
  keys = jax.random.bits(rng, (2,), jnp.uint32)
  index = lax.iota(jnp.uint32, size).reshape(shape)
  threshold = jnp.uint32(min(round(rate * 2**32), 2**32 - 1))
  return _fmix32(_fmix32(index ^ keys[0]) ^ keys[1]) >= threshold


def fast_conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding,
                              lhs_dilation=None, rhs_dilation=None,
                              dimension_numbers=None, feature_group_count: int = 1,
                              batch_group_count: int = 1, precision=None,
                              preferred_element_type=None, use_native: bool = False,
                              bf16: bool = False):
  """Drop-in for `lax.conv_general_dilated` that is fast on XLA:CPU for the S9 ops;
  `use_native` computes depthwise convs with the C++ kernels (native.py), and `bf16` a
  dense KxK conv there on bfloat16-rounded operands with float32 sums."""
  strides = tuple(window_strides)
  dilation = tuple(rhs_dilation or (1,) * len(strides))
  canonical = functools.partial(
      lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation,
      rhs_dilation, dimension_numbers, feature_group_count, batch_group_count, precision,
      preferred_element_type)

  def xla_conv():  # A conv the fast forms do not compute.
    if bf16:
      raise ValueError("bf16 convs are the C++ kernels' dense KxK convs (float32 NHWC/HWIO, "
                       f"use_native); got lhs {lhs.shape} {lhs.dtype}, rhs {rhs.shape}, "
                       f"{feature_group_count} groups, use_native={use_native}")
    return canonical()

  if (lhs.ndim != 4 or not _is_nhwc_hwio(dimension_numbers)
      or any(d != 1 for d in (lhs_dilation or (1, 1))) or batch_group_count != 1
      or preferred_element_type is not None or precision is not None):
    return xla_conv()

  kh, kw, cin_per_group, cout = rhs.shape
  cin = lhs.shape[3]
  pads = _explicit_padding(padding, lhs.shape[1:3], (kh, kw), strides, dilation)
  if any(p < 0 for pair in pads for p in pair):
    return xla_conv()
  # The C++ kernels take float32 only; other dtypes keep the XLA forms.
  use_native = (use_native and kh * kw <= native.MAX_TAPS
                and lhs.dtype == rhs.dtype == jnp.float32)
  # 1x1 convs stay matmuls, which XLA fuses with their neighbours.
  native_dense = use_native and feature_group_count == 1 and kh * kw > 1
  if bf16 and not native_dense:
    return xla_conv()
  if feature_group_count == cin and cin_per_group == 1 and cout == cin:
    return _depthwise(lhs, rhs, strides, dilation, pads, use_native)
  if feature_group_count == 1:
    return _dense(lhs, rhs, strides, dilation, pads, native_dense, bf16)
  return xla_conv()


def resolve(impl: str) -> str:
  """'auto' means XLA's own convolutions on GPU/TPU; on CPU the C++ kernels where they
  build and the run has one device (the kernels see whole arrays: on a mesh, XLA would
  gather each sharded batch to call them), else the fast XLA forms."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"conv implementation must be one of {IMPLEMENTATIONS}, got {impl!r}")
  on_cpu = jax.default_backend() == "cpu"
  if impl == "auto":
    if not on_cpu:
      return "lax"
    return "native" if jax.device_count() == 1 and native.available() else "fast"
  if impl == "native" and not (on_cpu and native.available()):
    raise ValueError("conv implementation 'native' needs the CPU backend and the C++ kernels, "
                     f"which are unavailable here: {native.unavailable_reason()}")
  return impl


def bilinear_sample(images, rows, cols):
  """`images` (N, H, W, C) sampled at (`rows`, `cols`), each (N, H', W'): bilinear, 0
  outside the image, i.e. `jax.scipy.ndimage.map_coordinates(order=1, mode="constant")`
  per image and channel. Where `resolve("auto")` picks the C++ kernels, one C++ pass
  (XLA:CPU runs map_coordinates as gathers, ~5x slower); no gradient either way is
  needed: it warps the device augmentation's images."""
  if resolve("auto") == "native":
    return native.bilinear_sample(*(a.astype(jnp.float32) for a in (images, rows, cols)))

  def sample(image, rows, cols):
    return jnp.stack([jax.scipy.ndimage.map_coordinates(image[..., k], [rows, cols], order=1,
                                                        mode="constant", cval=0.0)
                      for k in range(image.shape[-1])], axis=-1)

  return jax.vmap(sample)(images, rows, cols)


def describe(impl: str) -> str:
  """What a resolved implementation computes convolutions and BatchNorm with, for the
  line every run prints at its start."""
  return {"lax": "conv lax.conv_general_dilated, BatchNorm flax.linen",
          "fast": "conv XLA-fast forms (taps and matmuls), BatchNorm XLA-fast sums",
          "native": "conv C++ kernels (separable, depthwise, dense 3x3; other 1x1 as "
                    "matmuls), BatchNorm C++ sums"}[impl]


def conv_function(impl: str, bf16: bool = False):
  """The function to pass as `nn.Conv(conv_general_dilated=...)`; `bf16` (the C++
  kernels' dense KxK convs only): on bfloat16-rounded operands with float32 sums."""
  impl = resolve(impl)
  if bf16 and impl != "native":
    raise ValueError(f"bf16 convs need the C++ kernels, not conv implementation {impl!r}")
  if impl == "lax":
    return lax.conv_general_dilated
  return functools.partial(fast_conv_general_dilated, use_native=impl == "native", bf16=bf16)
