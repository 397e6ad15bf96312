"""The S9 networks in Flax Linen: their building blocks, the reference-faithful `seed`
network and the default `s9net`.

Every convolution is a plain `nn.Conv` (kernel shape HWIO, `feature_group_count` for
depthwise, `kernel_dilation` for dilated), so the parameter tree and the receptive-field
tracer see the canonical form; `conv_impl` only swaps the function that computes it
(see ops.py). One exception, with the same parameters: with the C++ kernels a
depthwise-separable conv is one fused op (`SeparableConv`), which in a residual block
also applies the BatchNorm and ReLU before it (`ResidualSeparable`).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from s9jax import native, ops

NUM_CLASSES = 10
# Mixed precision: activations and matmuls in bfloat16; parameters, BatchNorm statistics
# (Flax reduces in float32) and the logits stay float32.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# `S9Net`'s nonlinearity after each BatchNorm (`model.activation`). 'hardswish' is
# MobileNetV3's x * relu6(x + 3) / 6, SiLU's shape without its exponential, which ran
# tiny.py's step at ~0.8x ReLU's; hardswish runs level with ReLU (docs/benchmarks.md).
ACTIVATIONS = {"relu": nn.relu, "silu": nn.silu, "hardswish": nn.hard_swish}
# Where a residual block's last activation goes (`model.residual_activation`): 'branch',
# on the branch before the sum (so the branch only ever adds, a form He et al. 2016's
# "Identity Mappings" measured worse); 'sum', after the sum, as ResNet's basic block.
RESIDUAL_ACTIVATIONS = ("branch", "sum")


# `model` keys that put convs on bfloat16 operands (True, False or 'auto').
BF16_KEYS = ("pointwise_bf16", "dense_bf16")


def bf16_value_problem(key: str, value) -> str | None:
  """Why `value` cannot be model.`key` (one of BF16_KEYS), or None if it can."""
  if isinstance(value, bool) or value == "auto":
    return None
  return f"model.{key} must be True, False or 'auto', got {value!r}"


def resolve_bf16(key: str, value, impl: str) -> bool:
  """`model.pointwise_bf16` or `model.dense_bf16` (`key`) for a resolved conv
  implementation: True or False as given; 'auto' is bfloat16 operands where their
  products run faster than float32's: XLA's convs on a GPU or TPU; the C++ kernels on an
  AMD CPU with AVX512-BF16 (`native.bf16_products_faster`) or where they put the
  products on AMX tiles (`native.bf16_on_amx`). A choice of numerics as well as of speed,
  so every run's first line says what it resolved to."""
  if problem := bf16_value_problem(key, value):
    raise ValueError(problem)
  if isinstance(value, bool):
    return value
  if impl == "native":
    return native.bf16_products_faster() or native.bf16_on_amx()
  return jax.default_backend() != "cpu"


def conv_factory(conv_impl: str, dtype=jnp.float32, bf16: bool = False):
  """nn.Conv without bias (BatchNorm follows every conv but the last), with the chosen
  convolution function, computing in `dtype` on float32 parameters. `bf16`: a dense conv
  on bfloat16 operands with float32 sums, by the C++ kernels where they compute it in
  float32, else as a bfloat16 nn.Conv (whose output is rounded to bfloat16 too)."""
  if bf16 and not (ops.resolve(conv_impl) == "native" and dtype == jnp.float32):
    dtype, bf16 = jnp.bfloat16, False
  return functools.partial(nn.Conv, use_bias=False, dtype=dtype,
                           conv_general_dilated=ops.conv_function(conv_impl, bf16))


class BatchNorm(nn.Module):
  """`nn.BatchNorm`'s maths and variables (params scale/bias, batch_stats mean/var, so
  checkpoints are shared) with the CPU-fast reductions of `ops.batch_norm_train`.
  Statistics and the normalisation in float32, the output in `dtype`."""
  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  use_native: bool = False  # The C++ per-channel sums (ops.resolve's 'native').
  scale_init: Any = nn.initializers.ones

  @nn.compact
  def __call__(self, x, as_prologue: bool = False, sums=None):
    """The normalised x; with `as_prologue`, the (shift, scale, bias) that normalise it as
    scale * (x - shift) + bias, for the next op to apply (`ops.separable_of_normalised`).
    `sums`: x's channel sums where the op that made x gave them (`ops.separable`), the
    statistics without a pass over x."""
    features = (x.shape[-1],)
    scale = self.param("scale", self.scale_init, features, jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      if as_prologue:
        mean, var = ops.batch_moments(x, self.use_native, sums)
      else:  # Statistics and normalisation in one op.
        y, mean, var = ops.batch_norm_train(x, scale, bias, self.epsilon, self.use_native,
                                            sums)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    if self.use_running_average or as_prologue:
      multiplier = lax.rsqrt(var + self.epsilon) * scale
      if as_prologue:
        return mean, multiplier, bias
      y = (x.astype(jnp.float32) - mean) * multiplier + bias
    return y.astype(self.dtype)


# Each training step keeps this share of every BatchNorm's running averages and moves
# them 1 - it towards the batch's statistics (train.recalibrate_batch_stats reads a
# batch's statistics back from one such update of zeros).
BATCH_NORM_MOMENTUM = 0.9


def sums_keyword(sums) -> dict:
  """A BatchNorm call's `sums` keyword: the channel sums a fused separable op gave with its
  output, or nothing where the conv before gave none (Flax's BatchNorm takes none)."""
  return {} if sums is None else {"sums": sums}


def norm_factory(conv_impl: str, dtype=jnp.float32):
  """BatchNorm (momentum BATCH_NORM_MOMENTUM, epsilon 1e-5): Flax's own with the
  canonical 'lax' ops, the CPU-fast one with the 'fast' and 'native' ones."""
  impl = ops.resolve(conv_impl)
  if impl == "lax":
    return functools.partial(nn.BatchNorm, momentum=BATCH_NORM_MOMENTUM, epsilon=1e-5,
                             dtype=dtype)
  return functools.partial(BatchNorm, momentum=BATCH_NORM_MOMENTUM, epsilon=1e-5,
                           dtype=dtype, use_native=impl == "native")


class Dropout(nn.Module):
  """`nn.Dropout`'s maths (inverted dropout, 'dropout' rng stream, no variables) with the
  CPU-fast masks of `ops.dropout_keep_mask`."""
  rate: float
  deterministic: bool = False

  @nn.compact
  def __call__(self, x):
    if self.deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    keep = ops.dropout_keep_mask(self.make_rng("dropout"), self.rate, x.shape)
    return lax.select(keep, x / (1.0 - self.rate), jnp.zeros_like(x))


def dropout_factory(conv_impl: str):
  """Flax's dropout (threefry masks) with the canonical 'lax' ops, the hashed masks with
  the CPU ones."""
  return nn.Dropout if ops.resolve(conv_impl) == "lax" else Dropout


class ConvKernel(nn.Module):
  """An `nn.Conv`'s kernel alone: the same parameter ('kernel', float32, `nn.Conv`'s
  default initialiser, so the same values from the same rng), for a module that computes
  the conv itself."""
  shape: Sequence[int]

  @nn.compact
  def __call__(self):
    return self.param("kernel", nn.initializers.lecun_normal(), tuple(self.shape), jnp.float32)


class SeparableConv(nn.Module):
  """Depthwise-separable conv: a 3x3 conv with one group per input channel, then a 1x1.
  Two `nn.Conv`s, except with the C++ kernels in float32, where one op computes both
  (`ops.separable`) from the same two parameters. `pointwise_bf16`: the 1x1 on bfloat16
  operands with float32 sums (the C++ op's `bf16`; on other paths a bfloat16 `nn.Conv`,
  whose output is rounded to bfloat16 too)."""
  features: int
  strides: int = 1
  dilation: int = 1
  padding: int | None = None  # None: 'same' for the dilation.
  conv_impl: str = "auto"
  dtype: Any = jnp.float32
  pointwise_bf16: bool = False

  @nn.nowrap
  def fuses_prologue(self) -> bool:
    """Whether this conv is one C++ op, which also applies a prologue as it reads."""
    return ops.resolve(self.conv_impl) == "native" and self.dtype == jnp.float32

  @nn.compact
  def __call__(self, x, prologue=None, with_sums: bool = False):
    """The conv of x or, with `prologue` (shift, scale, bias), of relu(scale * (x -
    shift) + bias): a BatchNorm and ReLU, applied by the fused op as it reads x when
    `fuses_prologue()`, else by XLA first. `with_sums`: (the conv, its channel sums for
    the BatchNorm after it), the sums summed by the fused op as it writes its output,
    else None."""
    pad = self.dilation if self.padding is None else self.padding
    channels = x.shape[-1]
    if self.fuses_prologue():
      depthwise = ConvKernel((3, 3, 1, channels), name="depthwise")()
      pointwise = ConvKernel((1, 1, channels, self.features), name="pointwise")()
      geometry = ((self.strides,) * 2, (self.dilation,) * 2, ((pad, pad),) * 2)
      if prologue is not None:
        return ops.separable_of_normalised(x.astype(jnp.float32), *prologue, depthwise,
                                           pointwise, *geometry, self.pointwise_bf16,
                                           with_sums)
      return ops.separable(x.astype(jnp.float32), depthwise, pointwise, *geometry,
                           self.pointwise_bf16, with_sums)
    if prologue is not None:
      shift, scale, bias = prologue
      x = nn.relu((x.astype(jnp.float32) - shift) * scale + bias).astype(self.dtype)
    conv = conv_factory(self.conv_impl, self.dtype)
    x = conv(channels, (3, 3), strides=self.strides, padding=pad,
             kernel_dilation=self.dilation, feature_group_count=channels,
             name="depthwise")(x)
    pointwise = conv_factory(self.conv_impl, self.dtype, self.pointwise_bf16)
    y = pointwise(self.features, (1, 1), name="pointwise")(x).astype(self.dtype)
    return (y, None) if with_sums else y


def conv_and_sums(conv: SeparableConv, x, train: bool, prologue=None):
  """(conv's output, its channel sums for the BatchNorm after it, or None): the fused op
  sums them as it writes the output, in training (evaluation reads running averages)."""
  if train:
    return conv(x, prologue=prologue, with_sums=True)
  return conv(x, prologue=prologue), None


def global_average_pool(module: nn.Module, x):
  """GAP; the map it pools is sown as intermediates/features (free unless asked for)
  so tests can measure the receptive field of the last spatial layer."""
  module.sow("intermediates", "features", x)
  return jnp.mean(x, axis=(1, 2))


class Seed(nn.Module):
  """Port of the reference PyTorch S9 network: 198,776 parameters.

  Per block: conv -> ReLU -> BN -> dropout, with the reference's widths, no biases,
  padding 2 on every 3x3 conv (so the maps grow by 2 before each downsampling and the
  GAP sees 7x7), dilation 2 on the first three downsampling convs.
  """
  dropout: float = 0.01
  conv_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = conv_factory(self.conv_impl, self.dtype)
    x = x.astype(self.dtype)

    def relu_bn_drop(y):
      y = nn.relu(y)
      y = norm_factory(self.conv_impl, self.dtype)(use_running_average=not train)(y)
      return dropout_factory(self.conv_impl)(self.dropout, deterministic=not train)(y)

    def sep(features, y):
      return relu_bn_drop(SeparableConv(features, padding=2, conv_impl=self.conv_impl,
                                        dtype=self.dtype)(y))

    def down(features, y, dilation=2):
      return relu_bn_drop(conv(features, (3, 3), strides=2, padding=2,
                               kernel_dilation=dilation)(y))

    x = relu_bn_drop(conv(128, (3, 3), padding=2)(x))          # 32 -> 34
    x = down(32, sep(64, x))                                     # 36 -> 18
    x = down(32, sep(70, sep(256, x)))                           # 22 -> 11
    x = down(32, sep(128, sep(128, x)))                          # 15 -> 8
    x = down(80, sep(64, sep(100, x)), dilation=1)               # 12 -> 7
    x = global_average_pool(self, x)
    return conv(NUM_CLASSES, (1, 1))(x[:, None, None, :])[:, 0, 0, :].astype(jnp.float32)


def batch_norm_activation(module: nn.Module, y, train: bool, sums=None):
  """BatchNorm, then `module.activation`: what follows every conv of `S9Net`. Called from
  the module's compact method, so the BatchNorm is its submodule. `sums`: y's channel
  sums, where its conv gave them."""
  y = norm_factory(module.conv_impl, module.dtype)(use_running_average=not train)(
      y, **sums_keyword(sums))
  return ACTIVATIONS[module.activation](y)


class ChannelAttention(nn.Module):
  """Efficient channel attention (ECA, Wang et al. 2020): each channel scaled by a sigmoid
  of a `kernel`-tap 1-D conv over the spatially averaged channels: `kernel` parameters,
  where squeeze-and-excitation's two dense layers would cost ~2c^2/r."""
  kernel: int = 3

  @nn.compact
  def __call__(self, x):
    taps = self.param("kernel", nn.initializers.normal(1.0 / self.kernel), (self.kernel,))
    pooled = jnp.mean(x, axis=(1, 2)).astype(jnp.float32)  # N x C
    half = self.kernel // 2
    padded = jnp.pad(pooled, ((0, 0), (half, self.kernel - 1 - half)))
    mixed = sum(taps[i] * padded[:, i:i + pooled.shape[1]] for i in range(self.kernel))
    return x * nn.sigmoid(mixed)[:, None, None, :].astype(x.dtype)


class ResidualSeparable(nn.Module):
  """x + (sep-conv -> BN -> activation) twice, the work-horse block of `S9Net`; with
  `residual_activation='sum'` the second activation follows the sum instead, with
  `eca_kernel` the branch passes `ChannelAttention` before the sum, and with
  `zero_init_residual` the branch's last BatchNorm scales start at 0, so the block starts
  as the identity (Goyal et al. 2017; its input is an activation's output, >= 0 with ReLU)."""
  dilation: int = 1
  activation: str = "relu"
  residual_activation: str = "branch"
  eca_kernel: int = 0
  zero_init_residual: bool = False
  conv_impl: str = "auto"
  dtype: Any = jnp.float32
  pointwise_bf16: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    y, sums = conv_and_sums(SeparableConv(x.shape[-1], dilation=self.dilation,
                                          conv_impl=self.conv_impl, dtype=self.dtype,
                                          pointwise_bf16=self.pointwise_bf16), x, train)
    second = SeparableConv(x.shape[-1], dilation=self.dilation, conv_impl=self.conv_impl,
                           dtype=self.dtype, pointwise_bf16=self.pointwise_bf16)
    if second.fuses_prologue() and self.activation == "relu":
      # The middle BatchNorm and ReLU, applied by the second conv as it reads y: their
      # output is never written, nor its gradient (the same parameters and maths).
      norm = norm_factory(self.conv_impl, self.dtype)(use_running_average=not train)
      y, sums = conv_and_sums(second, y, train, prologue=norm(y, as_prologue=True, sums=sums))
    else:
      y, sums = conv_and_sums(second, batch_norm_activation(self, y, train, sums), train)
    scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    y = norm_factory(self.conv_impl, self.dtype)(use_running_average=not train,
                                                 scale_init=scale_init)(
                                                     y, **sums_keyword(sums))
    if self.residual_activation == "branch":
      y = ACTIVATIONS[self.activation](y)
    if self.eca_kernel:
      y = ChannelAttention(self.eca_kernel)(y)
    y = x + y
    return ACTIVATIONS[self.activation](y) if self.residual_activation == "sum" else y


class S9Net(nn.Module):
  """The default network: a plain 3x3 stem, then per stage a dilated strided 3x3 conv
  (the downsampling: stride 2, dilation 2, so it widens the receptive field as it halves
  the map) and residual depthwise-separable blocks, then GAP and a 1x1 to the logits.

  Chosen for accuracy per second on CPU: all but the stem works at 16x16 and below
  (19 MFLOP forward per image by XLA's cost analysis, against the reference's 93), and
  the two deeper downsamplings are separable to leave the parameter budget to the wide
  last stage.

  `stem_stride=2` with a first stage of stride 1, dilation 1 is the same network computed
  at a quarter of the stem's cost (configs/fast.py): the stride-2 dilation-2 conv reads
  only the stem's even pixels. Only the BatchNorm statistics differ (over those pixels).
  `stem_depth` residual separable blocks after a stride-1 stem break that equivalence:
  the one place these networks compute at 32x32 (configs/tiny.py), cheap in parameters,
  not in time.
  """
  stem_width: int = 24
  stem_stride: int = 1
  stem_depth: int = 0  # Residual separable blocks at the stem's resolution.
  widths: Sequence[int] = (48, 96, 160)
  depths: Sequence[int] = (1, 2, 2)
  separable_down: Sequence[bool] = (False, True, True)
  down_strides: Sequence[int] = (2, 2, 2)
  down_dilations: Sequence[int] = (2, 2, 2)
  block_dilations: Sequence[int] = (1, 1, 1)
  activation: str = "relu"
  residual_activation: str = "branch"
  eca_kernel: int = 0
  zero_init_residual: bool = False
  dropout: float = 0.0
  conv_impl: str = "auto"
  dtype: Any = jnp.float32
  pointwise_bf16: bool = False  # The separable convs' 1x1s on bfloat16 operands.
  dense_bf16: bool = False  # The dense 3x3 convs after the stem on bfloat16 operands.

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = conv_factory(self.conv_impl, self.dtype)

    x = x.astype(self.dtype)
    x = conv(self.stem_width, (3, 3), strides=self.stem_stride, padding=1)(x)
    x = batch_norm_activation(self, x, train)
    for _ in range(self.stem_depth):
      x = ResidualSeparable(activation=self.activation,
                            residual_activation=self.residual_activation,
                            eca_kernel=self.eca_kernel,
                            zero_init_residual=self.zero_init_residual,
                            conv_impl=self.conv_impl, dtype=self.dtype,
                            pointwise_bf16=self.pointwise_bf16)(x, train)
    for width, depth, separable, stride, down_dilation, dilation in zip(
        self.widths, self.depths, self.separable_down, self.down_strides,
        self.down_dilations, self.block_dilations):
      sums = None
      if separable:
        x, sums = conv_and_sums(SeparableConv(width, strides=stride, dilation=down_dilation,
                                              conv_impl=self.conv_impl, dtype=self.dtype,
                                              pointwise_bf16=self.pointwise_bf16), x, train)
      else:
        down = conv_factory(self.conv_impl, self.dtype, self.dense_bf16)
        x = down(width, (3, 3), strides=stride, padding=down_dilation,
                 kernel_dilation=down_dilation)(x).astype(self.dtype)
      x = batch_norm_activation(self, x, train, sums)
      for _ in range(depth):
        x = ResidualSeparable(dilation=dilation, activation=self.activation,
                              residual_activation=self.residual_activation,
                              eca_kernel=self.eca_kernel,
                              zero_init_residual=self.zero_init_residual,
                              conv_impl=self.conv_impl, dtype=self.dtype,
                              pointwise_bf16=self.pointwise_bf16)(x, train)
    x = global_average_pool(self, x)
    x = dropout_factory(self.conv_impl)(self.dropout, deterministic=not train)(x)
    conv_out = nn.Conv(NUM_CLASSES, (1, 1), dtype=self.dtype,
                       conv_general_dilated=ops.conv_function(self.conv_impl))
    return conv_out(x[:, None, None, :])[:, 0, 0, :].astype(jnp.float32)


def create_model(model_config, conv_impl: str | None = None) -> nn.Module:
  """Builds the network a config names. `conv_impl` overrides the config's choice
  (the constraint report always analyses the canonical 'lax' form). 'auto' is resolved
  here, once, so every layer of the network uses the same implementation."""
  impl = ops.resolve(conv_impl or model_config.conv_impl)
  dtype = COMPUTE_DTYPES.get(model_config.get("dtype", "float32"))
  if dtype is None:
    raise ValueError(f"model.dtype must be one of {sorted(COMPUTE_DTYPES)}, "
                     f"got {model_config.dtype!r}")
  if model_config.name == "seed":
    return Seed(dropout=model_config.dropout, conv_impl=impl, dtype=dtype)
  if model_config.name == "s9net":
    if model_config.activation not in ACTIVATIONS:
      raise ValueError(f"model.activation must be one of {sorted(ACTIVATIONS)}, "
                       f"got {model_config.activation!r}")
    if model_config.residual_activation not in RESIDUAL_ACTIVATIONS:
      raise ValueError(f"model.residual_activation must be one of {RESIDUAL_ACTIVATIONS}, "
                       f"got {model_config.residual_activation!r}")
    if model_config.eca_kernel < 0:
      raise ValueError(f"model.eca_kernel must be >= 0 (0: off), got {model_config.eca_kernel}")
    return S9Net(stem_width=model_config.stem_width,
                 stem_stride=model_config.stem_stride,
                 stem_depth=model_config.stem_depth,
                 widths=tuple(model_config.widths),
                 depths=tuple(model_config.depths),
                 separable_down=tuple(model_config.separable_down),
                 down_strides=tuple(model_config.down_strides),
                 down_dilations=tuple(model_config.down_dilations),
                 block_dilations=tuple(model_config.block_dilations),
                 activation=model_config.activation,
                 residual_activation=model_config.residual_activation,
                 eca_kernel=model_config.eca_kernel,
                 zero_init_residual=model_config.zero_init_residual,
                 dropout=model_config.dropout,
                 pointwise_bf16=resolve_bf16("pointwise_bf16", model_config.pointwise_bf16,
                                             impl),
                 dense_bf16=resolve_bf16("dense_bf16", model_config.dense_bf16, impl),
                 conv_impl=impl, dtype=dtype)
  raise ValueError(f"unknown model.name {model_config.name!r}: expected 'seed' or 's9net'")
