"""Receptive field, multiply-accumulates and the S9 constraint checks, derived from the
model as built.

The model is traced to a jaxpr (its canonical `lax` form, eval mode) and the jaxpr is
walked in data-flow order: every convolution adds (effective kernel - 1) x jump to the
receptive field of its input, and multiplies the jump by its stride; every other op
passes on the largest receptive field of its inputs (a residual add takes the wider
branch). A convolution's multiply-accumulates are its output pixels times its kernel's
size (input channels per group). Nothing is typed beside the layers, so the numbers are
those of the network that trains.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

MAX_PARAMS = 200_000   # Strictly fewer.
MIN_RF = 44            # Strictly more.
_SUBJAXPR_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


@dataclasses.dataclass
class Layer:
  name: str
  op: str
  kernel: int
  stride: int
  dilation: int
  groups: int
  out_shape: tuple
  params: int
  rf: int
  jump: int

  @property
  def macs(self) -> int:
    """Multiply-accumulates for one image: output pixels x kernel size (`params`)."""
    return self.out_shape[1] * self.out_shape[2] * self.params


@dataclasses.dataclass
class Report:
  layers: list[Layer]
  total_params: int
  rf: int
  has_separable: bool
  has_dilated: bool
  has_gap: bool
  has_max_pool: bool

  @property
  def total_macs(self) -> int:
    """The convolutions' multiply-accumulates for one image's forward pass: what sets a
    step's time on a CPU, where the parameter count does not (a parameter at 32x32 costs
    64x one at 4x4)."""
    return sum(l.macs for l in self.layers)

  def checks(self) -> dict[str, bool]:
    return {
        f"params < {MAX_PARAMS:,}": self.total_params < MAX_PARAMS,
        f"receptive field > {MIN_RF}": self.rf > MIN_RF,
        "has a depthwise-separable conv": self.has_separable,
        "has a dilated conv": self.has_dilated,
        "uses global average pooling": self.has_gap,
        "no max pooling": not self.has_max_pool,
    }

  @property
  def passed(self) -> bool:
    return all(self.checks().values())

  def failures(self) -> list[str]:
    return [name for name, ok in self.checks().items() if not ok]

  def format(self) -> str:
    head = ("layer", "op", "k", "s", "d", "groups", "output", "params", "MACs", "RF", "jump")
    rows = [(l.name, l.op, str(l.kernel), str(l.stride), str(l.dilation), str(l.groups),
             "x".join(map(str, l.out_shape[1:])), f"{l.params:,}", f"{l.macs:,}", str(l.rf),
             str(l.jump))
            for l in self.layers]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    out = [line(head), line(tuple("-" * w for w in widths))] + [line(r) for r in rows]
    out.append(f"total params {self.total_params:,} (all layers, BatchNorm included); "
               f"receptive field {self.rf}")
    out.append(f"forward {self.total_macs:,} multiply-accumulates (MACs) per image in the "
               "convolutions; a train step does ~3x")
    out += [f"  {'PASS' if ok else 'FAIL'}  {name}" for name, ok in self.checks().items()]
    return "\n".join(out)


def _conv_op(kernel, dilation, stride, groups, in_channels):
  if groups > 1 and groups == in_channels:
    kind = "depthwise"
  elif kernel == 1:
    kind = "pointwise"
  else:
    kind = "conv"
  if dilation > 1:
    kind = "dilated " + kind
  if stride > 1:
    kind += " strided"
  return kind


def _spatial_shape(eqn, infos) -> tuple:
  """The shape of the one feature-map input of `eqn` (the first, if several)."""
  return next(v.aval.shape for v, info in zip(eqn.invars, infos) if info is not None)


class _Walker:
  """Data-flow walk of a jaxpr carrying, per value, (receptive field, jump) for
  spatial activations and a flag for 'direct output of a depthwise conv'."""

  def __init__(self, conv_names):
    self.conv_names = list(conv_names)
    self.layers: list[Layer] = []
    self.has_separable = self.has_gap = self.has_max_pool = False
    self.final_rf = 1

  def walk(self, jaxpr, in_infos):
    env = {}
    read = lambda v: None if isinstance(v, jax.extend.core.Literal) else env.get(v)
    for var, info in zip(jaxpr.invars, in_infos):
      env[var] = info
    for eqn in jaxpr.eqns:
      infos = [read(v) for v in eqn.invars]
      sub = next((eqn.params[k] for k in _SUBJAXPR_PARAMS if k in eqn.params), None)
      if eqn.primitive.name == "conv_general_dilated":
        out = self._conv(eqn, infos[0])
      elif sub is not None:
        sub = getattr(sub, "jaxpr", sub)
        outs = self.walk(sub, infos[-len(sub.invars):] if sub.invars else [])
        for var, info in zip(eqn.outvars, outs):
          env[var] = info
        continue
      else:
        out = self._other(eqn, infos)
      for var in eqn.outvars:
        env[var] = out
    return [read(v) for v in jaxpr.outvars]

  def _conv(self, eqn, info):
    rf, jump, _ = info or (1, 1, False)
    lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    kernel = rhs[0]  # HWIO; S9 kernels are square.
    stride = eqn.params["window_strides"][0]
    dilation = (eqn.params["rhs_dilation"] or (1,))[0]
    groups = eqn.params["feature_group_count"]
    out_rf = rf + ((kernel - 1) * dilation) * jump
    out_jump = jump * stride
    op = _conv_op(kernel, dilation, stride, groups, lhs[-1])
    if kernel == 1 and groups == 1 and info is not None and info[2]:
      self.has_separable = True
      op = "pointwise (separable)"
    name = self.conv_names.pop(0) if self.conv_names else f"conv{len(self.layers)}"
    out_shape = tuple(eqn.outvars[0].aval.shape)
    # HWIO, I being the input channels per group: the kernel's size is its params.
    self.layers.append(Layer(name, op, kernel, stride, dilation, groups, out_shape,
                             int(np.prod(rhs)), out_rf, out_jump))
    if out_shape[1] > 1 or out_shape[2] > 1:
      self.final_rf = max(self.final_rf, out_rf)
    return (out_rf, out_jump, groups > 1 and groups == lhs[-1])

  def _other(self, eqn, infos):
    spatial = [i for i in infos if i is not None]
    if not spatial:
      return None
    name = eqn.primitive.name
    axes = set(eqn.params.get("axes", ()))
    # Windowed max pooling (nn.max_pool) or a global max over the spatial axes.
    if name == "reduce_window_max" or (name == "reduce_max" and axes & {1, 2}):
      self.has_max_pool = True
    if name in ("reduce_sum", "reduce_mean") and {1, 2} <= axes:
      self.has_gap = True
    best = max(spatial, key=lambda i: i[0])
    # A depthwise output stays "depthwise" through per-pixel ops on it alone (BatchNorm's
    # scale and shift, ReLU, a cast: MobileNet's depthwise -> BN -> ReLU -> pointwise is
    # still a separable conv), not through anything that mixes it with another feature
    # map (a residual add) or changes its shape (pooling, a reshape).
    same_shape = all(o.aval.shape == _spatial_shape(eqn, infos) for o in eqn.outvars)
    keeps_depthwise = len(spatial) == 1 and best[2] and same_shape
    return (best[0], best[1], keeps_depthwise)


def analyse(model: nn.Module, image_shape=(32, 32, 3)) -> Report:
  """Traces `model` (which should use conv_impl='lax') on one image of `image_shape`."""
  x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
  variables = jax.eval_shape(
      lambda x: model.init({"params": jax.random.PRNGKey(0)}, x, train=False), x)
  conv_names: list[str] = []

  def record_convs(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
      conv_names.append("/".join(context.module.path))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record_convs):
    closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
  walker = _Walker(conv_names)
  n_var_leaves = len(jax.tree.leaves(variables))
  walker.walk(closed.jaxpr, [None] * n_var_leaves + [(1, 1, False)])
  total = sum(math.prod(p.shape) for p in jax.tree.leaves(variables["params"]))
  return Report(layers=walker.layers, total_params=total, rf=walker.final_rf,
                has_separable=walker.has_separable,
                has_dilated=any(l.dilation > 1 for l in walker.layers),
                has_gap=walker.has_gap, has_max_pool=walker.has_max_pool)


def analyse_config(config) -> Report:
  from s9jax import models
  size = config.augment.image_size
  return analyse(models.create_model(config.model, conv_impl="lax"), (size, size, 3))
