"""The C++ dense 3x3 conv kernels in float32 and with bfloat16 operands (`bf16=True`,
`model.dense_bf16`): median ms of the forward, the input gradient and the kernel
gradient, each its own call as in the train step, at the networks' shapes, batch 128, on
this machine.

    python benchmarks/dense_conv.py [--calls 30]

One line per shape: (N, H, W, CIN) -> COUT, stride s, dilation d, then `float32` and
`bf16`, each forward / input gradient / kernel gradient ms. Without AVX512-BF16 the bf16
column computes the same rounded products with the float32 kernels (no faster); with AMX
tiles (`native.bf16_on_amx()`) it computes them there, but for a strided input gradient.
"""

from __future__ import annotations

import functools
import pathlib
import sys

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.depthwise_kernels import median_ms, start  # noqa: E402
from s9jax import native, ops  # noqa: E402

# (N, H, W, CIN), COUT, stride, dilation: fast.py's Conv_1 at 32 and 24 px (16x16 and
# 12x12 maps), base.py's strided dilated Conv_1, and tiny.py's first strided conv.
SHAPES = [((128, 16, 16, 24), 48, 1, 1), ((128, 12, 12, 24), 48, 1, 1),
          ((128, 32, 32, 24), 48, 2, 2), ((128, 32, 32, 16), 32, 2, 2)]


def main():
  args = start(__doc__)
  jit = functools.partial(jax.jit, compiler_options=ops.compiler_options("cpu"))
  rng = np.random.default_rng(0)
  for shape, features, stride, dilation in SHAPES:
    x = rng.normal(size=shape).astype(np.float32)
    kernel = rng.normal(size=(3, 3, shape[-1], features)).astype(np.float32)
    geometry = ((stride, stride), (dilation, dilation), ((dilation, dilation),) * 2)
    out_hw = ops._out_hw(shape[1:3], (3, 3), *geometry)
    dy = rng.normal(size=(shape[0], *out_hw, features)).astype(np.float32)
    line = f"{str(shape):18s} -> {features:3d}, stride {stride} dilation {dilation}:"
    for name, bf16 in (("float32", False), ("bf16", True)):
      calls = (
          (jit(lambda x, k: native.dense_forward(x, k, out_hw, *geometry, bf16)), (x, kernel)),
          (jit(lambda dy, k: native.dense_input_grad(dy, k, shape[1:3], *geometry, bf16)),
           (dy, kernel)),
          (jit(lambda x, dy: native.dense_kernel_grad(x, dy, (3, 3), *geometry, bf16)),
           (x, dy)))
      line += f"  {name} " + " / ".join(f"{median_ms(fn, operands, args.calls):5.2f}"
                                         for fn, operands in calls) + " ms"
    print(line, flush=True)


if __name__ == "__main__":
  main()
