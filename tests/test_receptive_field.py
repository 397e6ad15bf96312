"""The traced receptive field against hand-worked stacks and against the gradient
support of the real networks; the constraint checker against models that break each
S9 rule; each config's network and recipe against the README's results table."""

import functools
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s9jax import models, receptive_field
from tests.conftest import load_config


class Stack(nn.Module):
  """Convs from (kernel, stride, dilation) specs; optional residual around the stack."""
  specs: tuple
  residual: bool = False
  pool: str = "gap"

  @nn.compact
  def __call__(self, x, train=False):
    y = x = nn.Conv(4, (1, 1))(x)
    for k, s, d in self.specs:
      y = nn.relu(nn.Conv(4, (k, k), strides=s, kernel_dilation=d, padding="SAME")(y))
    if self.residual:
      y = y + x
    if self.pool == "max":
      y = nn.max_pool(y, (2, 2), strides=(2, 2))
    return jnp.mean(y, axis=(1, 2)) if self.pool != "flatten" else y.reshape(y.shape[0], -1)


@pytest.mark.parametrize("specs,expected", [
    (((3, 1, 1),), 3),
    (((3, 1, 1),) * 3, 7),                  # 1 + 2 + 2 + 2
    (((3, 2, 1), (3, 1, 1)), 7),            # 3, then 2 x jump 2
    (((3, 1, 2),), 5),                      # dilation 2: effective kernel 5
    (((3, 2, 2), (3, 2, 2), (3, 1, 1)), 1 + 4 + 4 * 2 + 2 * 4),  # jumps 1, 2, 4
    (((5, 1, 1), (3, 2, 1), (1, 1, 1), (3, 1, 3)), 5 + 2 + 0 + 6 * 2),
])
def test_receptive_field_of_hand_checked_stacks(specs, expected):
  assert receptive_field.analyse(Stack(specs), (32, 32, 3)).rf == expected


def test_residual_branch_takes_the_wider_path():
  report = receptive_field.analyse(Stack(((3, 1, 1), (3, 1, 1)), residual=True), (16, 16, 3))
  assert report.rf == 5


def test_multiply_accumulates_count_output_pixels_times_kernel_per_group():
  # 8x8x3 in. DepthwiseThen: a 3x3 conv to 8 channels ('SAME', 8x8 out): 64 x 9 x 3 x 8;
  # the 3x3 depthwise (8 groups of one channel): 64 x 9 x 1 x 8; the 1x1 to 16: 64 x 8 x 16.
  report = receptive_field.analyse(DepthwiseThen(), (8, 8, 3))
  assert [l.macs for l in report.layers] == [13_824, 4_608, 8_192]
  # A stride-2 3x3 computes only its 4x4 outputs: the 1x1 stem 64 x 3 x 4, then 16 x 9 x 4 x 4.
  report = receptive_field.analyse(Stack(((3, 2, 1),)), (8, 8, 3))
  assert report.total_macs == 768 + 2_304
  assert "forward 3,072 multiply-accumulates" in report.format()


def positive_variables(model, size: int):
  """Variables of `model`'s shapes with every weight positive and about 1 / fan-in, so
  every ReLU is open and activations stay near 1; running statistics mean 0, variance 1.

  Built from the shapes alone: init on a large input costs ~15 s of op-by-op compiles
  (~8 s jitted, mostly its random draws), and gradient_support needs no particular
  values, only positive ones."""
  shapes = jax.eval_shape(model.init, {"params": jax.random.PRNGKey(0)},
                          jnp.ones((1, size, size, 3)))
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    if path[-1].key == "mean":
      return np.zeros(leaf.shape, leaf.dtype)
    if path[-1].key == "var":
      return np.ones(leaf.shape, leaf.dtype)
    fan_in = np.prod(leaf.shape[:-1])  # 1 for a vector (scale, bias).
    return (rng.uniform(0.5, 1.0, leaf.shape) / fan_in).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def gradient_support(model, size: int) -> int:
  """Width of the input region that moves the centre of the last spatial feature map.

  Every weight positive and the input all ones, so every ReLU is open and every
  connection in the receptive field carries a non-zero gradient."""
  variables = positive_variables(model, size)
  x = jnp.ones((1, size, size, 3))

  def last_spatial_centre(x):
    _, state = model.apply(variables, x, train=False,
                           capture_intermediates=True, mutable=["intermediates"])
    features = state["intermediates"]["features"][0]  # The map GAP pools.
    return features[0, features.shape[1] // 2, features.shape[2] // 2, 0]

  # Jitted: one compile, where op by op each conv and its transpose compiled alone.
  gradient = jax.jit(jax.grad(last_spatial_centre))(x)
  support = np.flatnonzero(np.abs(np.asarray(gradient)).sum(axis=(0, 2, 3)))
  assert support[0] > 0 and support[-1] < size - 1, "input too small: the support is clipped"
  return int(support[-1] - support[0] + 1)


@pytest.mark.parametrize("name,size", [("seed", 160), ("base", 200)])
def test_traced_rf_equals_gradient_support(name, size):
  config = load_config(name)
  model = models.create_model(config.model, conv_impl="lax")
  traced = receptive_field.analyse_config(config).rf
  assert traced == gradient_support(model, size)


def test_stem_blocks_add_their_parameters_and_receptive_field_at_full_resolution():
  # Two separable 3x3 convs (24 depthwise taps x 9, 24 x 24 pointwise, each with a
  # BatchNorm scale and bias) at the stem's jump of 1: +2 pixels of receptive field each.
  config = load_config("base")
  config.model.stem_depth = 1
  report = receptive_field.analyse_config(config)
  assert report.total_params == 190_738 + 2 * (24 * 9 + 24 * 24 + 2 * 24)
  assert report.rf == 135 + 2 * 2
  first = next(l for l in report.layers if l.op == "depthwise")
  assert first.out_shape == (1, 32, 32, 24) and first.jump == 1
  model = models.create_model(config.model, conv_impl="lax")
  assert gradient_support(model, 200) == report.rf


CONFIGS = [("seed", 198_776, 105), ("base", 190_738, 135), ("fast", 190_738, 135),
           ("best", 190_738, 135), ("tiny", 59_706, 95)]


@pytest.mark.parametrize("name,params,rf", CONFIGS)
def test_every_config_passes_every_constraint(name, params, rf):
  report = receptive_field.analyse_config(load_config(name))
  assert report.passed, report.failures()
  assert (report.total_params, report.rf) == (params, rf)


@functools.cache
def readme_results_rows() -> dict:
  """The README's results table: config name -> its row's cells."""
  rows = {}
  for line in (pathlib.Path(__file__).parents[1] / "README.md").read_text().splitlines():
    if match := re.match(r"\| `configs/(\w+)\.py` \|", line):
      rows[match.group(1)] = [cell.strip() for cell in line.strip("|").split("|")]
  return rows


# The figures the README gives for a config were measured on the recipe it states: its
# params, receptive field, epochs (and those at the progressive size) and precision
# must be what the config computes, so a change to a config it derives from (tiny.py
# from best.py, best.py from fast.py) cannot move it away from its figures unseen.
@pytest.mark.parametrize("name,params,rf", CONFIGS)
def test_readme_results_table_states_each_configs_recipe(name, params, rf):
  config = load_config(name)
  _, network, row_params, row_rf, epochs = readme_results_rows()[name][:5]
  assert (row_params, row_rf) == (f"{params:,}", str(rf))
  match = re.fullmatch(r"(\d+)(?: \((\d+) at (\d+) px\))?", epochs)
  assert match, epochs
  assert int(match.group(1)) == config.num_epochs
  if match.group(2):
    assert int(match.group(2)) == config.progressive_epochs
    assert int(match.group(3)) == config.progressive_size
  else:
    assert config.progressive_epochs == 0
  in_bf16 = config.model.pointwise_bf16 is not False or config.model.dense_bf16 is not False
  assert ("bfloat16" in network) == in_bf16, network


class Separable(nn.Module):
  dilation: int = 2
  pool: str = "gap"
  width: int = 8

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(self.width, (3, 3), strides=2, kernel_dilation=self.dilation)(x)
    x = models.SeparableConv(self.width, conv_impl="lax")(x)
    for _ in range(4):
      x = nn.Conv(self.width, (3, 3), strides=2 if x.shape[1] > 2 else 1)(x)
    if self.pool == "max":
      x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    return jnp.mean(x, axis=(1, 2)) if self.pool != "flatten" else x.reshape(x.shape[0], -1)


def failures(model):
  return receptive_field.analyse(model, (32, 32, 3)).failures()


def test_checker_accepts_a_model_inside_every_rule():
  assert failures(Separable()) == []


@pytest.mark.parametrize("model,rule", [
    (Separable(width=160), "params < 200,000"),
    (Stack(((3, 1, 1),) * 3), "receptive field > 44"),
    (Stack(((3, 2, 2),) * 4), "has a depthwise-separable conv"),
    (Separable(dilation=1), "has a dilated conv"),
    (Separable(pool="flatten"), "uses global average pooling"),
    (Separable(pool="max"), "no max pooling"),
])
def test_checker_flags_each_broken_rule(model, rule):
  assert rule in failures(model)


class DepthwiseThen(nn.Module):
  """3x3 depthwise conv, then `between`, then a 1x1 conv: the separable forms, and near
  misses that are not one."""
  between: str = "nothing"

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3), kernel_dilation=2)(x)
    y = nn.Conv(8, (3, 3), feature_group_count=8)(x)
    if self.between == "batchnorm_relu":  # MobileNet: depthwise -> BN -> ReLU -> pointwise.
      y = nn.relu(nn.BatchNorm(use_running_average=not train)(y))
    elif self.between == "residual":      # Another feature map mixed in first.
      y = y + x
    elif self.between == "gap":           # Pooled: a 1x1 on it is a dense classifier.
      y = jnp.mean(y, axis=(1, 2), keepdims=True)
    y = nn.Conv(16, (1, 1))(y)
    return jnp.mean(y, axis=(1, 2))


@pytest.mark.parametrize("between,separable", [
    ("nothing", True), ("batchnorm_relu", True), ("residual", False), ("gap", False)])
def test_separable_is_depthwise_then_pointwise_through_per_pixel_ops_only(between, separable):
  report = receptive_field.analyse(DepthwiseThen(between), (16, 16, 3))
  assert report.has_separable is separable
  # Hand-worked: a 3x3 at dilation 2 (5), then a 3x3 (+2); the 1x1 adds nothing.
  assert report.rf == 7
  ops = [layer.op for layer in report.layers]
  assert ops[:2] == ["dilated conv", "depthwise"]
  assert ops[2] == ("pointwise (separable)" if separable else "pointwise")
