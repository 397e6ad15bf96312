"""C++ CPU kernels (s9jax/native/kernels.cc) for the ops XLA:CPU runs as many small
memory-bound passes: depthwise convolution and BatchNorm's per-channel sums; dense
3x3 convolutions, which XLA computes through a 9x wider im2col copy; and
depthwise-separable convolutions as one op, whose depthwise output never goes to memory,
optionally with the BatchNorm and ReLU before them (whose output then never does either);
and the device augmentation's bilinear warp, which XLA:CPU runs as gathers.

Compiled with the system C++ compiler the first time they are asked for (a few seconds),
into a cache keyed by the source, the compiler and its flags, jax's version and this CPU,
then registered as XLA FFI targets. Without a compiler, or if the build fails,
`available()` is False, a warning says why, and `conv_impl='auto'` keeps the pure-XLA
forms of ops.py. The source builds for x86-64 and aarch64 (tests/test_native.py
cross-compiles it); the handlers check their operands, so a bad call to the functions
below raises an exception (jax.errors.JaxRuntimeError) instead of reading out of bounds.

Measured on the 2-core dev machine (fast.py's network, batch 128, one process, the two
steps alternated, 4 rounds, code 3132c71): ~1,700 images/s with these kernels (median;
best 1,817) vs ~1,190 with the XLA forms alone (best 1,220).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = pathlib.Path(__file__).with_name("native") / "kernels.cc"
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno"]
# The library is built on (and cached for) the CPU that runs it, so it is tuned for that
# CPU with the first of these the compiler takes: GCC and Clang take -march=native on
# x86-64, some aarch64 compilers only -mcpu=native, and a cross compiler neither (it
# cannot see the target's CPU), which then gets the target's baseline instruction set.
NATIVE_ARCH_FLAGS = ["-march=native", "-mcpu=native"]
TARGETS = {"s9_depthwise_forward": "S9DepthwiseForward",
           "s9_depthwise_backward": "S9DepthwiseBackward",
           "s9_channel_sums": "S9ChannelSums",
           "s9_dense_forward": "S9DenseForward",
           "s9_dense_input_grad": "S9DenseInputGrad",
           "s9_dense_kernel_grad": "S9DenseKernelGrad",
           "s9_separable_forward": "S9SeparableForward",
           "s9_separable_backward": "S9SeparableBackward",
           "s9_bilinear_sample": "S9BilinearSample"}
MAX_TAPS = 16  # kMaxTaps in kernels.cc.

_unavailable_reason = ""
_library = None  # The loaded kernels, once available() has loaded them.


def cache_dir() -> pathlib.Path:
  root = os.environ.get("S9JAX_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "s9jax")
  return pathlib.Path(root)


@functools.cache
def _cpuinfo() -> str:
  """/proc/cpuinfo's text; empty where there is none (macOS, Windows)."""
  try:
    with open("/proc/cpuinfo") as cpuinfo:
      return cpuinfo.read()
  except OSError:
    return ""


def _cpu_signature() -> str:
  """What -march=native depends on: a home directory shared by different CPUs must not
  share one library."""
  lines = [l for l in _cpuinfo().splitlines(keepends=True)
           if l.startswith(("model name", "flags"))][:2]
  return platform.machine() + "".join(lines)


def bf16_products_faster(cpuinfo: str | None = None) -> bool:
  """Whether the kernels' bfloat16 products (their `bf16`) run faster than their float32
  ones on this CPU (`cpuinfo`: /proc/cpuinfo's text, read if None), which is what
  `model.pointwise_bf16 = 'auto'` asks. Measured: on an AMD EPYC (Zen 4) one AVX512-BF16
  instruction does twice an FMA's products, and fast.py's 1x1s ran 1.6-1.9x; on an Intel
  Xeon with AVX512-BF16 (and AMX), fast.py's whole step ran 0.8-0.9x its float32 one;
  without AVX512-BF16 the kernels round the operands, then multiply in float32. So: an
  AMD CPU with AVX512-BF16; elsewhere (macOS and Windows included) float32 is the faster,
  except where the kernels compute them on AMX tiles (`bf16_on_amx`)."""
  first_cpu = (_cpuinfo() if cpuinfo is None else cpuinfo).split("\n\n", 1)[0]
  fields = {key.strip(): value.split() for key, _, value in
            (line.partition(":") for line in first_cpu.splitlines())}
  return fields.get("vendor_id") == ["AuthenticAMD"] and "avx512_bf16" in fields.get("flags", [])


def find_compiler() -> str | None:
  """$CXX, else g++ or c++ on the PATH; None if there is none."""
  return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@functools.cache
def arch_flags(compiler: str) -> tuple[str, ...]:
  """The first of NATIVE_ARCH_FLAGS that `compiler` takes, found by compiling an empty
  file with each (-Werror: Clang only warns about a flag it ignores), or none."""
  with tempfile.TemporaryDirectory() as tmp:
    probe = os.path.join(tmp, "probe.o")
    for flag in NATIVE_ARCH_FLAGS:
      try:
        result = subprocess.run([compiler, flag, "-Werror", "-x", "c++", "-c", "-", "-o", probe],
                                input="", capture_output=True, text=True, timeout=60)
      except (OSError, subprocess.SubprocessError):
        return ()  # No such compiler: build() reports that when it runs it.
      if result.returncode == 0:
        return (flag,)
  return ()


def compile_command(compiler: str, output) -> list[str]:
  """The command line that compiles kernels.cc with `compiler` into the shared library
  `output`: build() runs it, and tests run it with a cross compiler."""
  return [compiler, *FLAGS, *arch_flags(compiler), f"-I{jax.ffi.include_dir()}",
          str(SOURCE), "-o", str(output)]


def library_path(compiler: str) -> pathlib.Path:
  """Where build() caches the library: keyed by the source, the whole command line (the
  compiler, the flags it takes), jax's FFI headers, jax's version and this CPU. The
  headers by their contents, not the -I path to them: each new virtual environment
  (every CI run makes one) would otherwise rebuild the same library (~33 s)."""
  include_dir = jax.ffi.include_dir()
  command = [arg for arg in compile_command(compiler, "") if arg != f"-I{include_dir}"]
  headers = sorted(pathlib.Path(include_dir).rglob("*.h"))
  key = hashlib.sha256("\0".join([
      SOURCE.read_text(), *command, *(h.read_text() for h in headers), jax.__version__,
      _cpu_signature(),
  ]).encode()).hexdigest()[:16]
  return cache_dir() / f"s9jax_kernels_{key}.so"


def build() -> pathlib.Path:
  """The compiled library's path, compiling it first if this machine has none yet."""
  compiler = find_compiler()
  if compiler is None:
    raise RuntimeError("no C++ compiler found (install g++ or set CXX)")
  library = library_path(compiler)
  if library.exists():
    return library
  library.parent.mkdir(parents=True, exist_ok=True)
  # Built beside its final name and renamed into place, so concurrent first runs (test
  # workers, hosts sharing a home directory) never load a half-written library.
  with tempfile.NamedTemporaryFile(dir=library.parent, suffix=".so", delete=False) as tmp:
    partial = pathlib.Path(tmp.name)
  try:
    result = subprocess.run(compile_command(compiler, partial), capture_output=True, text=True)
    if result.returncode != 0:
      errors = [l for l in result.stderr.splitlines() if "error" in l] or [result.stderr]
      raise RuntimeError(f"{compiler} failed on {SOURCE.name}: " + "\n".join(errors[:5]))
    os.replace(partial, library)
  finally:
    partial.unlink(missing_ok=True)
  return library


@functools.cache
def available() -> bool:
  """Builds (once per machine), loads and registers the kernels; False if that fails."""
  global _unavailable_reason, _library
  if os.environ.get("S9JAX_NATIVE", "1") == "0":
    _unavailable_reason = "turned off by S9JAX_NATIVE=0"
    return False
  try:
    library = _library = ctypes.CDLL(str(build()))
    for target, symbol in TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                  platform="cpu")
  except Exception as error:  # A missing compiler must not stop training: XLA forms remain.
    _unavailable_reason = str(error)
    warnings.warn(f"s9jax's C++ CPU kernels are unavailable, using the XLA forms: {error}")
    return False
  return True


@functools.cache
def bf16_on_amx() -> bool:
  """Whether the kernels compute their bfloat16 products (the separable ops' 1x1s and
  the dense convs) on AMX tiles (Intel Sapphire Rapids and later, on Linux, with a
  compiler that targets them): on a 2-core Xeon whose AVX512-BF16 products alone ran
  fast.py's step 0.80-0.94x its float32 one, the tiles ran it faster (docs/benchmarks.md,
  "fast.py on an Intel Xeon")."""
  return available() and bool(_library.S9Bf16OnAmx())


def unavailable_reason() -> str:
  return _unavailable_reason if not available() else ""


def _conv_attrs(strides, dilation, pads):
  # The high padding only lets the handlers check the output size against the rest.
  return {name: np.int64(value) for name, value in zip(
      ("sh", "sw", "dh", "dw", "ph", "pw", "ph_hi", "pw_hi"),
      (*strides, *dilation, pads[0][0], pads[1][0], pads[0][1], pads[1][1]))}


# The result shapes below read operands' dimensions from the end (shape[-1], not
# shape[3]), so an operand of the wrong rank reaches the handler, whose error says what
# was expected, rather than failing here with an IndexError.


def depthwise_forward(x, w, out_hw, strides, dilation, pads):
  """x (N, H, W, C), w (KH, KW, C) -> y (N, OH, OW, C)."""
  out = jax.ShapeDtypeStruct((x.shape[0], *out_hw, x.shape[-1]), jnp.float32)
  return jax.ffi.ffi_call("s9_depthwise_forward", out)(
      x, w, **_conv_attrs(strides, dilation, pads))


def depthwise_backward(x, w, dy, strides, dilation, pads):
  """The gradients (dx, dw) of `depthwise_forward` for output gradient dy."""
  out = (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct(w.shape, jnp.float32))
  return jax.ffi.ffi_call("s9_depthwise_backward", out)(
      x, w, dy, **_conv_attrs(strides, dilation, pads))


def dense_forward(x, w, out_hw, strides, dilation, pads, bf16=False):
  """x (N, H, W, CIN), w (KH, KW, CIN, COUT) -> y (N, OH, OW, COUT). `bf16`: x and w
  rounded to bfloat16, the sums in float32 (kernels.cc), and so the two gradients."""
  out = jax.ShapeDtypeStruct((x.shape[0], *out_hw, w.shape[-1]), jnp.float32)
  return jax.ffi.ffi_call("s9_dense_forward", out)(
      x, w, **_conv_attrs(strides, dilation, pads), bf16=np.int64(bf16))


def dense_input_grad(dy, w, in_hw, strides, dilation, pads, bf16=False):
  """The gradient of `dense_forward` with respect to x (N, *in_hw, CIN), for dy."""
  out = jax.ShapeDtypeStruct((dy.shape[0], *in_hw, w.shape[-2]), jnp.float32)
  return jax.ffi.ffi_call("s9_dense_input_grad", out)(
      dy, w, **_conv_attrs(strides, dilation, pads), bf16=np.int64(bf16))


def dense_kernel_grad(x, dy, kernel_hw, strides, dilation, pads, bf16=False):
  """The gradient of `dense_forward` with respect to w (*kernel_hw, CIN, COUT), for dy."""
  out = jax.ShapeDtypeStruct((*kernel_hw, x.shape[-1], dy.shape[-1]), jnp.float32)
  return jax.ffi.ffi_call("s9_dense_kernel_grad", out)(
      x, dy, **_conv_attrs(strides, dilation, pads), bf16=np.int64(bf16))


def _no_prologue(x):
  return jnp.zeros((0, x.shape[-1]), jnp.float32)


def separable_forward(x, depthwise, pointwise, out_hw, strides, dilation, pads, prologue=None,
                      bf16=False, sums=False):
  """x (N, H, W, C), depthwise (KH, KW, C), pointwise (C, F) -> y (N, OH, OW, F): the
  depthwise conv, then the 1x1, without writing the depthwise output to memory. With
  `prologue` (3, C), rows shift, scale, bias, the convs read relu(scale * (x - shift) +
  bias) in place of x, computed image by image and never written. `bf16`: the 1x1's
  operands rounded to bfloat16, its sums in float32 (kernels.cc). With `sums`, returns
  (y, (2, F) sums): `channel_sums(y, y)` stacked, summed as each image of y is written."""
  prologue = _no_prologue(x) if prologue is None else prologue
  features = pointwise.shape[-1]
  out = (jax.ShapeDtypeStruct((x.shape[0], *out_hw, features), jnp.float32),
         jax.ShapeDtypeStruct((2 if sums else 0, features), jnp.float32))
  y, y_sums = jax.ffi.ffi_call("s9_separable_forward", out)(
      x, prologue, depthwise, pointwise, **_conv_attrs(strides, dilation, pads),
      bf16=np.int64(bf16))
  return (y, y_sums) if sums else y


def separable_backward(x, depthwise, pointwise, dy, strides, dilation, pads, prologue=None,
                       bf16=False):
  """The gradients (dx, ddepthwise, dpointwise) of `separable_forward` for dy; with a
  `prologue`, (dx, ddepthwise, dpointwise, sums), sums (2, C) being the sum of the ReLU's
  output gradient and of its product with (x - shift), per channel. `bf16`: the 1x1's
  gradients from bfloat16-rounded operands, as its forward."""
  normalise = prologue is not None
  prologue = prologue if normalise else _no_prologue(x)
  shapes = (x.shape, (2 if normalise else 0, x.shape[-1]), depthwise.shape, pointwise.shape)
  out = tuple(jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes)
  dx, sums, ddepthwise, dpointwise = jax.ffi.ffi_call("s9_separable_backward", out)(
      x, prologue, depthwise, pointwise, dy, **_conv_attrs(strides, dilation, pads),
      bf16=np.int64(bf16))
  return (dx, ddepthwise, dpointwise, sums) if normalise else (dx, ddepthwise, dpointwise)


def channel_sums(a, b, shift=None):
  """(sum of b, sum of (a - shift) * b) over N, H, W, per channel, each (C,)."""
  out = jax.ShapeDtypeStruct((2, a.shape[-1]), jnp.float32)
  shift = jnp.zeros((a.shape[-1],), jnp.float32) if shift is None else shift
  sums = jax.ffi.ffi_call("s9_channel_sums", out)(a, b, shift)
  return sums[0], sums[1]


def bilinear_sample(x, rows, cols):
  """x (N, H, W, C) float32 sampled at (rows, cols), each (N, H', W'), bilinear with 0
  outside: `jax.scipy.ndimage.map_coordinates(order=1)` per image and channel. No
  gradient (it serves the augmentation)."""
  out = jax.ShapeDtypeStruct(rows.shape + x.shape[-1:], jnp.float32)
  return jax.ffi.ffi_call("s9_bilinear_sample", out)(x, rows, cols)
