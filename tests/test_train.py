"""The real train step, checkpoints, loop and CLIs, on tiny data."""

import contextlib
import functools
import json
import logging
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s9jax import inference, input_pipeline, native, train
from tests.conftest import ROOT, load_config, tiny_config


def tiny_state(config):
  return train.create_train_state(config, jax.random.PRNGKey(0),
                                  train.create_learning_rate_fn(config, 10))


def test_train_steps_lower_the_loss_on_a_fixed_batch(tiny_archive, tmp_path):
  config = tiny_config(tiny_archive, tmp_path, learning_rate=0.05, schedule="constant")
  state = tiny_state(config)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
           "label": rng.integers(0, 10, 16).astype(np.int32)}
  losses = []
  for _ in range(15):
    state, metrics = train.train_step(state, batch, jax.random.PRNGKey(1))
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 15
  assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


def test_mixup_weight_keeps_the_larger_share_for_each_images_own_label():
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  a = np.asarray(jax.vmap(lambda k: train.mixup_weight(k, 1.0))(keys))
  assert a.min() >= 0.5 and a.max() <= 1.0
  # Beta(1, 1) is uniform, so max(u, 1 - u) is uniform on [1/2, 1]: mean 3/4.
  assert abs(a.mean() - 0.75) < 0.01, a.mean()
  # A small alpha draws weights near 0 or 1, folded to near 1.
  small = np.asarray(jax.vmap(lambda k: train.mixup_weight(k, 0.1))(keys))
  assert np.median(small) > 0.95


def test_mixup_step_trains_on_each_image_mixed_with_its_neighbour(tiny_archive, tmp_path,
                                                                   monkeypatch):
  """The step's loss is a * CE(own label) + (1 - a) * CE(the neighbour's) on the mixed
  images, with label smoothing applied to both targets; accuracy counts own labels."""
  config = tiny_config(tiny_archive, tmp_path)
  state = tiny_state(config)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(6, 32, 32, 3)).astype(np.float32)
  labels = np.array([3, 1, 4, 1, 5, 9], np.int32)
  monkeypatch.setattr(train, "mixup_weight", lambda key, alpha: jnp.float32(0.7))
  step = jax.jit(functools.partial(train._train_step, loss_options=train.LossOptions(0.1, 0.4)))
  _, metrics = step(state, {"image": images, "label": labels}, jax.random.PRNGKey(1))

  mixed = 0.7 * images + 0.3 * images[[5, 0, 1, 2, 3, 4]]
  logits, _ = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                             mixed, train=True, mutable=["batch_stats"])
  own = train.cross_entropy(logits, labels, 0.1)
  neighbour = train.cross_entropy(logits, labels[[5, 0, 1, 2, 3, 4]], 0.1)
  np.testing.assert_allclose(metrics["loss"], np.mean(0.7 * own + 0.3 * neighbour),
                             rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], np.mean(np.argmax(logits, -1) == labels))


def test_onecycle_schedule_warms_up_then_decays_to_zero():
  config = load_config("base")
  fn = train.create_learning_rate_fn(config, steps_per_epoch=100)
  warmup = int(config.warmup_epochs * 100)
  assert float(fn(0)) == pytest.approx(config.learning_rate / 10)
  assert float(fn(warmup)) == pytest.approx(config.learning_rate)
  assert float(fn(config.num_epochs * 100)) == pytest.approx(0.0, abs=1e-7)


def test_weight_decay_touches_conv_kernels_only(tiny_archive, tmp_path):
  config = tiny_config(tiny_archive, tmp_path, learning_rate=0.1, momentum=0.0,
                       weight_decay=0.5, schedule="constant")
  state = tiny_state(config)
  zero_grads = jax.tree.map(jnp.zeros_like, state.params)
  after = jax.jit(lambda state: state.apply_gradients(grads=zero_grads).params)(state)
  flat_before = jax.tree_util.tree_leaves_with_path(state.params)
  for (path, old), new in zip(flat_before, jax.tree.leaves(after)):
    if path[-1].key == "kernel":
      np.testing.assert_allclose(new, old * (1 - 0.1 * 0.5), rtol=1e-6)
    else:
      np.testing.assert_array_equal(new, old)


@pytest.mark.parametrize("frozen", [True, False])
def test_batchnorm_biases_learn_faster_and_scales_can_freeze(tiny_archive, tmp_path, frozen):
  """airbench's BatchNorm recipe: biases at bn_bias_lr_scale x the rate, scales fixed;
  every other parameter (the classifier's bias too) steps and decays as before."""
  config = tiny_config(tiny_archive, tmp_path, learning_rate=0.1, momentum=0.0,
                       weight_decay=0.5, schedule="constant", bn_bias_lr_scale=8.0,
                       bn_scale_frozen=frozen)
  state = tiny_state(config)
  grads = jax.tree.map(jnp.ones_like, state.params)
  after = jax.jit(lambda state: state.apply_gradients(grads=grads).params)(state)
  flat_before = jax.tree_util.tree_leaves_with_path(state.params)
  groups = set()
  for (path, old), new in zip(flat_before, jax.tree.leaves(after)):
    name = jax.tree_util.keystr(path)
    if "BatchNorm" in name and path[-1].key == "bias":
      groups.add("bn_bias")
      np.testing.assert_allclose(new, old - 8.0 * 0.1, rtol=1e-6)
    elif "BatchNorm" in name:
      groups.add("bn_scale")
      np.testing.assert_allclose(new, old if frozen else old - 0.1, rtol=1e-6)
    elif path[-1].key == "kernel":
      groups.add("kernel")
      np.testing.assert_allclose(new, old * (1 - 0.1 * 0.5) - 0.1, rtol=1e-5, atol=1e-7)
    else:
      groups.add(name)
      np.testing.assert_allclose(new, old - 0.1, rtol=1e-6)
  assert groups == {"bn_bias", "bn_scale", "kernel", "['Conv_2']['bias']"}


def test_muon_steps_hidden_kernels_by_orthogonal_updates_at_held_norms(tiny_archive, tmp_path):
  """optimizer='muon': every hidden conv kernel takes an orthogonalised step of the Muon
  rate and is rescaled to norm sqrt(out); a depthwise kernel is one 9-tap map per
  channel; the classifier and BatchNorm keep SGD's step and decay."""
  config = tiny_config(tiny_archive, tmp_path, learning_rate=0.1, momentum=0.0,
                       weight_decay=0.5, schedule="constant", optimizer="muon",
                       muon_learning_rate=0.5)
  state = tiny_state(config)
  depthwise = ("ResidualSeparable_0", "SeparableConv_0", "depthwise")
  grads = jax.tree.map(jnp.ones_like, state.params)
  module = lambda tree: functools.reduce(lambda node, key: node[key], depthwise, tree)
  taps = np.arange(9, dtype=np.float32).reshape(3, 3) - 4
  channels = np.zeros(module(state.params)["kernel"].shape, np.float32)
  channels[:, :, 0, 0], channels[:, :, 0, 1] = taps, 100 * taps  # Same direction, 100x.
  module(grads)["kernel"] = jnp.asarray(channels)
  after = jax.jit(lambda state: state.apply_gradients(grads=grads).params)(state)
  seen = set()
  for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(state.params),
                              jax.tree.leaves(after)):
    keys = tuple(k.key for k in path)
    if keys[-1] == "kernel" and old.shape[-1] != 10:
      seen.add("hidden kernel")
      assert float(jnp.linalg.norm(new)) == pytest.approx(np.sqrt(old.shape[-1]), rel=1e-5)
    elif keys[-1] == "kernel":  # The classifier.
      seen.add("classifier")
      np.testing.assert_allclose(new, old * (1 - 0.1 * 0.5) - 0.1, rtol=1e-5, atol=1e-7)
    else:
      np.testing.assert_allclose(new, old - 0.1, rtol=1e-6)
    if keys == depthwise + ("kernel",):
      seen.add("depthwise")
      old, new = np.asarray(old)[:, :, 0], np.asarray(new)[:, :, 0]
      rescale = new[..., 2:] / old[..., 2:]  # Channels without a gradient only rescale,
      np.testing.assert_allclose(rescale, rescale.flat[0], rtol=1e-4)  # all by one factor.
      steps = new[..., :2] / rescale.flat[0] - old[..., :2]
      norms = np.linalg.norm(steps.reshape(9, 2), axis=0)
      # Each channel's own step: against its gradient, of the rate's size whatever the
      # gradient's (Newton-Schulz leaves singular values within ~0.7-1.2 of 1).
      np.testing.assert_allclose(norms[0], norms[1], rtol=1e-4)
      assert 0.5 * 0.6 < norms[0] < 0.5 * 1.3
      for c in range(2):
        np.testing.assert_allclose(steps[..., c] / norms[c], -taps / np.linalg.norm(taps),
                                   atol=1e-4)
  assert seen == {"hidden kernel", "classifier", "depthwise"}


def test_whitened_stem_decorrelates_patches_and_stays_frozen_in_training(tiny_archive, tmp_path):
  rng = np.random.default_rng(0)
  noise = rng.normal(size=(300, 36, 36, 3))  # Neighbouring pixels correlated, as in photos.
  images = np.clip(128 + 40 * (noise[:, :32, :32] + noise[:, 1:33, 1:33] + noise[:, 2:34, :32]),
                   0, 255).astype(np.uint8)
  mean, std = input_pipeline.channel_stats(images)
  kernel = train.whitening_kernel(images, mean, std, width=24)
  assert kernel.shape == (3, 3, 3, 24)
  np.testing.assert_array_equal(kernel[..., 12:], -kernel[..., :12])
  x = (images.astype(np.float32) / 255 - mean) / std
  out = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(np.cov(np.asarray(out)[..., :12].reshape(-1, 12).T), np.eye(12),
                             atol=0.05)
  # A run starts from that kernel (of its own training images) and never moves it.
  config = tiny_config(tiny_archive, tmp_path / "tfds", whiten_stem=True, plots=False,
                       **{"model.stem_width": 8})
  train.train_and_evaluate(config, tmp_path / "work")
  manager = train.checkpoint_manager(tmp_path / "work", 3)
  state, _ = train.restore_checkpoint(manager, manager.latest_step(), tiny_state(config))
  images, _ = input_pipeline.load_split(config.data, "train")
  mean, std = input_pipeline.channel_stats(images)
  np.testing.assert_allclose(state.params["Conv_0"]["kernel"],
                             train.whitening_kernel(images, mean, std, width=8), rtol=1e-6)
  assert int(state.step) == 3  # Three SGD steps (30 images, batch 10) left it as it was.
  manager.close()


def test_lookahead_pulls_slow_weights_every_n_steps_and_ends_on_them(tiny_archive, tmp_path):
  config = tiny_config(tiny_archive, tmp_path, learning_rate=0.05, schedule="constant")
  with_lookahead = tiny_config(tiny_archive, tmp_path, learning_rate=0.05, schedule="constant",
                               lookahead_every=2)
  lr_fn = train.create_learning_rate_fn(config, 10)
  plain = train.create_train_state(config, jax.random.PRNGKey(0), lr_fn)
  state = train.create_train_state(with_lookahead, jax.random.PRNGKey(0), lr_fn, total_steps=4)
  # Without lookahead the state's tree is what checkpoints have always held, so those
  # written before lookahead existed still restore.
  top = lambda tree: {path[0].name for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
  assert top(plain) == {"step", "params", "opt_state", "batch_stats"}
  assert top(state) == {"step", "params", "opt_state", "batch_stats", "slow"}
  start = jax.device_get(state.params)
  rng = np.random.default_rng(0)
  batches = [{"image": rng.normal(size=(10, 32, 32, 3)).astype(np.float32),
              "label": rng.integers(0, 10, 10).astype(np.int32)} for _ in range(4)]
  leaves = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]
  for i, batch in enumerate(batches, start=1):
    plain, _ = train.train_step(plain, batch, jax.random.PRNGKey(1))
    state, _ = train.train_step(state, batch, jax.random.PRNGKey(1))
    if i == 1:  # Not a sync step: the fast weights move alone.
      for a, b in zip(leaves(state.params), leaves(plain.params)):
        np.testing.assert_array_equal(a, b)
      for a, b in zip(leaves(state.slow["params"]), leaves(start)):
        np.testing.assert_array_equal(a, b)
    if i == 2:  # Sync: slow += (1 - 0.95^2 (2/4)^3) (fast - slow); fast restarts from it.
      decay = 0.95 ** 2 * (2 / 4) ** 3
      expected = [s + (1 - decay) * (f - s) for s, f in zip(leaves(start), leaves(plain.params))]
      for a, b, c in zip(leaves(state.params), leaves(state.slow["params"]), expected):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(a, b)
      at_sync = leaves(state.slow["params"])
      plain = plain.replace(params=jax.tree.map(jnp.copy, state.params),
                            batch_stats=jax.tree.map(jnp.copy, state.batch_stats))
  # The last step ends on the slow weights: those of step 2, untouched by steps 3 and 4.
  for a, b in zip(leaves(state.params), at_sync):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(leaves(plain.params)[0], at_sync[0])


def test_recalibrated_batch_stats_are_the_population_statistics(tiny_archive, tmp_path):
  config = tiny_config(tiny_archive, tmp_path)
  state = tiny_state(config)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (53, 32, 32, 3)).astype(np.uint8)
  images = (images // (1 + np.arange(53) // 10)[:, None, None, None]).astype(np.uint8)
  normalize = functools.partial(input_pipeline.normalize_batch, mean=[0.5] * 3, std=[0.25] * 3)
  new = train.recalibrate_batch_stats(state, images, 10, normalize)
  # The stem's BatchNorm normalises the stem conv's output: its statistics are that
  # output's over the 50 images of the 5 whole batches (the 3 left over are not read),
  # although each batch is darker than the one before, so their means differ.
  outputs = jax.lax.conv_general_dilated(
      normalize(images[:50]), state.params["Conv_0"]["kernel"], (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  outputs = np.asarray(outputs, np.float64)
  stem = new.batch_stats["BatchNorm_0"]
  np.testing.assert_allclose(stem["mean"], outputs.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stem["var"], outputs.var((0, 1, 2)), rtol=1e-4, atol=1e-5)
  within = np.mean([outputs[i:i + 10].var((0, 1, 2)) for i in range(0, 50, 10)], axis=0)
  assert np.all(outputs.var((0, 1, 2)) > 1.05 * within)  # The batch means' spread counts.
  for old, recalibrated in zip(jax.tree.leaves(state.batch_stats),
                              jax.tree.leaves(new.batch_stats)):
    assert np.all(np.asarray(old) != np.asarray(recalibrated))  # Every layer, from init.
  assert new.params is state.params and new.step == state.step


def test_bn_recalibrate_runs_once_before_the_last_validation(tiny_archive, tmp_path, monkeypatch):
  config = tiny_config(tiny_archive, tmp_path / "tfds", num_epochs=2, bn_recalibrate=True,
                       plots=False, **{"data.validation_size": 10})
  calls, recalibrate = [], train.recalibrate_batch_stats

  def recorded(state, images, *args):
    calls.append((int(state.step), len(images)))
    result = recalibrate(state, images, *args)
    calls.append(jax.device_get(result.batch_stats))
    return result

  monkeypatch.setattr(train, "recalibrate_batch_stats", recorded)
  records = train.train_and_evaluate(config, tmp_path / "run")
  assert len(calls) == 2 and calls[0] == (records[-1]["step"], 20)  # After the last step.
  _, state, mean, std, _ = inference.restore(tmp_path / "run", "final")
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.batch_stats), calls[1])
  # The last validation read them: evaluated again from the checkpoint, the same figures.
  images, labels = input_pipeline.load_split(config.data, "train")
  (_, _), (val_images, val_labels) = input_pipeline.split_validation(images, labels, 10)
  again, _ = train.evaluate(state, input_pipeline.normalize_batch(val_images, mean, std),
                            val_labels, config.eval_batch_size, flip=False, split="val")
  assert again["val_loss"] == pytest.approx(records[-1]["val_loss"], rel=1e-5)


def test_checkpoint_round_trip_gives_identical_params_and_eval(tiny_archive, tmp_path):
  config = tiny_config(tiny_archive, tmp_path / "tfds")
  state = tiny_state(config)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(10, 32, 32, 3)).astype(np.float32),
           "label": rng.integers(0, 10, 10).astype(np.int32)}
  state, _ = train.train_step(state, batch, jax.random.PRNGKey(0),
                              train.LossOptions(label_smoothing=0.1))
  expected = jax.device_get(state)
  images = rng.normal(size=(12, 32, 32, 3)).astype(np.float32)
  labels = rng.integers(0, 10, 12).astype(np.int32)
  before = train.evaluate(state, images, labels, 8, flip=True)

  manager = train.checkpoint_manager(tmp_path / "work", keep=2)
  manager.save(1, args=train.ocp.args.Composite(
      state=train.ocp.args.StandardSave(state), meta=train.ocp.args.JsonSave({"epoch": 1})),
      metrics={"val_accuracy": 0.5})
  manager.wait_until_finished()
  restored, meta = train.restore_checkpoint(manager, 1, tiny_state(config))
  manager.close()
  assert meta == {"epoch": 1}
  assert type(restored.opt_state) is type(state.opt_state)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(jax.device_get(restored))):
    np.testing.assert_array_equal(a, b)
  after = train.evaluate(restored, images, labels, 8, flip=True)
  assert after[0] == before[0]
  np.testing.assert_array_equal(after[1], before[1])


def test_training_refuses_a_network_that_breaks_the_rules(tiny_archive, tmp_path):
  config = tiny_config(tiny_archive, tmp_path / "tfds", **{"model.widths": (48, 96, 256)})
  with pytest.raises(train.ConfigError, match="params < 200,000"):
    train.train_and_evaluate(config, tmp_path / "work")


def test_workdir_refuses_another_network_or_augmentation_but_not_where_or_how_fast(
    tiny_archive, tmp_path):
  work = tmp_path / "work"
  work.mkdir()
  first = tiny_config(tiny_archive, tmp_path / "tfds", **{"model.stem_width": 16})
  train.check_workdir_config(work, first)  # No config.json yet: anything goes.
  train.write_workdir_config(work, first)
  moved = tiny_config(tiny_archive, tmp_path / "elsewhere", eval_batch_size=4,
                      **{"model.stem_width": 16, "data.workers": 2, "model.conv_impl": "lax",
                         "data.source_path": str(tmp_path / "copy.tar.gz")})
  train.check_workdir_config(work, moved)
  with pytest.raises(train.ConfigError, match="different model.stem_width .*was 16"):
    train.check_workdir_config(work, tiny_config(tiny_archive, tmp_path / "tfds"))
  with pytest.raises(train.ConfigError, match="different augment.hflip_p"):
    train.check_workdir_config(work, tiny_config(tiny_archive, tmp_path / "tfds", **{
        "model.stem_width": 16, "augment.hflip_p": 0.0}))
  # A workdir from before a key existed resumes with the key off, and only so.
  saved = json.loads((work / "config.json").read_text())
  del saved["augment"]["alternate_flip"]
  (work / "config.json").write_text(json.dumps(saved))
  train.check_workdir_config(work, first)
  with pytest.raises(train.ConfigError, match="different augment.alternate_flip .*was False"):
    train.check_workdir_config(work, tiny_config(tiny_archive, tmp_path / "tfds", **{
        "model.stem_width": 16, "augment.alternate_flip": True}))


def test_a_run_that_cannot_start_leaves_the_workdir_usable(tiny_archive, tmp_path):
  work = tmp_path / "work"
  missing = tiny_config(tiny_archive, tmp_path / "tfds",
                        **{"data.source_path": str(tmp_path / "missing.tar.gz")})
  with pytest.raises(input_pipeline.DataError):
    train.train_and_evaluate(missing, work)
  assert not (work / train.CONFIG_FILE).exists()
  records = train.train_and_evaluate(tiny_config(tiny_archive, tmp_path / "tfds", plots=False),
                                     work)
  assert [r["epoch"] for r in records] == [1]


def run_module(module, *args, env=None) -> subprocess.CompletedProcess:
  """`python -m module args` from the checkout, as a user would run it."""
  env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def run_cli(module, *args, env=None):
  result = run_module(module, *args, env=env)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


def tiny_cli_flags(tiny_archive, data_dir, work, *extra):
  """The CLI flags that make configs/base.py:smoke the tiny_config network on tiny data."""
  return ["--config", "configs/base.py:smoke", "--workdir", str(work),
          f"--config.data.source_path={tiny_archive}", f"--config.data.data_dir={data_dir}",
          "--config.data.train_limit=0", "--config.data.test_limit=0",
          "--config.batch_size=10", "--config.eval_batch_size=8",
          "--config.model.stem_width=8", "--config.model.widths=(8,16,16)",
          "--config.model.depths=(1,1,1)", "--config.data.validation_size=0", *extra]


def test_cli_trains_resumes_and_eval_restores_the_same_accuracy(tiny_archive, tmp_path):
  work, cache = tmp_path / "work", tmp_path / "compiled"
  flags = tiny_cli_flags(tiny_archive, tmp_path / "tfds", work)
  out = run_cli("s9jax.train", *flags, f"--compilation_cache_dir={cache}",
                env={"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
  assert "S9 rules PASS" in out and "epoch   1" in out
  assert "backend cpu" in out.splitlines()[0] and "conv_impl 'auto' -> " in out.splitlines()[0]
  for name in ("augmentations.png", "learning_curves.png", "misclassified.png", "config.json"):
    assert (work / name).exists(), name
  # Its compiled programs where it was told, the train step's among them.
  assert any(p.name.startswith("jit__train_step") for p in cache.iterdir())

  out = run_cli("s9jax.train", *flags, "--config.num_epochs=2")
  assert "Resumed from" in out and "epoch   2" in out and "epoch   1 " not in out
  records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in records] == [1, 2]
  assert records[1]["step"] == 2 * records[0]["step"] == 6

  out = run_cli("s9jax.eval", *flags[:4], *flags[4:], "--checkpoint", "latest")
  result = json.loads((work / "eval.json").read_text())
  assert result["epoch"] == 2
  assert result["test_accuracy"] == records[1]["test_accuracy"]
  assert set(result["per_class_accuracy"]) == set(input_pipeline.CLASS_NAMES)
  assert (work / "confusion_matrix.png").exists()


@pytest.mark.parametrize("seed", [0, 101, -1, 5_000_000_000])
def test_run_keys_are_the_eager_keys_for_any_python_int_seed(seed):
  # One jitted program makes them; a run's draws must not depend on that, nor may a
  # seed beyond int32 (which a traced argument would overflow) fail.
  init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(seed))
  augment_rng = jax.random.fold_in(jax.random.PRNGKey(seed), 0xA06)
  for got, want in zip(train.run_keys(seed), (init_rng, dropout_rng, augment_rng)):
    np.testing.assert_array_equal(got, want)


def test_run_header_says_what_auto_bf16_resolved_to(monkeypatch):
  # fast.py asks for 'auto': its first line names the precision this machine gave it.
  fast, base = load_config("fast"), load_config("base")
  for amd_bf16, amx in ((True, False), (False, True), (False, False)):
    monkeypatch.setattr(native, "bf16_products_faster", lambda: amd_bf16)
    monkeypatch.setattr(native, "bf16_on_amx", lambda: amx)
    want = amd_bf16 or amx
    assert (f"pointwise_bf16 'auto' -> {want}, dense_bf16 'auto' -> {want}"
            in train.run_header(fast, "native"))
  fast.model.pointwise_bf16, fast.model.dense_bf16 = True, False
  assert train.run_header(fast, "lax").endswith("; pointwise_bf16 True")
  assert "bf16" not in train.run_header(base, "native")


@pytest.mark.parametrize("override,message", [
    ({"learning_rate": 0.0}, "learning_rate must be > 0"),
    ({"num_epochs": -1}, "num_epochs must be > 0"),
    ({"batch_size": 0}, "batch_size must be > 0"),
    ({"augment.cutout_p": 1.5}, "augment.cutout_p must be in"),
    ({"label_smoothing": 1.0}, "label_smoothing must be in"),
    ({"mixup_alpha": -0.2}, "mixup_alpha must be >= 0"),
    ({"augment.backend": "gpu"}, "augment.backend must be 'albumentations' or 'jax'"),
    ({"progressive_epochs": 1, "progressive_size": 4}, "progressive_size must be in"),
    ({"progressive_epochs": 2, "progressive_size": 16}, "progressive_epochs must be in"),
    ({"data.validation_size": -1}, "validation_size must be >= 0"),
    ({"data.validation_size": 25}, "leaves fewer than one batch of 10"),
    ({"eval_translate": 16}, "eval_translate must be in"),
    ({"model.dense_bf16": "yes"}, "model.dense_bf16 must be True, False or 'auto'"),
])
def test_invalid_values_are_refused_before_any_work(tiny_archive, tmp_path, override, message):
  config = tiny_config(tiny_archive, tmp_path / "tfds", **override)
  with pytest.raises(train.ConfigError, match=message):
    train.train_and_evaluate(config, tmp_path / "work")
  assert not (tmp_path / "work").exists()


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tiny_archive, tmp_path):
  config = tiny_config(tiny_archive, tmp_path / "tfds", num_epochs=1, plots=False)
  work = tmp_path / "work"
  train.train_and_evaluate(config, work)  # One good epoch: checkpoint at step 3.
  config.unlock()
  config.num_epochs, config.learning_rate = 2, float("inf")
  config.lock()
  # Step 4 computes its loss with good weights and an infinite update; step 5's loss is NaN.
  with pytest.raises(train.TrainingDiverged, match=r"at step 5 \(epoch 2\).*checkpoint is step 3"):
    train.train_and_evaluate(config, work)
  assert train.checkpoint_manager(work, 3).all_steps() == [3]


def test_without_a_validation_split_checkpoints_rank_nothing_and_log_no_warning(
    tiny_archive, tmp_path, caplog):
  # Report runs hold no validation split: a best-by-validation tracker there had nothing
  # to rank and made Orbax warn at every epoch's save.
  config = tiny_config(tiny_archive, tmp_path / "tfds", num_epochs=2, checkpoint_keep=1,
                       plots=False)
  with caplog.at_level(logging.WARNING):
    records = train.train_and_evaluate(config, tmp_path / "work")
  assert [m for r in caplog.records if "metrics" in (m := r.getMessage())] == []
  manager = train.checkpoint_manager(tmp_path / "work", 1, track_best=False)
  assert manager.all_steps() == [records[-1]["step"]]
  manager.close()


def test_sigterm_mid_epoch_saves_and_resume_gives_the_same_metrics(tiny_archive, tmp_path, monkeypatch):
  config = tiny_config(tiny_archive, tmp_path / "tfds", num_epochs=2, plots=False,
                       checkpoint_keep=1)
  uninterrupted = train.train_and_evaluate(config, tmp_path / "a")

  real_step, calls = train.train_step_on_host_batch, []

  def step_then_sigterm(*args, **kwargs):
    calls.append(1)
    if len(calls) == 5:  # Epoch 2, step 2 of 3.
      os.kill(os.getpid(), signal.SIGTERM)
    return real_step(*args, **kwargs)

  monkeypatch.setattr(train, "train_step_on_host_batch", step_then_sigterm)
  with pytest.raises(train.Interrupted, match=r"epoch 2, step 2/3: saved checkpoint 5"):
    train.train_and_evaluate(config, tmp_path / "b")
  monkeypatch.setattr(train, "train_step_on_host_batch", real_step)
  resumed = train.train_and_evaluate(config, tmp_path / "b")

  assert without_timings(resumed) == without_timings(uninterrupted)
  # The mid-epoch checkpoint has no metrics: it goes once newer ones exist.
  assert 5 not in train.checkpoint_manager(tmp_path / "b", 1).all_steps()


def without_timings(records):
  return [{k: v for k, v in r.items() if not k.endswith(("_seconds", "_per_second"))}
          for r in records]


def saved_tiny_checkpoint(tiny_archive, tmp_path):
  config = tiny_config(tiny_archive, tmp_path / "tfds")
  manager = train.checkpoint_manager(tmp_path / "work", keep=2)
  manager.save(1, args=train.ocp.args.Composite(
      state=train.ocp.args.StandardSave(tiny_state(config)),
      meta=train.ocp.args.JsonSave({"epoch": 1})), metrics={"val_accuracy": 0.1})
  manager.wait_until_finished()
  return config, manager


def test_checkpoint_of_another_network_is_a_clear_error(tiny_archive, tmp_path):
  _, manager = saved_tiny_checkpoint(tiny_archive, tmp_path)
  wider = tiny_config(tiny_archive, tmp_path / "tfds", **{"model.stem_width": 16})
  with pytest.raises(train.ConfigError, match="does not restore into this config's network"):
    train.restore_checkpoint(manager, 1, tiny_state(wider))


def test_truncated_checkpoint_is_a_clear_error(tiny_archive, tmp_path):
  config, manager = saved_tiny_checkpoint(tiny_archive, tmp_path)
  for path in (tmp_path / "work" / "checkpoints" / "1" / "state").rglob("*"):
    if path.is_file() and path.stat().st_size > 1000:
      path.write_bytes(path.read_bytes()[:100])
  with pytest.raises(train.ConfigError, match="truncated, foreign"):
    train.restore_checkpoint(manager, 1, tiny_state(config))


@pytest.mark.parametrize("module,flag,message", [
    ("s9jax.train", "--config.num_epoch=3",
     "error: unknown config key 'num_epoch' Did you mean \"num_epochs\""),
    ("s9jax.eval", "--config.model.widht=3", "error: unknown config key 'widht'"),
    ("s9jax.train", "--config.num_epochs=abc", "error: flag --config.num_epochs=abc: invalid literal"),
    ("s9jax.summary", "--config.model.widths=(1,2", "error: flag --config.model.widths=(1,2:"),
])
def test_bad_config_flags_are_one_line_errors(module, flag, message, tmp_path):
  workdir = [] if module == "s9jax.summary" else ["--workdir", str(tmp_path / "work")]
  result = run_module(module, "--config", "configs/base.py", *workdir, flag)
  assert result.returncode == 2
  assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
  assert not (tmp_path / "work").exists()


def test_missing_config_file_is_a_one_line_error(tmp_path):
  result = run_module("s9jax.train", "--config", "configs/nope.py", "--workdir", tmp_path / "w")
  assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
  assert "No such file or directory: 'configs/nope.py'" in result.stderr


@pytest.fixture(scope="module")
def uninterrupted_cli_run(tiny_archive, tmp_path_factory):
  """Three epochs of the tiny run through the CLI, never interrupted: the reference."""
  base = tmp_path_factory.mktemp("uninterrupted")
  flags = tiny_cli_flags(tiny_archive, base / "tfds", base / "work",
                         "--config.num_epochs=3", "--config.plots=False")
  run_cli("s9jax.train", *flags)
  return train.read_metrics(base / "work")


@pytest.mark.parametrize("point,n", [
    ("step", 5),         # Epoch 2, step 2 of 3.
    ("checkpoint", 2),   # Epoch 2's checkpoint written, not yet committed.
    ("metrics", 2),      # Epoch 2's checkpoint committed, metrics.jsonl not yet rewritten.
])
def test_kill9_then_rerun_finishes_with_the_uninterrupted_metrics(
    point, n, uninterrupted_cli_run, tiny_archive, tmp_path):
  flags = tiny_cli_flags(tiny_archive, tmp_path / "tfds", tmp_path / "work",
                         "--config.num_epochs=3", "--config.plots=False")
  killed = run_module("tests.kill9", point, n, "--", *flags)
  assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
  checkpoints = tmp_path / "work" / "checkpoints"
  committed = train.checkpoint_manager(tmp_path / "work", 3).all_steps()
  assert committed == {"step": [3], "checkpoint": [3], "metrics": [3, 6]}[point]

  out = run_cli("s9jax.train", *flags)
  assert "Resumed from" in out
  assert without_timings(train.read_metrics(tmp_path / "work")) == without_timings(
      uninterrupted_cli_run)
  assert not [p.name for p in checkpoints.iterdir() if "tmp" in p.name]


def test_checkpoint_write_failure_is_one_line_and_commits_nothing(tiny_archive, tmp_path, monkeypatch):
  config = tiny_config(tiny_archive, tmp_path / "tfds", num_epochs=1, plots=False)
  work = tmp_path / "work"
  train.train_and_evaluate(config, work)

  def full_disk(self, step, *args, **kwargs):  # How TensorStore reports ENOSPC.
    raise ValueError("RESOURCE_EXHAUSTED: Error writing ... Failed to write 855 bytes to "
                     "file 17: No space left on device [os_error_code='28']")

  monkeypatch.setattr(train.ocp.CheckpointManager, "save", full_disk)
  config.unlock()
  config.num_epochs = 2
  with pytest.raises(train.CheckpointWriteError,
                     match="checkpoint 6 .*no space left on device.*last complete checkpoint is 3"):
    train.train_and_evaluate(config, work)
  assert [r["epoch"] for r in train.read_metrics(work)] == [1]


@pytest.fixture
def small_tmpfs(tmp_path):
  """A real 2 MiB filesystem, to fill up. Needs root (mount); skipped where refused."""
  mount = tmp_path / "small"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                    capture_output=True).returncode:
    pytest.skip("cannot mount a tmpfs here (needs root)")
  yield mount
  subprocess.run(["umount", "-l", str(mount)], check=True)


def test_disk_full_while_checkpointing_then_rerun_after_freeing_space(
    small_tmpfs, uninterrupted_cli_run, tiny_archive, tmp_path):
  work = small_tmpfs / "work"
  flags = tiny_cli_flags(tiny_archive, tmp_path / "tfds", work, "--config.plots=False")
  run_cli("s9jax.train", *flags, "--config.num_epochs=1")
  filler = small_tmpfs / "filler"
  with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
    while True:  # Take every free byte...
      f.write(b"\0" * 4096)
  os.truncate(filler, filler.stat().st_size - 8192)  # ...but two pages, for config.json.
  full = run_module("s9jax.train", *flags, "--config.num_epochs=3")
  assert full.returncode == 2
  error = full.stderr.strip().splitlines()[-1]
  assert error.startswith("error: not enough space to write checkpoint 6"), full.stderr[-3000:]
  assert "last complete checkpoint is 3" in error
  assert train.checkpoint_manager(work, 3).all_steps() == [3]

  filler.unlink()
  run_cli("s9jax.train", *flags, "--config.num_epochs=3")
  records = without_timings(train.read_metrics(work))
  # Epoch 1 was the first run's last, so it alone also read the test set then.
  assert records[0].pop("test_accuracy") is not None and records[0].pop("test_loss")
  assert records == without_timings(uninterrupted_cli_run)


def test_device_augmentation_backend_trains_reproducibly(tiny_archive, tmp_path):
  config = tiny_config(tiny_archive, tmp_path / "tfds", **{"augment.backend": "jax"})
  first = train.train_and_evaluate(config, tmp_path / "a")
  assert (tmp_path / "a" / "augmentations.png").exists()
  assert np.isfinite(first[-1]["train_loss"])
  config.unlock()
  config.plots = False
  assert without_timings(train.train_and_evaluate(config, tmp_path / "b")) == without_timings(first)


def test_host_batch_step_normalises_and_resizes_then_takes_the_plain_step(tiny_archive,
                                                                          tmp_path):
  """The host pipeline sends augmented uint8 images; the step normalises them with the
  run's statistics and resizes them (progressive resizing) before the same SGD step
  (label smoothing and mixup passed through)."""
  config = tiny_config(tiny_archive, tmp_path, learning_rate=0.05, schedule="constant")
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 10).astype(np.int32)
  mean, std = input_pipeline.channel_stats(images)
  normalize = functools.partial(input_pipeline.normalize_batch, mean=mean, std=std)
  dropout_key, start = jax.random.PRNGKey(1), tiny_state(config)
  batch = {"image": input_pipeline.resize_batch(normalize(images), 16), "label": labels}
  loss_options = train.LossOptions(label_smoothing=0.1, mixup_alpha=0.4)
  plain_step = functools.partial(train._train_step, loss_options=loss_options)
  expected, expected_metrics = jax.jit(plain_step)(jax.tree.map(jnp.copy, start), batch,
                                                   dropout_key)
  got, metrics = train.train_step_on_host_batch(start, {"image": images, "label": labels},
                                                dropout_key, normalize, 16, loss_options)
  np.testing.assert_allclose(metrics["loss"], expected_metrics["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(expected.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_data_on_device_step_gathers_augments_and_trains_as_the_host_path(tiny_archive, tmp_path):
  """`augment.backend = 'jax'`: the host sends indices; the step gathers them from the
  training set on the device, augments (seeded by the step), resizes, and then takes the
  same SGD step as on the batch the host path would have sent."""
  config = tiny_config(tiny_archive, tmp_path, learning_rate=0.05, schedule="constant")
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 30).astype(np.int32)
  mean, std = input_pipeline.channel_stats(images)
  index = np.array([7, 3, 29, 0, 3, 12, 5, 18, 22, 9], np.int32)
  dropout_key, augment_key = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  augment_with = lambda aug: functools.partial(input_pipeline.device_augment, aug_config=aug,
                                               mean=mean, std=std)
  # With every augmentation off it is the host path's Normalize, and mirrors just the
  # images the host says to (alternating flips).
  plain = input_pipeline.normalize_batch(images[index], mean, std)
  none = config.augment.copy_and_resolve_references()
  none.update(hflip_p=0.0, affine_p=0.0, cutout_p=0.0)
  # Each call below jitted, as a run makes it: op by op they compiled hundreds of small
  # programs (the test took 14.7 s alone, 7.4 s jitted).
  augment_none = jax.jit(augment_with(none))
  np.testing.assert_allclose(augment_none(augment_key, images[index]), plain, atol=1e-5)
  flip = np.arange(10) % 3 == 0
  np.testing.assert_allclose(augment_none(augment_key, images[index], flip=flip),
                             np.where(flip[:, None, None, None], plain[:, :, ::-1], plain),
                             atol=1e-5)
  # The step, at step 1 (so its draws are seeded by the step, not by 0), at 16 px.
  augment = augment_with(config.augment)
  start = tiny_state(config).replace(step=jnp.asarray(1, jnp.int32))
  batch = {"image": input_pipeline.resize_batch(
      jax.jit(augment)(jax.random.fold_in(augment_key, 1), images[index]), 16),
      "label": labels[index]}
  loss_options = train.LossOptions(label_smoothing=0.1, mixup_alpha=0.4)
  expected, expected_metrics = train.train_step(jax.tree.map(jnp.copy, start), batch,
                                                dropout_key, loss_options)
  train_set = train.place_on_devices({"image": images, "label": labels}, train.make_mesh(1))
  got, metrics = train.train_step_on_device(start, train_set, index, dropout_key, augment_key,
                                            augment, 16, loss_options)
  assert int(got.step) == 2
  np.testing.assert_allclose(metrics["loss"], expected_metrics["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(expected.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_progressive_resizing_trains_small_then_validates_every_epoch_and_tests_once(
    tiny_archive, tmp_path, monkeypatch):
  config = tiny_config(tiny_archive, tmp_path / "tfds", num_epochs=3, progressive_epochs=1,
                       progressive_size=16, **{"data.validation_size": 10})
  seen, evaluated = [], []
  step, evaluate = train.train_step_on_host_batch, train.evaluate

  def recording_step(state, batch, dropout_rng, normalize, size, *args):
    assert batch["image"].dtype == np.uint8 and batch["image"].shape[1:3] == (32, 32)
    seen.append((size, size))  # The step resizes (test_host_batch_step_...).
    return step(state, batch, dropout_rng, normalize, size, *args)

  def recording_evaluate(state, images, labels, *args, **kwargs):
    evaluated.append((kwargs.get("split", "test"), len(images)))
    return evaluate(state, images, labels, *args, **kwargs)

  monkeypatch.setattr(train, "train_step_on_host_batch", recording_step)
  monkeypatch.setattr(train, "evaluate", recording_evaluate)
  drawn, draw = [], train.plots.learning_curves

  def recording_draw(path, records, *args):
    drawn.append(len(records))
    return draw(path, records, *args)

  monkeypatch.setattr(train.plots, "learning_curves", recording_draw)
  monkeypatch.setattr(train, "CURVES_EVERY_SECONDS", 3600.0)
  work = tmp_path / "work"
  records = train.train_and_evaluate(config, work)
  per_epoch = len(seen) // 3
  assert per_epoch == 2 and seen == [(16, 16)] * per_epoch + [(32, 32)] * 2 * per_epoch
  # The 10 held-out images validate after every epoch; the 20 test images are read once,
  # after the last, and the best checkpoint is chosen by validation accuracy alone.
  assert evaluated == [("val", 10), ("val", 10), ("val", 10), ("test", 20)]
  assert ["val_accuracy" in r for r in records] == [True, True, True]
  assert ["test_accuracy" in r for r in records] == [False, False, True]
  manager = train.checkpoint_manager(work, config.checkpoint_keep)
  # Orbax ranks checkpoints by a stable ascending sort and takes the last: of equal
  # validation accuracies, the latest.
  best = max(reversed(records), key=lambda r: r["val_accuracy"])
  assert manager.best_step() == best["step"]
  manager.close()
  # The curves after the first epoch, then not again within the hour but after the last.
  assert drawn == [1, 3] and (work / "learning_curves.png").exists()


def test_translate_tta_averages_shifted_and_mirrored_logits(tiny_archive, tmp_path):
  state = tiny_state(tiny_config(tiny_archive, tmp_path))
  rng = np.random.default_rng(0)
  images = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
  labels = rng.integers(0, 10, 4).astype(np.int32)
  variables = {"params": state.params, "batch_stats": state.batch_stats}

  def flip_averaged(x):
    # NumPy on both sides: pytest.approx reads `.flat` of its expected value, which JAX
    # arrays do not implement (pytest >= 9.1).
    return (np.asarray(state.apply_fn(variables, x))
            + np.asarray(state.apply_fn(variables, x[:, :, ::-1]))) / 2

  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
  expected = (flip_averaged(images) / 2 + flip_averaged(padded[:, :32, :32]) / 4
              + flip_averaged(padded[:, 4:, 4:]) / 4)
  log_probs = expected - np.log(np.exp(expected).sum(-1, keepdims=True))
  metrics, predictions = train.evaluate(state, images, labels, 4, flip=True, translate=2)
  np.testing.assert_array_equal(predictions, expected.argmax(-1))
  assert metrics["test_loss"] == pytest.approx(-log_probs[np.arange(4), labels].mean(), rel=1e-5)


def test_resize_batch_keeps_flat_images_flat_and_the_mean():
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  images[1] = 0.25
  small = np.asarray(input_pipeline.resize_batch(images, 24))
  assert small.shape == (2, 24, 24, 3)
  np.testing.assert_allclose(small[1], 0.25, atol=1e-6)
  np.testing.assert_allclose(small[0].mean(axis=(0, 1)), images[0].mean(axis=(0, 1)), atol=0.02)


def tensorboard_scalars(logdir) -> dict:
  """{tag: [(step, value), ...]} read back from tensorboardX's event files (TFRecord
  framing: length, its CRC, an Event proto, its CRC)."""
  from tensorboardX.proto import event_pb2
  scalars, images = {}, []
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      length = int.from_bytes(data[offset:offset + 8], "little")
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        if value.HasField("image"):
          images.append(value.tag)
        else:
          scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars, images


def test_tensorboard_events_hold_every_epoch_record(tiny_archive, tmp_path):
  config = tiny_config(tiny_archive, tmp_path / "tfds", num_epochs=2, plots=False,
                       **{"data.validation_size": 10})
  work = tmp_path / "work"
  records = train.train_and_evaluate(config, work)
  scalars, images = tensorboard_scalars(work / "tensorboard")
  assert images == ["augmentations"]
  for key, tag in (("train_loss", "loss/train"), ("val_accuracy", "accuracy/val"),
                   ("learning_rate", "learning_rate"), ("images_per_second", "images_per_second")):
    assert scalars[tag] == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in records]
  assert scalars["accuracy/test"] == [(2, pytest.approx(records[-1]["test_accuracy"]))]
