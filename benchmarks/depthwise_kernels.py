"""The C++ depthwise kernels alone: median ms of the forward and of the backward (both
gradients) at the networks' shapes, batch 128, on this machine.

    python benchmarks/depthwise_kernels.py [--calls 30]

One line per shape: (N, H, W, C), stride s, dilation d, forward F ms, backward B ms.
Run it from two checkouts in turn to compare kernel versions (docs/performance.md).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from s9jax import host_memory, native  # noqa: E402

# (N, H, W, C), stride, dilation: tiny.py's 32x32 block, its and fast.py's 16x16 and 8x8
# blocks, the dilated strided depthwise of a separable downsampling, the 4x4 block.
SHAPES = [((128, 32, 32, 16), 1, 1), ((128, 16, 16, 32), 1, 1), ((128, 16, 16, 48), 1, 1),
          ((128, 8, 8, 64), 1, 1), ((128, 16, 16, 32), 2, 2), ((128, 4, 4, 96), 1, 1)]


def median_ms(fn, args, calls: int) -> float:
  jax.block_until_ready(fn(*args))  # Compile.
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def start(doc: str) -> argparse.Namespace:
  """The C++ kernel benchmarks' start: malloc settings, `--calls`, and the kernels built
  (or exit saying why not)."""
  host_memory.reuse_freed_memory()  # Before JAX starts its CPU client.
  parser = argparse.ArgumentParser(description=doc.split("\n")[0])
  parser.add_argument("--calls", type=int, default=30)
  args = parser.parse_args()
  if not native.available():
    sys.exit(f"no C++ kernels here: {native.unavailable_reason()}")
  return args


def main():
  args = start(__doc__)
  rng = np.random.default_rng(0)
  for shape, stride, dilation in SHAPES:
    out = (shape[1] - 1) // stride + 1  # 3x3, 'same' padding of `dilation`.
    strides, dilations = (stride, stride), (dilation, dilation)
    pads = ((dilation, dilation), (dilation, dilation))
    x, kernel, dy = (jnp.asarray(rng.normal(size=s).astype(np.float32))
                     for s in (shape, (3, 3, shape[-1]), (shape[0], out, out, shape[-1])))
    forward = jax.jit(lambda x, k: native.depthwise_forward(
        x, k, (out, out), strides, dilations, pads))
    backward = jax.jit(lambda x, k, dy: native.depthwise_backward(
        x, k, dy, strides, dilations, pads))
    print(f"{str(shape):18s} stride {stride} dilation {dilation}: "
          f"forward {median_ms(forward, (x, kernel), args.calls):6.2f} ms, "
          f"backward {median_ms(backward, (x, kernel, dy), args.calls):6.2f} ms", flush=True)


if __name__ == "__main__":
  main()
