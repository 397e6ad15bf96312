"""Parameter counts pinned, shapes, and that the network is the one the config names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s9jax import models, native
from tests.conftest import load_config
from tests.test_ops import NATIVE, native_kernels  # noqa: F401  The marker's fixture.


def param_count(config) -> int:
  model = models.create_model(config.model, conv_impl="lax")
  variables = jax.eval_shape(lambda x: model.init({"params": jax.random.PRNGKey(0)}, x),
                             jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  return sum(p.size for p in jax.tree.leaves(variables["params"]))


def test_seed_has_the_reference_parameter_count():
  assert param_count(load_config("seed")) == 198_776


@pytest.mark.parametrize("name,params", [
    ("base", 190_738), ("fast", 190_738), ("best", 190_738), ("tiny", 59_706)])
def test_s9net_parameter_count_is_pinned(name, params):
  assert param_count(load_config(name)) == params


def test_fast_network_is_the_base_network_with_the_stride_moved_into_the_stem():
  # base.py's stride-2 dilation-2 conv reads only the stem's even pixels; fast.py computes
  # just those. In inference mode (BatchNorm a per-channel affine) the outputs are equal
  # for the same variables; in training the statistics cover those pixels only.
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  base = models.create_model(load_config("base").model, conv_impl="lax")
  fast_model = load_config("fast").model
  # Its precision, not its geometry: tested below.
  fast_model.pointwise_bf16 = fast_model.dense_bf16 = False
  fast = models.create_model(fast_model, conv_impl="lax")
  variables = base.init({"params": jax.random.PRNGKey(1)}, x)
  assert (jax.tree.structure(fast.init({"params": jax.random.PRNGKey(1)}, x))
          == jax.tree.structure(variables))
  keys = iter(jax.random.split(jax.random.PRNGKey(2), 100))
  variables["batch_stats"] = jax.tree_util.tree_map_with_path(  # Not a fresh init's identity.
      lambda path, v: (v * jnp.exp(0.3 * jax.random.normal(next(keys), v.shape))
                       if path[-1].key == "var" else 0.1 * jax.random.normal(next(keys), v.shape)),
      variables["batch_stats"])

  def features(model):  # The map GAP pools: O(1) values, unlike the fresh logits.
    _, state = model.apply(variables, x, mutable=["intermediates"])
    return state["intermediates"]["features"][0]

  expected = features(base)
  assert expected.shape == (2, 4, 4, 160) and jnp.std(expected) > 0.1
  np.testing.assert_allclose(features(fast), expected, rtol=1e-4, atol=1e-4)


def test_logits_shape_and_train_mode_updates_batch_stats():
  # The seed network's: in tests/test_ops.py (the same checks, and against lax).
  config = load_config("base")
  model = models.create_model(config.model)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
  variables = model.init({"params": jax.random.PRNGKey(1)}, x)
  logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                rngs={"dropout": jax.random.PRNGKey(2)})
  assert logits.shape == (4, 10)
  before, after = jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(updates)
  assert any(not jnp.allclose(a, b) for a, b in zip(before, after))


def test_unknown_model_name_is_a_clear_error():
  config = load_config("base")
  config.model.name = "resnet"
  with pytest.raises(ValueError, match="unknown model.name 'resnet'"):
    models.create_model(config.model)


def test_bfloat16_computes_in_bf16_and_keeps_float32_params_and_statistics():
  config = load_config("base")
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
  full = models.create_model(config.model)
  variables = full.init({"params": jax.random.PRNGKey(1)}, x)
  config.model.dtype = "bfloat16"
  mixed = models.create_model(config.model)
  logits, updates = mixed.apply(variables, x, train=True, mutable=["batch_stats"],
                                rngs={"dropout": jax.random.PRNGKey(2)})
  # Same parameter tree, so checkpoints move between precisions.
  assert jax.tree.structure(mixed.init({"params": jax.random.PRNGKey(1)}, x)) == \
      jax.tree.structure(variables)
  assert logits.dtype == jnp.float32
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(updates))
  reference = full.apply(variables, x, train=True, mutable=["batch_stats"],
                         rngs={"dropout": jax.random.PRNGKey(2)})[0]
  error = float(jnp.max(jnp.abs(logits - reference)) / jnp.max(jnp.abs(reference)))
  assert 0 < error < 0.1  # bf16 rounding through 10-20 layers: not bit-equal, not far.
  jaxpr = str(jax.make_jaxpr(lambda v: mixed.apply(v, x))(variables))
  assert "bf16[4,32,32" in jaxpr


def test_unknown_dtype_is_a_clear_error():
  config = load_config("base")
  config.model.dtype = "float16"
  with pytest.raises(ValueError, match="model.dtype must be one of"):
    models.create_model(config.model)


@pytest.mark.parametrize("activation", ["silu", "hardswish"])
def test_activation_follows_every_batchnorm(monkeypatch, activation):
  config = load_config("tiny")
  config.model.activation = activation
  calls = []
  chosen = models.ACTIVATIONS[activation]
  monkeypatch.setitem(models.ACTIVATIONS, activation,
                      lambda y: calls.append(y.shape) or chosen(y))
  monkeypatch.setitem(models.ACTIVATIONS, "relu", lambda y: pytest.fail("relu called"))
  model = models.create_model(config.model, conv_impl="lax")
  variables = jax.eval_shape(lambda x: model.init({"params": jax.random.PRNGKey(0)}, x),
                             jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  norms = [k for k in jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0]
           if k[0][-1].key == "mean"]
  assert len(calls) == len(norms) == 16  # Stem, 3 downsamplings, 6 blocks of 2.


def test_hardswish_is_mobilenet_v3s():
  # x * relu6(x + 3) / 6: zero below -3, x above 3, x (x + 3) / 6 between.
  x = jnp.array([-5.0, -3.0, -1.5, 0.0, 1.5, 3.0, 5.0])
  expected = jnp.array([0.0, 0.0, -0.375, 0.0, 1.125, 3.0, 5.0])
  np.testing.assert_allclose(models.ACTIVATIONS["hardswish"](x), expected, atol=1e-6)


def test_unknown_activation_is_a_clear_error():
  config = load_config("tiny")
  config.model.activation = "gelu"
  with pytest.raises(ValueError, match="model.activation must be one of"):
    models.create_model(config.model)


@pytest.mark.parametrize("impl", ["lax", "fast"])
def test_residual_activation_follows_the_sum_or_the_branch(impl):
  # The same variables (same names) in both forms; 'sum' applies ReLU to x + branch, so
  # a block's output is never negative; 'branch' adds a non-negative branch to x, so
  # its output is never below x. A negative input tells them apart.
  x = -jnp.abs(jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 16))) - 1.0
  blocks = {form: models.ResidualSeparable(residual_activation=form, conv_impl=impl)
            for form in models.RESIDUAL_ACTIVATIONS}
  variables = blocks["branch"].init({"params": jax.random.PRNGKey(1)}, x)
  assert (jax.tree.structure(blocks["sum"].init({"params": jax.random.PRNGKey(1)}, x))
          == jax.tree.structure(variables))
  branch = blocks["branch"].apply(variables, x)
  summed = blocks["sum"].apply(variables, x)
  assert jnp.all(branch >= x) and jnp.any(branch < 0)
  assert jnp.all(summed >= 0) and jnp.any(summed > 0)
  # With x < 0 everywhere: where the branch's BatchNorm output y is positive both are
  # x + y, rectified after the sum; where it is not, 'branch' gives x and 'sum' 0.
  np.testing.assert_allclose(summed, jax.nn.relu(branch), atol=1e-5)


@pytest.mark.parametrize("impl", ["lax", "fast", pytest.param("native", marks=NATIVE)])
@pytest.mark.parametrize("form", models.RESIDUAL_ACTIVATIONS)
def test_zero_init_residual_starts_each_block_as_the_identity(impl, form):
  # A block's input is a ReLU's output, so non-negative; in training mode (batch
  # statistics), as at the first step.
  x = jnp.abs(jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 16)))
  for zero_init in (True, False):
    block = models.ResidualSeparable(residual_activation=form, zero_init_residual=zero_init,
                                     conv_impl=impl)
    variables = block.init({"params": jax.random.PRNGKey(1)}, x, train=True)
    y, _ = block.apply(variables, x, train=True, mutable=["batch_stats"])
    scales = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(
        variables["params"])[0] if path[-1].key == "scale"]
    assert len(scales) == 2 and np.all(np.asarray(scales[0]) == 1)  # The middle one.
    if zero_init:
      assert np.all(np.asarray(scales[1]) == 0)
      np.testing.assert_allclose(y, x, atol=1e-6)
    else:
      assert np.abs(np.asarray(y) - np.asarray(x)).max() > 0.1


def test_zero_init_residual_reaches_every_block_of_the_network():
  config = load_config("tiny")
  config.model.zero_init_residual = True
  model = models.create_model(config.model, conv_impl="lax")
  params = model.init({"params": jax.random.PRNGKey(0)},
                      jnp.zeros((1, 32, 32, 3)))["params"]
  zeroed = [path for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
            if path[-1].key == "scale" and np.all(np.asarray(leaf) == 0)]
  assert len(zeroed) == 6  # Two blocks at 32x32, four in the stages: one BatchNorm each.
  assert param_count(config) == 59_706


@pytest.mark.parametrize("key,value,message", [
    ("residual_activation", "both", "model.residual_activation must be one of"),
    ("eca_kernel", -3, "model.eca_kernel must be >= 0")])
def test_unknown_block_option_is_a_clear_error(key, value, message):
  config = load_config("tiny")
  config.model[key] = value
  with pytest.raises(ValueError, match=message):
    models.create_model(config.model)


def test_channel_attention_scales_each_channel_by_a_conv_over_pooled_channels():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 7))
  layer = models.ChannelAttention(kernel=3)
  variables = layer.init(jax.random.PRNGKey(1), x)
  taps = np.asarray(variables["params"]["kernel"])
  assert taps.shape == (3,) and np.any(taps != 0)
  gates = [1 / (1 + np.exp(-np.correlate(image.mean((0, 1)), taps, "same")))
           for image in np.asarray(x)]
  expected = np.asarray(x) * np.stack(gates)[:, None, None, :]
  np.testing.assert_allclose(layer.apply(variables, x), expected, rtol=1e-5, atol=1e-6)


def test_eca_adds_its_taps_to_every_residual_block():
  config = load_config("tiny")
  config.model.eca_kernel = 3
  assert param_count(config) == 59_706 + 6 * 3  # Two blocks at 32x32, four in the stages.


@pytest.mark.parametrize("amd_bf16,amx", [(False, False), (True, False), (False, True),
                                           (True, True)])
def test_auto_bf16_is_bfloat16_where_its_products_run_faster(monkeypatch, amd_bf16, amx):
  # The C++ kernels: on an AMD CPU with AVX512-BF16, and where they run on AMX tiles.
  # XLA's convs: on GPU and TPU, not on a CPU. True and False stay as they are.
  monkeypatch.setattr(native, "bf16_products_faster", lambda: amd_bf16)
  monkeypatch.setattr(native, "bf16_on_amx", lambda: amx)
  for key in ("pointwise_bf16", "dense_bf16"):
    assert models.resolve_bf16(key, "auto", "native") is (amd_bf16 or amx)
  for key in ("pointwise_bf16", "dense_bf16"):
    assert models.resolve_bf16(key, True, "native") is True
    assert models.resolve_bf16(key, False, "native") is False
    for impl in ("lax", "fast"):
      assert models.resolve_bf16(key, "auto", impl) is (jax.default_backend() != "cpu")
  with pytest.raises(ValueError, match="model.dense_bf16 must be True, False or 'auto'"):
    models.resolve_bf16("dense_bf16", "bfloat16", "native")
  config = load_config("fast").model
  assert config.pointwise_bf16 == config.dense_bf16 == "auto"
  net = models.create_model(config, conv_impl="lax")
  assert net.pointwise_bf16 is net.dense_bf16 is (jax.default_backend() != "cpu")


@pytest.mark.parametrize("impl", ["lax", "fast", pytest.param("native", marks=NATIVE)])
def test_dense_bf16_rounds_the_dense_convs_after_the_stem_on_every_path(impl):
  # base.py's network, whose one dense conv after the stem (Conv_1, 24 -> 48, stride 2,
  # dilation 2) is the only one to change: the same parameters as float32's; the first
  # stage's output within bfloat16's rounding of float32's, and not equal. Rounding the
  # stem would change the stem's output too.
  config = load_config("base").model
  config.conv_impl = impl
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  nets = {}
  for bf16 in (False, True):
    config.dense_bf16 = bf16
    nets[bf16] = models.create_model(config)
  variables = nets[False].init({"params": jax.random.PRNGKey(1)}, x)
  assert (jax.tree.structure(nets[True].init({"params": jax.random.PRNGKey(1)}, x))
          == jax.tree.structure(variables))
  outputs = {}
  for bf16, net in nets.items():
    _, state = net.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    outputs[bf16] = {name: state["intermediates"][name]["__call__"][0].astype(jnp.float32)
                     for name in ("Conv_0", "Conv_1")}
  np.testing.assert_array_equal(outputs[True]["Conv_0"], outputs[False]["Conv_0"])
  float32, bf16 = outputs[False]["Conv_1"], outputs[True]["Conv_1"]
  error = float(jnp.abs(bf16 - float32).max()) / float(jnp.abs(float32).max())
  assert 1e-4 < error < 2e-2


@pytest.mark.parametrize("impl", ["lax", pytest.param("native", marks=NATIVE)])
def test_pointwise_bf16_rounds_the_separable_1x1_on_every_path(impl):
  # The same parameters as float32's; the output within bfloat16's rounding (8
  # significant bits; the lax path rounds its output too) of float32's, and not equal.
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 48))
  convs = {bf16: models.SeparableConv(64, conv_impl=impl, pointwise_bf16=bf16)
           for bf16 in (False, True)}
  variables = convs[False].init({"params": jax.random.PRNGKey(1)}, x)
  assert (jax.tree.structure(convs[True].init({"params": jax.random.PRNGKey(1)}, x))
          == jax.tree.structure(variables))
  float32, bf16 = (convs[b].apply(variables, x) for b in (False, True))
  assert bf16.dtype == jnp.float32
  error = float(jnp.abs(bf16 - float32).max()) / float(jnp.abs(float32).max())
  assert 1e-4 < error < 2e-2
