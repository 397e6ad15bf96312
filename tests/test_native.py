"""The C++ kernels' defences and portability: every FFI handler answers operands and
attributes that disagree with an InvalidArgument error, which Python raises as an
exception, eagerly and under jit, instead of reading or writing out of bounds; the build
tunes for the CPU only with a flag the compiler takes; and kernels.cc cross-compiles for
aarch64 with native.py's own command line."""

import functools
import platform
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from s9jax import native, ops
from tests.test_ops import map_coordinates_per_channel
from tests.test_ops import native_kernels  # noqa: F401  The `native` marker's fixture.

NATIVE = pytest.mark.native
ONE, SAME = (1, 1), ((1, 1), (1, 1))
X, DW, W, Y = (2, 9, 9, 8), (3, 3, 8), (3, 3, 8, 12), (2, 9, 9, 12)
PW = (8, 12)  # A 1x1 kernel as the separable op takes it: (C, F).


def _args_last(fn, *static):
  """fn(*arrays, *static): one of native.py's conv functions (arrays first, then the
  shapes and attributes) with the latter bound."""
  return lambda *arrays: fn(*arrays, *static)


def depthwise_forward(out_hw=(9, 9), strides=ONE, dilation=ONE, pads=SAME):
  return _args_last(native.depthwise_forward, out_hw, strides, dilation, pads)


def depthwise_backward(strides=ONE, dilation=ONE, pads=SAME):
  return _args_last(native.depthwise_backward, strides, dilation, pads)


def dense_forward(out_hw=(9, 9), strides=ONE, dilation=ONE, pads=SAME):
  return _args_last(native.dense_forward, out_hw, strides, dilation, pads)


def dense_input_grad(in_hw=(9, 9), strides=ONE, dilation=ONE, pads=SAME):
  return _args_last(native.dense_input_grad, in_hw, strides, dilation, pads)


def dense_kernel_grad(kernel_hw=(3, 3), strides=ONE, dilation=ONE, pads=SAME):
  return _args_last(native.dense_kernel_grad, kernel_hw, strides, dilation, pads)


def separable_forward(out_hw=(9, 9), strides=ONE, dilation=ONE, pads=SAME,
                      with_prologue=False):
  """With `with_prologue`, the prologue is the second operand, after x."""
  if with_prologue:
    return lambda x, prologue, *rest: native.separable_forward(
        x, *rest, out_hw, strides, dilation, pads, prologue)
  return _args_last(native.separable_forward, out_hw, strides, dilation, pads)


def separable_backward(strides=ONE, dilation=ONE, pads=SAME, with_prologue=False):
  if with_prologue:
    return lambda x, prologue, *rest: native.separable_backward(
        x, *rest, strides, dilation, pads, prologue)
  return _args_last(native.separable_backward, strides, dilation, pads)


def raw(target, *result_shapes, conv_attrs=True):
  """The FFI target called with result buffers of the given shapes: native.py's
  functions always derive those from the operands, so only this reaches the handlers'
  checks of their results."""
  results = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in result_shapes]
  attrs = native._conv_attrs(ONE, ONE, SAME) if conv_attrs else {}
  if target.startswith(("s9_separable", "s9_dense")):
    attrs["bf16"] = np.int64(0)
  return lambda *operands: jax.ffi.ffi_call(
      target, results if len(results) > 1 else results[0])(*operands, **attrs)


# id: (call, operand shapes, the error it must raise). Every handler, every kind of check.
BAD_CALLS = {
    # Ranks.
    "depthwise-x-rank-3": (depthwise_forward(), [(9, 9, 8), DW],
                           r"s9_depthwise_forward: x must have rank 4 \(N, H, W, C\), "
                           r"got shape \(9, 9, 8\)"),
    "depthwise-hwio-kernel": (depthwise_forward(), [X, (3, 3, 1, 8)],
                              r"kernel must have rank 3 \(KH, KW, C\), got shape \(3, 3, 1, 8\)"),
    "depthwise-backward-dy-rank-3": (depthwise_backward(), [X, DW, (9, 9, 8)],
                                     r"s9_depthwise_backward: dy must have rank 4"),
    "dense-x-rank-3": (dense_forward(), [(9, 9, 8), W], r"s9_dense_forward: x must have rank 4"),
    "dense-kernel-rank-3": (dense_forward(), [X, (3, 3, 8)],
                            r"kernel must have rank 4 \(KH, KW, CIN, COUT\)"),
    "dense-input-grad-dy-rank-3": (dense_input_grad(), [(9, 9, 12), W],
                                   r"s9_dense_input_grad: dy must have rank 4"),
    "dense-kernel-grad-x-rank-5": (dense_kernel_grad(), [(1, *X), Y],
                                   r"s9_dense_kernel_grad: x must have rank 4"),
    "channel-sums-rank-3": (native.channel_sums, [(9, 9, 8), (9, 9, 8)],
                            r"s9_channel_sums: a must have rank 4"),
    "separable-pointwise-rank-4": (separable_forward(), [X, DW, (1, 1, 8, 12)],
                                   r"s9_separable_forward: pointwise kernel must have rank 2 "
                                   r"\(C, F\), got shape \(1, 1, 8, 12\)"),
    "separable-backward-dy-rank-3": (separable_backward(), [X, DW, PW, (9, 9, 12)],
                                     r"s9_separable_backward: dy must have rank 4"),
    "separable-prologue-rows": (separable_forward(with_prologue=True), [X, (2, 8), DW, PW],
                                r"s9_separable_forward: prologue must have shape \(3, 8\) or "
                                r"\(0, 8\), got \(2, 8\)"),
    "separable-backward-prologue-channels": (
        separable_backward(with_prologue=True), [X, (3, 4), DW, PW, Y],
        r"s9_separable_backward: prologue must have shape \(3, 8\) or \(0, 8\), got \(3, 4\)"),
    # Batch and channel counts.
    "separable-depthwise-channels": (separable_forward(), [X, (3, 3, 4), PW],
                                     r"depthwise kernel channels \(4\) must equal x "
                                     r"channels \(8\)"),
    "separable-pointwise-inputs": (separable_forward(), [X, DW, (6, 12)],
                                   r"pointwise kernel input channels \(6\) must equal x "
                                   r"channels \(8\)"),
    "separable-backward-dy-batch": (separable_backward(), [X, DW, PW, (3, 9, 9, 12)],
                                    r"dy batch \(3\) must equal x batch \(2\)"),
    "separable-backward-dy-channels": (separable_backward(), [X, DW, PW, (2, 9, 9, 8)],
                                       r"output channels \(8\) must equal pointwise kernel "
                                       r"output channels \(12\)"),
    "depthwise-kernel-channels": (depthwise_forward(), [X, (3, 3, 4)],
                                  r"kernel channels \(4\) must equal x channels \(8\)"),
    "depthwise-backward-dy-batch": (depthwise_backward(), [X, DW, (3, 9, 9, 8)],
                                    r"dy batch \(3\) must equal x batch \(2\)"),
    "depthwise-backward-dy-channels": (depthwise_backward(), [X, DW, (2, 9, 9, 4)],
                                       r"dy channels \(4\) must equal x channels \(8\)"),
    "dense-kernel-input-channels": (dense_forward(), [X, (3, 3, 6, 12)],
                                    r"kernel input channels \(6\) must equal x channels \(8\)"),
    "dense-input-grad-kernel-outputs": (dense_input_grad(), [Y, (3, 3, 8, 6)],
                                        r"kernel output channels \(6\) must equal dy "
                                        r"channels \(12\)"),
    "dense-kernel-grad-dy-batch": (dense_kernel_grad(), [X, (3, 9, 9, 12)],
                                   r"dy batch \(3\) must equal x batch \(2\)"),
    "channel-sums-b-shape": (native.channel_sums, [X, (2, 9, 9, 4)],
                             r"b must have a's shape \(2, 9, 9, 8\), got \(2, 9, 9, 4\)"),
    "channel-sums-shift-size": (native.channel_sums, [X, X, (4,)],
                                r"shift size \(4\) must equal a channels \(8\)"),
    # Result buffers.
    "depthwise-y-channels": (raw("s9_depthwise_forward", (2, 9, 9, 4)), [X, DW],
                             r"y channels \(4\) must equal x channels \(8\)"),
    "depthwise-backward-dx-shape": (raw("s9_depthwise_backward", (2, 9, 8, 8), DW), [X, DW, X],
                                    r"dx must have x's shape \(2, 9, 9, 8\), got \(2, 9, 8, 8\)"),
    "depthwise-backward-dkernel-shape": (raw("s9_depthwise_backward", X, (3, 3, 9)), [X, DW, X],
                                         r"dkernel must have kernel's shape \(3, 3, 8\)"),
    "dense-y-batch": (raw("s9_dense_forward", (4, 9, 9, 12)), [X, W],
                      r"y batch \(4\) must equal x batch \(2\)"),
    "dense-kernel-grad-result-channels": (raw("s9_dense_kernel_grad", (3, 3, 8, 5)), [X, Y],
                                          r"dkernel output channels \(5\) must equal dy "
                                          r"channels \(12\)"),
    "channel-sums-result": (raw("s9_channel_sums", (3, 8), conv_attrs=False), [X, X, (8,)],
                            r"the result must have shape \(2, C\) = \(2, 8\), got \(3, 8\)"),
    "separable-sums-shape": (raw("s9_separable_forward", Y, (2, 8)), [X, (0, 8), DW, PW],
                             r"s9_separable_forward: sums must have shape \(2, 12\) or "
                             r"\(0, 12\), got \(2, 8\)"),
    "separable-backward-dpointwise-shape": (
        raw("s9_separable_backward", X, (0, 8), DW, (12, 8)), [X, (0, 8), DW, PW, Y],
        r"dpointwise must have pointwise's shape \(8, 12\), got \(12, 8\)"),
    "separable-backward-dprologue-shape": (
        raw("s9_separable_backward", X, (2, 4), DW, PW), [X, (3, 8), DW, PW, Y],
        r"dprologue must have shape \(2, 8\), got \(2, 4\)"),
    # Output sizes against the input, stride, dilation and padding.
    "separable-out-hw": (separable_forward(out_hw=(9, 4)), [X, DW, PW],
                         r"s9_separable_forward: output width 4 does not follow"),
    "separable-backward-dy-size": (separable_backward(strides=(2, 2)), [X, DW, PW, Y],
                                   r"s9_separable_backward: output height 9 does not follow "
                                   r".* expected 5"),
    "depthwise-out-hw": (depthwise_forward(out_hw=(5, 9)), [X, DW],
                         r"output height 5 does not follow from input height 9, kernel 3, "
                         r"stride 1, dilation 1 and padding \(1, 1\): expected 9"),
    "depthwise-backward-dy-size": (depthwise_backward(strides=(2, 2)), [X, DW, X],
                                   r"output height 9 does not follow .* expected 5"),
    "dense-out-hw": (dense_forward(out_hw=(9, 10)), [X, W], r"output width 10 does not follow"),
    "dense-input-grad-in-hw": (dense_input_grad(in_hw=(20, 9)), [Y, W],
                               r"output height 9 does not follow from input height 20"),
    # Tap count: a 5x5 kernel dilated by 2 (a 9x9 window) has 25 > MAX_TAPS taps.
    "depthwise-5x5-dilated": (depthwise_forward(dilation=(2, 2), pads=((4, 4), (4, 4))),
                              [X, (5, 5, 8)], r"a 5x5 kernel: the kernels take 1 to 16 taps"),
    "depthwise-backward-1x17": (depthwise_backward(pads=((0, 0), (8, 8))), [X, (1, 17, 8), X],
                                r"a 1x17 kernel: the kernels take 1 to 16 taps"),
    "dense-5x5-dilated": (dense_forward(dilation=(2, 2), pads=((4, 4), (4, 4))),
                          [X, (5, 5, 8, 12)], r"a 5x5 kernel"),
    "dense-input-grad-5x5": (dense_input_grad(pads=((2, 2), (2, 2))), [Y, (5, 5, 8, 12)],
                             r"s9_dense_input_grad: a 5x5 kernel"),
    "dense-kernel-grad-5x5-dilated": (dense_kernel_grad((5, 5), dilation=(2, 2),
                                                        pads=((4, 4), (4, 4))), [X, Y],
                                      r"s9_dense_kernel_grad: a 5x5 kernel"),
    # Attributes.
    "zero-stride": (depthwise_forward(strides=(0, 1)), [X, DW],
                    r"strides must be positive, got \(0, 1\)"),
    "negative-dilation": (dense_forward(dilation=(1, -1)), [X, W],
                          r"dilations must be positive, got \(1, -1\)"),
    "negative-padding": (dense_kernel_grad(pads=((1, 1), (-1, 3))), [X, Y],
                         r"padding must be non-negative, got \(\(1, 1\), \(-1, 3\)\)"),
    "overflowing-padding": (depthwise_forward(pads=((2**62, 2**62), (1, 1))), [X, DW],
                            r"overflows int64"),
    # The augmentation's sampler.
    "bilinear-rows-rank-4": (native.bilinear_sample, [X, (2, 9, 9, 1), (2, 9, 9, 1)],
                             r"s9_bilinear_sample: rows must have rank 3 \(N, H, W\)"),
    "bilinear-cols-shape": (native.bilinear_sample, [X, (2, 9, 9), (2, 9, 8)],
                            r"cols must have rows's shape \(2, 9, 9\), got \(2, 9, 8\)"),
    "bilinear-batch": (native.bilinear_sample, [X, (3, 9, 9), (3, 9, 9)],
                       r"rows batch \(3\) must equal x batch \(2\)"),
    "bilinear-y-shape": (raw("s9_bilinear_sample", (2, 9, 9, 4), conv_attrs=False),
                         [X, (2, 9, 9), (2, 9, 9)],
                         r"y must have shape \(2, 9, 9, 8\), got \(2, 9, 9, 4\)"),
}


@NATIVE
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_calls_raise_not_crash(case, jit):
  call, shapes, message = BAD_CALLS[case]
  operands = [jnp.ones(shape, jnp.float32) for shape in shapes]
  with pytest.raises(jax.errors.JaxRuntimeError, match=message) as raised:
    jax.block_until_ready((jax.jit(call) if jit else call)(*operands))
  assert "INVALID_ARGUMENT" in str(raised.value)


@NATIVE
@pytest.mark.parametrize("kernel_hw,pads", [
    ((4, 4), ((1, 2), (2, 1))),  # MAX_TAPS taps: the limit is inclusive.
    ((3, 3), ((0, 1), (2, 0))),  # Padding lax allows, but 'SAME' never gives.
])
def test_valid_edge_calls_still_compute(kernel_hw, pads):
  """After the errors above (same process), calls at the checks' edges: the largest
  kernel and asymmetric padding, through ops.py, equal lax, gradients too."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 10, 8))
  for groups, w_shape in ((8, (*kernel_hw, 1, 8)), (1, (*kernel_hw, 8, 12))):
    w = jax.random.normal(jax.random.PRNGKey(1), w_shape)

    def f(fn, x, w):
      return fn(x, w, (1, 2), pads, None, (1, 1), ("NHWC", "HWIO", "NHWC"), groups)
    native_conv = functools.partial(ops.fast_conv_general_dilated, use_native=True)
    y_lax, vjp_lax = jax.vjp(functools.partial(f, lax.conv_general_dilated), x, w)
    y_native, vjp_native = jax.vjp(functools.partial(f, native_conv), x, w)
    np.testing.assert_allclose(y_native, y_lax, rtol=1e-4, atol=1e-4)
    dy = jax.random.normal(jax.random.PRNGKey(2), y_lax.shape)
    for got, want in zip(vjp_native(dy), vjp_lax(dy)):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def fake_compiler(tmp_path, rejects):
  """A 'compiler' that fails on the flags in `rejects` and succeeds otherwise."""
  pattern = "|".join(rejects) or "never-rejects"
  script = tmp_path / "fake-c++"
  script.write_text(f'#!/bin/sh\nfor arg in "$@"; do case "$arg" in {pattern}) '
                    'echo "error: unknown value for $arg" >&2; exit 1;; esac; done\n')
  script.chmod(0o755)
  return str(script)


@pytest.mark.parametrize("rejects,tuning", [
    ((), ["-march=native"]),                          # GCC or Clang on x86-64.
    (("-march=native",), ["-mcpu=native"]),           # An aarch64 compiler that takes only -mcpu.
    (("-march=native", "-mcpu=native"), []),          # A cross compiler.
])
def test_native_tuning_only_where_the_compiler_takes_it(tmp_path, monkeypatch, rejects, tuning):
  compiler = fake_compiler(tmp_path, rejects)
  command = native.compile_command(compiler, tmp_path / "kernels.so")
  assert [flag for flag in command if flag.endswith("=native")] == tuning
  assert command[0] == compiler and command[-2:] == ["-o", str(tmp_path / "kernels.so")]
  # The cache key is the command actually used: another flag, another library.
  library = native.library_path(compiler)
  monkeypatch.setattr(native, "arch_flags", lambda compiler: ("-mcpu=other",))
  assert native.library_path(compiler) != library


def test_library_is_keyed_by_the_headers_contents_not_their_path(tmp_path, monkeypatch):
  # Every new virtual environment has its own jaxlib/include: the same headers must not
  # build a second library, other headers must.
  compiler = fake_compiler(tmp_path, ())
  library = native.library_path(compiler)
  copy = tmp_path / "venv2" / "include"
  shutil.copytree(jax.ffi.include_dir(), copy)
  monkeypatch.setattr(jax.ffi, "include_dir", lambda: str(copy))
  assert f"-I{copy}" in native.compile_command(compiler, "")
  assert native.library_path(compiler) == library
  header = next(copy.rglob("ffi.h"))
  header.write_text(header.read_text() + "\n// another jaxlib\n")
  assert native.library_path(compiler) != library


def _cpuinfo(vendor, flags):
  cpu = f"processor\t: {{}}\nvendor_id\t: {vendor}\nmodel name\t: A CPU\nflags\t\t: {flags}\n"
  return "\n".join(cpu.format(k) for k in range(2))


@pytest.mark.parametrize("cpuinfo,faster", [
    (_cpuinfo("AuthenticAMD", "fpu avx512f avx512_bf16 avx512_vnni"), True),
    # Measured 0.8-0.9x float32's step on an Intel Xeon with AVX512-BF16 and AMX.
    (_cpuinfo("GenuineIntel", "fpu avx512f avx512_bf16 amx_bf16"), False),
    (_cpuinfo("AuthenticAMD", "fpu avx2 avx512f avx512_vnni"), False),  # Rounds, then float32.
    ("processor\t: 0\nvendor_id\t: AuthenticAMD\n", False),
    ("", False),
])
def test_bf16_products_are_faster_on_amd_cpus_with_avx512_bf16(cpuinfo, faster):
  assert native.bf16_products_faster(cpuinfo) is faster


@NATIVE
def test_bf16_on_amx_only_where_the_cpu_has_the_tiles():
  # The library's answer, from the kernels it built: never tiles on a CPU without them
  # (there, and on this machine too, tests/test_ops.py's bf16 tests check the products).
  try:
    flags = open("/proc/cpuinfo").read()
  except OSError:
    flags = ""
  assert native.bf16_on_amx() in (True, False)
  if "amx_bf16" not in flags:
    assert not native.bf16_on_amx()


def test_host_gcc_on_x86_64_tunes_with_march_native():
  compiler = shutil.which("g++")
  if compiler is None or platform.machine() != "x86_64":
    pytest.skip("needs g++ on an x86-64 host")
  assert native.arch_flags(compiler) == ("-march=native",)


AARCH64_CXX = "aarch64-linux-gnu-g++"


def test_kernels_cross_compile_for_aarch64(tmp_path):
  """kernels.cc has no x86-only code: native.py's command line, with Debian's aarch64
  cross compiler, builds the library for aarch64 with all six FFI handlers.

  At -O0 in place of native.py's -O3: the same source, headers and target, so the same
  compile and link errors, in ~4 s instead of ~33 (the suite's slowest single test)."""
  compiler = shutil.which(AARCH64_CXX)
  if compiler is None:
    pytest.skip(f"no {AARCH64_CXX} (Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu)")
  library = tmp_path / "s9jax_kernels_aarch64.so"
  command = native.compile_command(compiler, library)
  # The cross compiler cannot see an aarch64 CPU to tune for: no -march/-mcpu=native.
  assert not any(flag.endswith("=native") for flag in command)
  assert command.count("-O3") == 1
  command[command.index("-O3")] = "-O0"
  result = subprocess.run(command, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr[-4000:]}"
  elf = library.read_bytes()
  # ELF, 64-bit, little-endian, machine EM_AARCH64 (183).
  assert elf[:4] == b"\x7fELF" and elf[4] == 2 and elf[5] == 1
  assert int.from_bytes(elf[18:20], "little") == 183
  for symbol in native.TARGETS.values():
    assert symbol.encode() + b"\0" in elf  # The dynamic symbol table's names.


@NATIVE
@pytest.mark.parametrize("shape,out_hw", [((3, 9, 7, 3), (6, 8)), ((2, 5, 5, 1), (5, 5))])
def test_bilinear_sample_is_map_coordinates(shape, out_hw):
  """The augmentation's C++ sampler against map_coordinates: coordinates inside, on the
  edges and outside, integer ones, output sizes other than the input's."""
  n, h, w, c = shape
  rng = np.random.default_rng(0)
  x = rng.normal(size=shape).astype(np.float32) * 100
  rows = rng.uniform(-2, h + 1, (n, *out_hw)).astype(np.float32)
  cols = rng.uniform(-2, w + 1, (n, *out_hw)).astype(np.float32)
  # Exact pixels, the far edges, half a pixel out, and a sample wholly outside.
  rows[0, 0, :5] = [0, h - 1, -0.5, h - 0.5, -1.5]
  cols[0, 0, :5] = [w - 1, 0, 2, 1, 1]
  got = np.asarray(jax.jit(native.bilinear_sample)(x, rows, cols))
  want = np.asarray(map_coordinates_per_channel(x, rows, cols))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)
  np.testing.assert_array_equal(got[0, 0, 0], x[0, 0, w - 1])
  np.testing.assert_array_equal(got[0, 0, 1], x[0, h - 1, 0])
  np.testing.assert_allclose(got[0, 0, 2], x[0, 0, 2] / 2, rtol=1e-6)  # Half the border's 0.
  np.testing.assert_array_equal(got[0, 0, 4], 0)
