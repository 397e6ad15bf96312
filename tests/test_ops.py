"""Every fast convolution the models use equals lax.conv_general_dilated, outputs and
gradients, and whole models give the same logits with either implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from s9jax import models, ops
from tests.conftest import load_config

DN = ("NHWC", "HWIO", "NHWC")
# (kernel, in, out, groups, stride, dilation, padding): every form in seed and s9net.
VARIANTS = [
    (3, 8, 8, 8, 1, 1, 1),      # depthwise 'same'
    (3, 8, 8, 8, 1, 1, 2),      # depthwise, seed's padding 2 (map grows)
    (3, 8, 8, 8, 2, 2, 2),      # dilated strided depthwise (s9net downsampling)
    (3, 8, 8, 8, 1, 2, 2),      # dilated depthwise
    (1, 8, 12, 1, 1, 1, 0),     # pointwise
    (3, 3, 12, 1, 1, 1, 1),     # stem
    (3, 3, 12, 1, 1, 1, 2),     # seed's first conv
    (3, 8, 12, 1, 2, 2, 2),     # dilated strided conv (both networks)
    (3, 8, 12, 1, 2, 1, 2),     # seed's last strided conv
    (3, 8, 12, 1, 2, 1, "SAME"),
    (3, 8, 12, 1, 2, 2, "VALID"),
]


@pytest.mark.parametrize("kernel,cin,cout,groups,stride,dilation,padding", VARIANTS)
def test_fast_conv_matches_lax(kernel, cin, cout, groups, stride, dilation, padding):
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
  y_fast, (gx_fast, gw_fast) = run(ops.fast_conv_general_dilated)
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


def test_auto_picks_fast_on_cpu_and_rejects_unknown():
  assert ops.resolve("auto") == ("fast" if jax.default_backend() == "cpu" else "lax")
  with pytest.raises(ValueError, match="conv implementation"):
    ops.resolve("cudnn")


@pytest.mark.parametrize("name", ["seed", "base"])
def test_models_same_logits_and_grads_with_either_implementation(name):
  config = load_config(name)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  fast = models.create_model(config.model, conv_impl="fast")
  canonical = models.create_model(config.model, conv_impl="lax")
  variables = canonical.init({"params": jax.random.PRNGKey(1)}, x, train=False)
  # Same parameter tree: a checkpoint trained with one runs with the other.
  assert (jax.tree.structure(fast.init({"params": jax.random.PRNGKey(1)}, x, train=False))
          == jax.tree.structure(variables))

  def loss(params, model):
    out = model.apply({**variables, "params": params}, x, train=False)
    return jnp.sum(out ** 2), out

  (_, out_fast), g_fast = jax.value_and_grad(loss, has_aux=True)(variables["params"], fast)
  (_, out_lax), g_lax = jax.value_and_grad(loss, has_aux=True)(variables["params"], canonical)
  np.testing.assert_allclose(out_fast, out_lax, rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_lax)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
