"""Every fast convolution the models use, in its XLA form ('fast') and with the C++
kernels ('native'), equals lax.conv_general_dilated, outputs and gradients, and whole
models give the same logits with each implementation."""

import functools
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from s9jax import models, native, ops
from tests.conftest import load_config

# Tests (and parameters) that need the C++ kernels built carry the `native` marker
# (`pytest -m native` runs them alone, `-m "not native"` the rest); the XLA forms'
# tests carry none, so they run on machines where no kernels build.
NATIVE = pytest.mark.native
IMPLS = ["fast", pytest.param("native", marks=NATIVE)]


@pytest.fixture(autouse=True)
def native_kernels(request):
  """Tests marked `native` need the kernels built: a machine with a C++ compiler that
  fails to build them fails the test; one without a compiler (or with the kernels
  turned off by S9JAX_NATIVE=0) skips it. tests/test_native.py imports this fixture."""
  if request.node.get_closest_marker("native") is not None and not native.available():
    if native.find_compiler() is None or os.environ.get("S9JAX_NATIVE", "1") == "0":
      pytest.skip(f"no C++ kernels here: {native.unavailable_reason()}")
    pytest.fail(f"the C++ kernels did not build: {native.unavailable_reason()}")

DN = ("NHWC", "HWIO", "NHWC")
# (kernel, in, out, groups, stride, dilation, padding): every form in seed and s9net.
VARIANTS = [
    (3, 8, 8, 8, 1, 1, 1),      # depthwise 'same'
    (3, 8, 8, 8, 1, 1, 2),      # depthwise, seed's padding 2 (map grows)
    (3, 8, 8, 8, 2, 2, 2),      # dilated strided depthwise (s9net downsampling)
    (3, 8, 8, 8, 1, 2, 2),      # dilated depthwise
    (1, 8, 12, 1, 1, 1, 0),     # pointwise
    (3, 3, 12, 1, 1, 1, 1),     # stem
    (3, 3, 12, 1, 2, 1, 1),     # strided stem (fast.py)
    (3, 3, 12, 1, 1, 1, 2),     # seed's first conv
    (3, 8, 12, 1, 2, 2, 2),     # dilated strided conv (both networks)
    (3, 8, 12, 1, 2, 1, 2),     # seed's last strided conv
    (3, 8, 12, 1, 2, 1, "SAME"),
    (3, 8, 12, 1, 2, 2, "VALID"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kernel,cin,cout,groups,stride,dilation,padding", VARIANTS)
def test_fast_conv_matches_lax(kernel, cin, cout, groups, stride, dilation, padding, impl):
  kx, kw = jax.random.split(jax.random.PRNGKey(kernel * 100 + stride * 10 + dilation))
  x = jax.random.normal(kx, (2, 11, 9, cin))  # Odd, non-square: no lucky alignment.
  w = jax.random.normal(kw, (kernel, kernel, cin // groups, cout))
  pad = padding if isinstance(padding, str) else ((padding, padding), (padding, padding))

  def run(fn):
    def f(x, w):
      return fn(x, w, (stride, stride), pad, None, (dilation, dilation), DN, groups)
    y = f(x, w)
    grads = jax.grad(lambda x, w: jnp.sum(f(x, w) * jnp.cos(f(x, w))), argnums=(0, 1))(x, w)
    return y, grads

  y_lax, (gx_lax, gw_lax) = run(lax.conv_general_dilated)
  y_fast, (gx_fast, gw_fast) = run(functools.partial(ops.fast_conv_general_dilated,
                                                     use_native=impl == "native"))
  assert y_fast.shape == y_lax.shape
  np.testing.assert_allclose(y_fast, y_lax, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gx_fast, gx_lax, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(gw_fast, gw_lax, rtol=1e-4, atol=1e-3)


def test_unsupported_layouts_fall_back_to_lax():
  x = jnp.ones((1, 3, 6, 6))
  w = jnp.ones((4, 3, 3, 3))
  dn = ("NCHW", "OIHW", "NCHW")
  np.testing.assert_allclose(
      ops.fast_conv_general_dilated(x, w, (1, 1), "SAME", None, None, dn),
      lax.conv_general_dilated(x, w, (1, 1), "SAME", None, None, dn))


# VARIANTS use 3, 8 or 12 channels. The depthwise kernels split channels into blocks of
# 16, 8 and 1 (the seed network's 70 and 100 are 4x16 + 6 and 6x16 + 4); the dense
# kernels block channels as 3x16, 2x16, 3x8, 16, 8 and 1 and output pixels as 8, 4, 2
# and 1, and compute the kernel gradient of inputs with under 8 channels by (tap,
# channel) rows, 8, 4, 2 and 1 at a time. These shapes take every block: 25 = 16 + 8 + 1
# channels, 85 = 48 + 32 + 5 and 27 = 24 + 3 output channels, output rows of 15 = 8 + 4 +
# 2 + 1 pixels (stride 1, padding 1), 45 = 5 x 8 + 4 + 1 rows. The depthwise kernels
# compute a 3x3 kernel's pixels whose 9 taps all read their source on a path of their
# own: every case here has such pixels and border ones in the forward and the kernel
# gradient, and in the input gradient but for stride 2 with dilation 1 (none full).
@NATIVE
@pytest.mark.parametrize("x_shape,w_shape,groups,tolerance", [
    ((3, 9, 10, 25), (3, 3, 1, 25), 25, 1e-3),      # depthwise
    ((2, 17, 15, 25), (3, 3, 25, 85), 1, 1e-2),     # dense: sums of 225 products
    ((2, 17, 15, 5), (3, 3, 5, 27), 1, 1e-2),       # dense, few input channels
])
@pytest.mark.parametrize("stride,dilation,pad", [(1, 1, 1), (1, 1, 2), (2, 2, 2), (2, 1, 2)])
def test_native_on_wide_odd_shapes_matches_lax(x_shape, w_shape, groups, tolerance, stride,
                                               dilation, pad):
  x = jax.random.normal(jax.random.PRNGKey(0), x_shape)
  w = jax.random.normal(jax.random.PRNGKey(1), w_shape)

  def f(fn, x, w):
    return fn(x, w, (stride, stride), ((pad, pad), (pad, pad)), None, (dilation, dilation),
              DN, groups)
  native_conv = functools.partial(ops.fast_conv_general_dilated, use_native=True)
  y_lax, vjp_lax = jax.vjp(functools.partial(f, lax.conv_general_dilated), x, w)
  y_native, vjp_native = jax.vjp(functools.partial(f, native_conv), x, w)
  np.testing.assert_allclose(y_native, y_lax, rtol=1e-4, atol=tolerance / 10)
  dy = jax.random.normal(jax.random.PRNGKey(2), y_lax.shape)
  for got, want in zip(vjp_native(dy), vjp_lax(dy)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=tolerance)


@NATIVE
@pytest.mark.parametrize("stride,dilation,pad", [(1, 1, 1), (2, 2, 2), (1, 2, 2)])
def test_native_depthwise_border_pixels_sum_as_if_zero_padded(stride, dilation, pad):
  # A 3x3 depthwise pixel on the border skips the taps that fall outside; one inside takes
  # all nine, several pixels at a time. Given the image with its padding made explicit,
  # every pixel is inside, and each sum must come out bit for bit the same: the same
  # products, in the same order, plus exact zeros. Width 13 leaves groups of four and
  # single pixels; 25 channels make blocks of 16 and 8 and single channels.
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 11, 13, 25))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 25))
  out_hw = tuple((n + 2 * pad - 2 * dilation - 1) // stride + 1 for n in (11, 13))
  conv = functools.partial(native.depthwise_forward, out_hw=out_hw, strides=(stride, stride),
                           dilation=(dilation, dilation))
  with_border = conv(x, w, pads=((pad, pad), (pad, pad)))
  padded = conv(jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))), w, pads=((0, 0), (0, 0)))
  np.testing.assert_array_equal(with_border, padded)
  want = lax.conv_general_dilated(x, w[:, :, None, :], (stride, stride), ((pad, pad), (pad, pad)),
                                  rhs_dilation=(dilation, dilation), dimension_numbers=DN,
                                  feature_group_count=25)
  np.testing.assert_allclose(with_border, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,devices,kernels,expected", [
    ("cpu", 1, True, "native"), ("cpu", 1, False, "fast"), ("cpu", 8, True, "fast"),
    ("gpu", 1, True, "lax"), ("tpu", 4, False, "lax")])
def test_auto_picks_by_backend_device_count_and_kernels(monkeypatch, backend, devices, kernels,
                                                        expected):
  # The backend and device count stood in for, so every branch runs on this machine.
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  monkeypatch.setattr(jax, "device_count", lambda: devices)
  monkeypatch.setattr(native, "available", lambda: kernels)
  assert ops.resolve("auto") == expected


def map_coordinates_per_channel(x, rows, cols):
  """The reference for the augmentation's sampler: jax.scipy.ndimage.map_coordinates
  (order=1, constant 0) of each image and channel."""
  def sample(image, r, q):
    return jnp.stack([jax.scipy.ndimage.map_coordinates(image[..., k], [r, q], order=1,
                                                        mode="constant")
                      for k in range(image.shape[-1])], -1)
  return jax.vmap(sample)(x, rows, cols)


@pytest.mark.parametrize("impl", ["native", "fast"])
def test_bilinear_sample_takes_the_kernel_where_auto_does(monkeypatch, impl):
  """ops.bilinear_sample calls the C++ sampler exactly where resolve('auto') picks the C++
  kernels, and map_coordinates elsewhere, with the same values."""
  if impl == "native" and not native.available():
    pytest.skip(f"no C++ kernels here: {native.unavailable_reason()}")
  monkeypatch.setattr(ops, "resolve", lambda name: impl)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
  rows, cols = (rng.uniform(-1, 6, (2, 6, 6)).astype(np.float32) for _ in range(2))
  sample = jax.jit(lambda *args: ops.bilinear_sample(*args))  # Traced afresh for each impl.
  assert ("s9_bilinear_sample" in sample.lower(x, rows, cols).as_text()) == (impl == "native")
  np.testing.assert_allclose(sample(x, rows, cols), map_coordinates_per_channel(x, rows, cols),
                             rtol=1e-6, atol=1e-5)


def test_native_without_kernels_and_unknown_names_are_refused(monkeypatch):
  monkeypatch.setattr(native, "available", lambda: False)
  with pytest.raises(ValueError, match="'native' needs"):
    ops.resolve("native")
  with pytest.raises(ValueError, match="conv implementation"):
    ops.resolve("cudnn")


def test_compiler_options_are_xla_cpus_alone():
  assert ops.compiler_options("cpu") == ops.COMPILER_OPTIONS
  assert ops.compiler_options("gpu") == ops.compiler_options("tpu") == {}


def test_failed_native_build_says_why(monkeypatch, tmp_path):
  monkeypatch.setenv("S9JAX_CACHE", str(tmp_path))
  monkeypatch.setenv("CXX", shutil.which("false") or "false")
  with pytest.raises(RuntimeError, match="failed on kernels.cc"):
    native.build()
  assert not list(tmp_path.iterdir())  # No half-written library left behind.


# fast.py's network: its one new form (the strided stem) is in VARIANTS, and
# The fused depthwise-separable op (the networks' SeparableConv with the C++ kernels)
# against its two lax convs, on shapes that take every block of the kernels it composes:
# 25 = 16 + 8 + 1 channels, 85 = 48 + 32 + 5 outputs; 5 channels, under 8, take the 1x1
# kernel gradient's row path; odd, non-square maps; the networks' strides and dilations;
# 37 images of 4x4, whose 1x1 kernel gradient is summed over groups of 16 images, with a
# short last group whether the batch is split between 1 thread or 2 (kKernelGradPixels);
# 256 -> 256 channels, whose per-thread sums on 2 threads (1.1 MB) are the call's own
# buffer, not one kept from call to call (kKeptBytes).
@NATIVE
@pytest.mark.parametrize("x_shape,features", [((3, 9, 10, 25), 85), ((2, 11, 7, 5), 27),
                                              ((2, 8, 8, 16), 16), ((37, 4, 4, 24), 40),
                                              ((2, 3, 3, 256), 256)])
@pytest.mark.parametrize("stride,dilation,pad", [(1, 1, 1), (2, 2, 2), (1, 2, 2), (1, 1, 2)])
def test_fused_separable_matches_two_lax_convs(x_shape, features, stride, dilation, pad):
  x = jax.random.normal(jax.random.PRNGKey(0), x_shape)
  depthwise = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 1, x_shape[-1]))
  pointwise = jax.random.normal(jax.random.PRNGKey(2), (1, 1, x_shape[-1], features))
  pads = ((pad, pad), (pad, pad))

  def two_convs(x, depthwise, pointwise):
    y = lax.conv_general_dilated(x, depthwise, (stride, stride), pads, None,
                                 (dilation, dilation), DN, x.shape[-1])
    return lax.conv_general_dilated(y, pointwise, (1, 1), "VALID", None, None, DN)

  def fused(x, depthwise, pointwise):
    return ops.separable(x, depthwise, pointwise, (stride, stride), (dilation, dilation), pads)

  y_lax, vjp_lax = jax.vjp(two_convs, x, depthwise, pointwise)
  y_fused, vjp_fused = jax.vjp(fused, x, depthwise, pointwise)
  assert y_fused.shape == y_lax.shape
  np.testing.assert_allclose(y_fused, y_lax, rtol=1e-4, atol=1e-3)
  dy = jax.random.normal(jax.random.PRNGKey(3), y_lax.shape)
  for got, want in zip(vjp_fused(dy), vjp_lax(dy)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-2)


def _round_to_bf16(a):
  return a.astype(jnp.bfloat16).astype(jnp.float32)


# `bf16=True` (model.pointwise_bf16): the 1x1's products on bfloat16-rounded operands,
# summed in float32, forward and backward, against the same maths in XLA: the depthwise
# conv in float32, then the 1x1 of the rounded output and kernel; its kernel gradient from
# the rounded output and output gradient, its input gradient from the rounded output
# gradient and kernel. Shapes with odd channel and pixel counts (pairs padded with zero)
# and outputs not a multiple of 16 (masked vectors); 61 images of 3x3, whose kernel
# gradient sums groups of 28 with a short last one, the pixel pairs straddling images.
@NATIVE
@pytest.mark.parametrize("x_shape,features,stride,dilation", [
    ((3, 9, 10, 25), 85, 1, 1), ((2, 11, 7, 5), 27, 2, 2), ((2, 8, 8, 48), 48, 1, 1),
    ((61, 3, 3, 8), 24, 1, 1)])
def test_fused_separable_bf16_matches_rounded_operands(x_shape, features, stride, dilation):
  x = jax.random.normal(jax.random.PRNGKey(0), x_shape)
  depthwise = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 1, x_shape[-1]))
  pointwise = jax.random.normal(jax.random.PRNGKey(2), (1, 1, x_shape[-1], features))
  geometry = ((stride, stride), (dilation, dilation), ((dilation, dilation),) * 2)

  def depthwise_conv(x, depthwise):
    return lax.conv_general_dilated(x, depthwise, geometry[0], geometry[2], None, geometry[1],
                                    DN, x.shape[-1], precision=lax.Precision.HIGHEST)

  _, depthwise_vjp = jax.vjp(depthwise_conv, x, depthwise)
  # The depthwise output as the op rounds it: its own C++ depthwise sums (tested against
  # lax above), which may differ from lax's in the last bit, enough to round a value the
  # other way.
  d = ops.fast_conv_general_dilated(x, depthwise, geometry[0], geometry[2],
                                    rhs_dilation=geometry[1], dimension_numbers=DN,
                                    feature_group_count=x.shape[-1], use_native=True)
  w = _round_to_bf16(pointwise[0, 0])
  y_want = jnp.einsum("nhwc,cf->nhwf", _round_to_bf16(d), w, precision="highest")
  y, vjp = jax.vjp(lambda *a: ops.separable(*a, *geometry, bf16=True), x, depthwise, pointwise)
  np.testing.assert_allclose(y, y_want, rtol=1e-5, atol=1e-4)
  # Not the float32 op: the rounding shows (bfloat16 keeps 8 significant bits).
  y_float32 = ops.separable(x, depthwise, pointwise, *geometry)
  assert float(jnp.abs(y - y_float32).max()) > 1e-3 * float(jnp.abs(y_float32).max())

  dy = jax.random.normal(jax.random.PRNGKey(3), y.shape)
  dpointwise_want = jnp.einsum("nhwc,nhwf->cf", _round_to_bf16(d), _round_to_bf16(dy),
                               precision="highest")
  dd = jnp.einsum("nhwf,cf->nhwc", _round_to_bf16(dy), w, precision="highest")
  dx_want, ddepthwise_want = depthwise_vjp(dd)
  dx, ddepthwise, dpointwise = vjp(dy)
  np.testing.assert_allclose(dpointwise[0, 0], dpointwise_want, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(dx, dx_want, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(ddepthwise, ddepthwise_want.reshape(ddepthwise.shape),
                             rtol=1e-4, atol=1e-2)


# `bf16=True` on a dense conv (model.dense_bf16): all three products on bfloat16-rounded
# operands, summed in float32, against XLA's conv of the rounded operands and its
# gradients for a rounded dy. Unstrided (the input gradient as a conv of dy), strided and
# dilated (the input gradient added tap by tap), odd channel counts (pairs padded with
# zero), asymmetric padding, odd pixel counts (the kernel gradient's pixel pairs),
# outputs not a multiple of 16 (masked vectors), rows wider than 16 pixels and more than
# 64 output channels (AMX tiles: 16 pixels by 4 tiles of 16 at a time); 3 input channels
# as the stem has.
@NATIVE
@pytest.mark.parametrize("x_shape,features,stride,dilation,pads", [
    ((3, 9, 11, 5), 19, 1, 1, ((1, 1), (1, 1))), ((2, 16, 16, 24), 48, 1, 1, ((1, 1), (1, 1))),
    ((2, 12, 10, 7), 33, 2, 2, ((2, 2), (2, 2))), ((2, 7, 9, 16), 32, 2, 1, ((0, 1), (0, 1))),
    ((2, 8, 8, 3), 24, 2, 1, ((1, 1), (1, 1))), ((2, 9, 9, 8), 17, 1, 2, ((1, 3), (2, 2))),
    ((2, 5, 37, 6), 70, 1, 1, ((1, 1), (1, 1)))])
def test_dense_bf16_matches_rounded_operands(x_shape, features, stride, dilation, pads):
  x = jax.random.normal(jax.random.PRNGKey(0), x_shape)
  kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, x_shape[-1], features))

  def conv(x, kernel, **native):
    fn = ops.fast_conv_general_dilated if native else lax.conv_general_dilated
    extra = native or {"precision": lax.Precision.HIGHEST}
    return fn(x, kernel, (stride, stride), pads, rhs_dilation=(dilation, dilation),
              dimension_numbers=DN, **extra)

  y_want, vjp_want = jax.vjp(conv, _round_to_bf16(x), _round_to_bf16(kernel))
  y, vjp = jax.vjp(lambda x, k: conv(x, k, use_native=True, bf16=True), x, kernel)
  np.testing.assert_allclose(y, y_want, rtol=1e-5, atol=1e-4)
  # Not the float32 op: the rounding shows (bfloat16 keeps 8 significant bits).
  y_float32 = conv(x, kernel, use_native=True)
  assert float(jnp.abs(y - y_float32).max()) > 1e-3 * float(jnp.abs(y_float32).max())
  dy = jax.random.normal(jax.random.PRNGKey(3), y.shape)
  for got, want in zip(vjp(dy), vjp_want(_round_to_bf16(dy))):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_bf16_convs_are_the_native_dense_ones_only():
  x, kernel = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
  with pytest.raises(ValueError, match="bf16 convs need the C\\+\\+ kernels"):
    ops.conv_function("fast", bf16=True)
  with pytest.raises(ValueError, match="bf16 convs are the C\\+\\+ kernels' dense KxK convs"):
    ops.fast_conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=DN,
                                  bf16=True)  # Not use_native.
  with pytest.raises(ValueError, match="4 groups"):
    ops.fast_conv_general_dilated(x, jnp.ones((3, 3, 1, 4)), (1, 1), "SAME",
                                  dimension_numbers=DN, feature_group_count=4,
                                  use_native=True, bf16=True)  # Depthwise.


# The same op with a BatchNorm and ReLU applied as it reads its input (the middle of every
# residual block with the C++ kernels) against models.BatchNorm, ReLU and the two lax
# convs: values, gradients of all four parameters, x's and the running statistics, in
# both BatchNorm modes, on an off-centre x (so an uncentred sum would show) with channels
# both sides of the ReLU; 4x4 images in groups of 16 with a short last one, as above.
@NATIVE
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("x_shape,features,stride,dilation", [
    ((3, 9, 10, 25), 85, 1, 1), ((2, 11, 7, 5), 27, 2, 2), ((2, 8, 8, 16), 16, 1, 2),
    ((37, 4, 4, 24), 40, 1, 1)])
def test_separable_of_normalised_matches_batch_norm_relu_and_two_convs(
    x_shape, features, stride, dilation, train):
  channels = x_shape[-1]
  x = 3.0 + 2.0 * jax.random.normal(jax.random.PRNGKey(0), x_shape)
  kernels = (jax.random.normal(jax.random.PRNGKey(1), (3, 3, 1, channels)),
             jax.random.normal(jax.random.PRNGKey(2), (1, 1, channels, features)))
  params = {"scale": jnp.linspace(0.5, 2.0, channels), "bias": jnp.linspace(-1.0, 1.0, channels)}
  stats = {"mean": jnp.full(channels, 2.5), "var": jnp.full(channels, 3.0)}
  norm = models.BatchNorm(use_running_average=not train, use_native=True)
  geometry = ((stride, stride), (dilation, dilation), ((dilation, dilation),) * 2)

  def unfused(params, x, depthwise, pointwise):
    y, updates = norm.apply({"params": params, "batch_stats": stats}, x,
                            mutable=["batch_stats"])
    y = lax.conv_general_dilated(nn.relu(y), depthwise, geometry[0], geometry[2], None,
                                 geometry[1], DN, channels)
    return lax.conv_general_dilated(y, pointwise, (1, 1), "VALID", None, None, DN), updates

  def fused(params, x, depthwise, pointwise):
    prologue, updates = norm.apply({"params": params, "batch_stats": stats}, x,
                                   as_prologue=True, mutable=["batch_stats"])
    return ops.separable_of_normalised(x, *prologue, depthwise, pointwise, *geometry), updates

  y_want, vjp_want, updates_want = jax.vjp(unfused, params, x, *kernels, has_aux=True)
  y_got, vjp_got, updates_got = jax.vjp(fused, params, x, *kernels, has_aux=True)
  np.testing.assert_allclose(y_got, y_want, rtol=1e-4, atol=1e-3)
  relu_output = nn.relu(norm.apply({"params": params, "batch_stats": stats}, x,
                                   mutable=["batch_stats"])[0])
  assert 0.2 < float(jnp.mean(relu_output > 0)) < 0.8  # Both sides of the ReLU.
  for got, want in zip(jax.tree.leaves(updates_got), jax.tree.leaves(updates_want)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  dy = jax.random.normal(jax.random.PRNGKey(3), y_want.shape)
  grads_want, grads_got = vjp_want(dy), vjp_got(dy)
  assert jax.tree.structure(grads_got) == jax.tree.structure(grads_want)
  for got, want in zip(jax.tree.leaves(grads_got), jax.tree.leaves(grads_want)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-2 * float(jnp.max(jnp.abs(want))))


# The fused ops' output channel sums (`sums`), which the BatchNorm after them reads in
# training instead of summing their output itself: the same statistics to the bit
# (ChannelSums' order), and the BatchNorm's output, running averages and gradients the
# same as without them, in both BatchNorm forms, with and without a prologue; an odd batch
# splits into other chunks of rows than of images.
@NATIVE
@pytest.mark.parametrize("as_prologue", [False, True], ids=["normalise", "as-prologue"])
@pytest.mark.parametrize("prologue", [False, True], ids=["bare", "prologue"])
@pytest.mark.parametrize("x_shape,features,stride,dilation", [
    ((4, 9, 10, 25), 85, 1, 1), ((2, 11, 7, 5), 27, 2, 2), ((3, 4, 4, 24), 40, 1, 1)])
def test_separable_sums_stand_for_a_pass_over_its_output(x_shape, features, stride, dilation,
                                                          prologue, as_prologue):
  channels = x_shape[-1]
  x = 3.0 + 2.0 * jax.random.normal(jax.random.PRNGKey(0), x_shape)
  kernels = (jax.random.normal(jax.random.PRNGKey(1), (3, 3, 1, channels)),
             jax.random.normal(jax.random.PRNGKey(2), (1, 1, channels, features)))
  shift, scale = jnp.full(channels, 2.5), jnp.linspace(0.5, 2.0, channels)
  bias = jnp.zeros(channels)
  geometry = ((stride, stride), (dilation, dilation), ((dilation, dilation),) * 2)
  params = {"scale": jnp.linspace(0.5, 2.0, features), "bias": jnp.linspace(-1.0, 1.0, features)}
  stats = {"mean": jnp.zeros(features), "var": jnp.ones(features)}
  norm = models.BatchNorm(use_native=True)

  def conv(x, depthwise, pointwise, sums):
    if prologue:
      return ops.separable_of_normalised(x, shift, scale, bias, depthwise, pointwise,
                                         *geometry, sums=sums)
    return ops.separable(x, depthwise, pointwise, *geometry, sums=sums)

  def net(params, x, depthwise, pointwise, with_sums):
    y, sums = conv(x, depthwise, pointwise, True) if with_sums else (
        conv(x, depthwise, pointwise, False), None)
    out, updates = norm.apply({"params": params, "batch_stats": stats}, y, as_prologue,
                              **models.sums_keyword(sums), mutable=["batch_stats"])
    out = jnp.stack(out) if as_prologue else out
    return jnp.sum(jnp.sin(out)), updates

  y, sums = jax.jit(conv, static_argnums=3)(x, *kernels, True)
  np.testing.assert_array_equal(y, conv(x, *kernels, False))
  np.testing.assert_array_equal(sums, jnp.stack(native.channel_sums(y, y)))
  grad = jax.jit(jax.grad(net, argnums=(0, 1, 2, 3), has_aux=True), static_argnums=4)
  got, want = grad(params, x, *kernels, True), grad(params, x, *kernels, False)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)


# test_models checks it computes base's function. Training mode only: the convolutions
# are the same code in both modes, and inference-mode BatchNorm is compared with
# nn.BatchNorm below (the inference-mode cases took ~70 s of the suite's 10 minutes).
@pytest.mark.parametrize("name,impl", [pytest.param("seed", "native", marks=NATIVE),
                                       pytest.param("base", "native", marks=NATIVE),
                                       ("base", "fast")])
def test_models_same_logits_and_grads_with_each_implementation(name, impl):
  config = load_config(name)
  config.model.dropout = 0.0  # Masks differ by design (hashed vs threefry): tested below.
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  fast = models.create_model(config.model, conv_impl=impl)
  canonical = models.create_model(config.model, conv_impl="lax")
  # Same parameters from the same rng (so also the same tree: a checkpoint trained with
  # one runs with the other), though the fused separable convs create theirs without
  # nn.Conv. Both inits in one jitted program: op by op they took ~18 s on the seed
  # network (mostly compiles), jitted ~8.
  variables, fast_variables = jax.jit(
      lambda rngs, x: (canonical.init(rngs, x, train=False), fast.init(rngs, x, train=False))
  )({"params": jax.random.PRNGKey(1)}, x)
  assert jax.tree.structure(fast_variables) == jax.tree.structure(variables)
  assert all(jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(fast_variables),
                                                   jax.tree.leaves(variables)))

  def loss(params, model):
    out, updates = model.apply({**variables, "params": params}, x, train=True,
                               mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(2)})
    return jnp.sum(out ** 2), (out, updates)

  # Jitted: one compile each instead of hundreds of eager ones (93 s -> 54 s for the two).
  grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (_, (out_fast, stats_fast)), g_fast = grad_fn(variables["params"], fast)
  (_, (out_lax, stats_lax)), g_lax = grad_fn(variables["params"], canonical)
  np.testing.assert_allclose(out_fast, out_lax, rtol=1e-4, atol=1e-4)
  assert out_fast.shape == (2, 10)
  # The running statistics moved, and equally either way (below).
  assert any(not jnp.allclose(a, b) for a, b in zip(jax.tree.leaves(stats_fast),
                                                     jax.tree.leaves(variables["batch_stats"])))
  for a, b in zip(jax.tree.leaves((g_fast, stats_fast)), jax.tree.leaves((g_lax, stats_lax))):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("train", [True, False])
def test_fast_batch_norm_matches_flax(train, impl):
  x = 3.0 + 2.0 * jax.random.normal(jax.random.PRNGKey(0), (4, 5, 7, 6))  # Off-centre.
  flax_bn = nn.BatchNorm(momentum=0.9, epsilon=1e-5)
  fast_bn = models.BatchNorm(momentum=0.9, epsilon=1e-5)
  variables = flax_bn.init(jax.random.PRNGKey(1), x, use_running_average=False)
  assert jax.tree.structure(fast_bn.init(jax.random.PRNGKey(1), x)) == jax.tree.structure(variables)
  variables = {"params": {"scale": jnp.linspace(0.5, 2.0, 6), "bias": jnp.linspace(-1, 1, 6)},
               "batch_stats": {"mean": jnp.full(6, 2.5), "var": jnp.full(6, 3.0)}}

  def run(module, **kwargs):
    def loss(params, x):
      y, updates = module.apply({**variables, "params": params}, x, mutable=["batch_stats"],
                                **kwargs)
      return jnp.sum(y * jnp.cos(y)), (y, updates["batch_stats"])
    (_, (y, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        variables["params"], x)
    return y, stats, grads

  y_flax, stats_flax, g_flax = run(flax_bn, use_running_average=not train)
  y_fast, stats_fast, g_fast = run(models.BatchNorm(use_running_average=not train,
                                                    use_native=impl == "native"))
  np.testing.assert_allclose(y_fast, y_flax, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves((stats_fast, g_fast)), jax.tree.leaves((stats_flax, g_flax))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.5])
def test_dropout_keep_mask_has_the_rate_and_no_pattern(rate):
  shape = (64, 16, 16, 32)  # 524,288 elements.
  keep = np.asarray(ops.dropout_keep_mask(jax.random.PRNGKey(0), rate, shape))
  n, dropped = keep.size, ~keep
  sigma = np.sqrt(n * rate * (1 - rate))
  assert abs(dropped.sum() - n * rate) < 5 * sigma
  # Neighbours along each axis (channels, pixels, rows, images) drop independently:
  # both dropped with probability rate**2.
  for axis in range(4):
    a = np.moveaxis(dropped, axis, 0)
    both = (a[1:] & a[:-1]).sum()
    pairs = a[1:].size
    assert abs(both - pairs * rate**2) < 5 * np.sqrt(pairs * rate**2 * (1 - rate**2)), axis
  # Each channel gets its share, not a fixed subset.
  per_channel = dropped.reshape(-1, 32).mean(axis=0)
  assert np.all(np.abs(per_channel - rate) < 5 * np.sqrt(rate * (1 - rate) / (n / 32)))


def test_dropout_keep_mask_follows_the_key():
  shape, rate = (8, 8, 8, 16), 0.5
  a, b = (np.asarray(ops.dropout_keep_mask(jax.random.PRNGKey(k), rate, shape)) for k in (0, 1))
  np.testing.assert_array_equal(a, ops.dropout_keep_mask(jax.random.PRNGKey(0), rate, shape))
  assert 0.4 < (a == b).mean() < 0.6  # Another key: an unrelated mask.
  assert ops.dropout_keep_mask(jax.random.PRNGKey(0), 0.0, shape).all()


def test_dropout_module_is_flax_dropout_with_hashed_masks():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 6, 6, 8)) + 3.0  # No zeros of its own.
  rng = {"dropout": jax.random.PRNGKey(5)}
  layer = models.Dropout(0.25)
  y = layer.apply({}, x, rngs=rng)
  kept = y != 0
  assert 0.6 < kept.mean() < 0.9
  np.testing.assert_allclose(y[kept], x[kept] / 0.75, rtol=1e-6)
  # The gradient is the same mask, scaled.
  grad = jax.grad(lambda x: layer.apply({}, x, rngs=rng).sum())(x)
  np.testing.assert_allclose(grad, kept / 0.75, rtol=1e-6)
  np.testing.assert_array_equal(models.Dropout(0.25, deterministic=True).apply({}, x), x)
  np.testing.assert_array_equal(models.Dropout(1.0).apply({}, x, rngs=rng), 0 * x)
  # The canonical 'lax' models keep Flax's own (threefry masks).
  assert models.dropout_factory("lax") is nn.Dropout
  assert models.dropout_factory("fast") is models.Dropout
