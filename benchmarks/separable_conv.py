"""The fused depthwise-separable op (`ops.separable`, one C++ call each way) against the
two convs it replaces (the C++ depthwise kernel, then XLA's 1x1 matmul and its
kernel-gradient dot), and the same op with the BatchNorm (training mode) and ReLU before
it applied apart (`models.BatchNorm`'s op, XLA's ReLU) or as it reads its input
(`ops.separable_of_normalised`, as in the middle of a residual block), and the fused op
with its 1x1 in bfloat16 (`bf16=True`): median ms of the forward, and of forward and
backward (all gradients), at the networks' shapes, batch 128, on this machine.

    python benchmarks/separable_conv.py [--calls 30]

One line per shape: (N, H, W, C) -> F, stride s, dilation d, then `two convs`, `fused`,
`norm apart`, `norm in op` and `fused bf16`, each forward ms / forward+backward ms. All jitted with the
train step's compiler options (`ops.compiler_options`).
"""

from __future__ import annotations

import functools
import pathlib
import sys

import jax
import numpy as np
from jax import lax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.depthwise_kernels import median_ms, start  # noqa: E402
from s9jax import ops  # noqa: E402

# (N, H, W, C), F, stride, dilation: tiny.py's 32x32, 16x16 and 8x8 blocks and its
# separable downsampling, fast.py's 16x16 and 4x4 blocks.
SHAPES = [((128, 32, 32, 16), 16, 1, 1), ((128, 16, 16, 32), 32, 1, 1),
          ((128, 16, 16, 32), 64, 2, 2), ((128, 8, 8, 64), 64, 1, 1),
          ((128, 8, 8, 96), 96, 1, 1), ((128, 16, 16, 48), 48, 1, 1),
          ((128, 4, 4, 160), 160, 1, 1)]
DN = ("NHWC", "HWIO", "NHWC")
EPSILON = 1e-5  # BatchNorm's, as in the networks.


def two_convs(x, depthwise, pointwise, stride, dilation):
  conv = functools.partial(ops.fast_conv_general_dilated, use_native=True,
                           dimension_numbers=DN)
  y = conv(x, depthwise, (stride, stride), ((dilation, dilation),) * 2,
           rhs_dilation=(dilation, dilation), feature_group_count=x.shape[-1])
  return conv(y, pointwise, (1, 1), "VALID")


def fused(x, depthwise, pointwise, stride, dilation):
  return ops.separable(x, depthwise, pointwise, (stride, stride), (dilation, dilation),
                       ((dilation, dilation),) * 2)


def fused_bf16(x, depthwise, pointwise, stride, dilation):
  return ops.separable(x, depthwise, pointwise, (stride, stride), (dilation, dilation),
                       ((dilation, dilation),) * 2, bf16=True)


def norm_apart(x, depthwise, pointwise, scale, bias, stride, dilation):
  y, _, _ = ops.batch_norm_train(x, scale, bias, EPSILON, True)
  return fused(jax.nn.relu(y), depthwise, pointwise, stride, dilation)


def norm_in_op(x, depthwise, pointwise, scale, bias, stride, dilation):
  mean, var = ops.batch_moments(x, True)
  return ops.separable_of_normalised(x, mean, lax.rsqrt(var + EPSILON) * scale, bias,
                                     depthwise, pointwise, (stride, stride),
                                     (dilation, dilation), ((dilation, dilation),) * 2)


def main():
  args = start(__doc__)
  jit = functools.partial(jax.jit, compiler_options=ops.compiler_options("cpu"))
  rng = np.random.default_rng(0)
  for shape, features, stride, dilation in SHAPES:
    c = shape[-1]
    x, depthwise, pointwise = (rng.normal(size=s).astype(np.float32)
                               for s in (shape, (3, 3, 1, c), (1, 1, c, features)))
    scale, bias = rng.uniform(0.5, 2.0, c).astype(np.float32), np.zeros(c, np.float32)
    line = f"{str(shape):18s} -> {features:3d}, stride {stride} dilation {dilation}:"
    for name, op, operands in (("two convs", two_convs, (x, depthwise, pointwise)),
                               ("fused", fused, (x, depthwise, pointwise)),
                               ("norm apart", norm_apart, (x, depthwise, pointwise, scale, bias)),
                               ("norm in op", norm_in_op, (x, depthwise, pointwise, scale, bias)),
                               ("fused bf16", fused_bf16, (x, depthwise, pointwise))):
      forward = functools.partial(op, stride=stride, dilation=dilation)
      dy = np.ones(jax.eval_shape(forward, *operands).shape, np.float32)
      both = jit(lambda dy, *operands, f=forward: jax.vjp(f, *operands)[1](dy))
      line += (f"  {name} {median_ms(jit(forward), operands, args.calls):5.2f}"
               f" / {median_ms(both, (dy, *operands), args.calls):5.2f} ms")
    print(line, flush=True)


if __name__ == "__main__":
  main()
