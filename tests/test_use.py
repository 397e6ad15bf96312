"""Using a trained run from its workdir alone: s9jax.load, the predict, eval and export
CLIs, and the exported artifact run by plain JAX in a process without s9jax.

One tiny run is trained once (two epochs, a validation split) and every test reads it."""

import json
import os
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

import s9jax
from s9jax import eval as eval_cli
from s9jax import export, inference, input_pipeline, predict, train
from tests.conftest import ROOT, class_colour, tiny_config


@pytest.fixture(scope="module")
def run(tiny_archive, tmp_path_factory):
  """The trained workdir, its config and metrics records."""
  base = tmp_path_factory.mktemp("use")
  config = tiny_config(tiny_archive, base / "tfds", num_epochs=2, plots=False,
                       **{"data.validation_size": 10})
  workdir = base / "work"
  records = train.train_and_evaluate(config, workdir)
  return types.SimpleNamespace(workdir=workdir, config=config, records=records)


def sample_images(run) -> tuple[np.ndarray, np.ndarray]:
  """The tiny test split (flat grey images) and random noise, where flips matter."""
  images, labels = input_pipeline.load_split(run.config.data, "test")
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, (13, 32, 32, 3), dtype=np.uint8)
  return (np.concatenate([images, noise]),
          np.concatenate([labels, rng.integers(0, 10, 13).astype(np.int32)]))


def single_line_error(captured) -> str:
  assert captured.out == "" and captured.err.count("\n") == 1, captured
  assert captured.err.startswith("error: "), captured.err
  return captured.err


def test_import_s9jax_is_cheap_and_load_is_lazy():
  result = subprocess.run(
      [sys.executable, "-c", "import sys, s9jax; assert 'jax' not in sys.modules, "
       "sorted(sys.modules); assert callable(s9jax.load); assert 'jax' in sys.modules"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    s9jax.nope


def test_load_gives_probabilities_that_agree_with_the_training_code(run):
  model = s9jax.load(run.workdir)
  assert model.step == run.records[-1]["step"] and model.epoch == 2
  images, labels = sample_images(run)
  probabilities = model(images)
  assert probabilities.shape == (len(images), 10) and probabilities.dtype == np.float32
  np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)

  # The training code on the same images, normalised by the training pipeline, with the
  # run's test-time augmentations: the same predictions, the same loss.
  config, state, mean, std, _ = inference.restore(run.workdir)
  metrics, predictions = train.evaluate_test_set(
      config, state, input_pipeline.normalize_batch(images, mean, std), labels)
  np.testing.assert_array_equal(probabilities.argmax(-1), predictions)
  loss = -np.log(probabilities[np.arange(len(labels)), labels]).mean()
  assert loss == pytest.approx(metrics["test_loss"], rel=1e-4)

  # More images than a batch: chunked (8 at a time), the same numbers.
  many = model(np.concatenate([images] * 3))
  np.testing.assert_allclose(many, np.concatenate([probabilities] * 3), rtol=1e-5, atol=1e-6)
  assert model(images[:0]).shape == (0, 10)
  with pytest.raises(ValueError, match="uint8"):
    model(images.astype(np.float32))
  with pytest.raises(ValueError, match=r"add the batch axis"):
    model(images[0])


def test_checkpoint_choice_final_best_or_a_step_never_by_test_accuracy(run):
  manager = inference.open_checkpoints(run.workdir)
  try:
    steps = [r["step"] for r in run.records]
    assert manager.all_steps() == steps
    assert inference.pick_step(manager) == inference.pick_step(manager, "final") == steps[-1]
    assert inference.pick_step(manager, str(steps[0])) == steps[0]
    validated = [(r["val_accuracy"], r["step"]) for r in run.records if "val_accuracy" in r]
    if validated:
      assert inference.pick_step(manager, "best") == max(validated)[1]
    else:
      with pytest.raises(train.ConfigError, match="none is 'best'"):
        inference.pick_step(manager, "best")
    kept = ", ".join(map(str, steps))
    with pytest.raises(train.ConfigError, match=rf"'final', 'best' or a kept step \({kept}\)"):
      inference.pick_step(manager, "7")
  finally:
    manager.close()
  assert s9jax.load(run.workdir, checkpoint=steps[0]).step == steps[0]


def write_image(path, array, mode):
  Image.fromarray(array, mode).save(path)
  return str(path)


def test_predict_cli_prints_top_classes_for_images_of_any_size_and_mode(run, tmp_path, capsys):
  grey = class_colour(3)
  rgba = write_image(tmp_path / "wide.png", np.full((40, 50, 4), [grey, grey, grey, 255],
                                                    np.uint8), "RGBA")
  mono = write_image(tmp_path / "mono.png", np.full((30, 20), grey, np.uint8), "L")
  assert predict.main(["predict", "--workdir", str(run.workdir), "--top", "3", rgba, mono]) == 0
  lines = capsys.readouterr().out.splitlines()
  entry = rf"({'|'.join(input_pipeline.CLASS_NAMES)}) \d+\.\d%"
  assert len(lines) == 2
  for path, line in zip((rgba, mono), lines):
    assert re.fullmatch(rf"{re.escape(path)}: {entry}, {entry}, {entry}", line), line
  # Both are the flat grey image of class 3 after conversion and resizing.
  flat = s9jax.load(run.workdir)(np.full((1, 32, 32, 3), grey, np.uint8))[0]
  expected = predict.format_line(rgba, flat, input_pipeline.CLASS_NAMES, 3)
  assert lines[0] == expected and lines[1] == expected.replace(rgba, mono)


def test_predict_cli_errors_are_one_line_and_exit_2(run, tmp_path, capsys):
  image = write_image(tmp_path / "ok.png", np.zeros((32, 32, 3), np.uint8), "RGB")
  (tmp_path / "broken.png").write_text("not an image")
  workdir = str(run.workdir)
  cases = [
      (["--workdir", workdir, image, str(tmp_path / "missing.png")], "no such image file"),
      (["--workdir", workdir, str(tmp_path / "broken.png")], "cannot read image"),
      (["--workdir", str(tmp_path / "nowhere"), image], "no workdir"),
      (["--workdir", str(tmp_path), image], "has no config.json"),
      (["--workdir", workdir], "no IMAGE given"),
      (["--workdir", workdir, "--checkpoint", "best-ish", image], "checkpoint must be"),
      (["--workdir", workdir, "--top", "0", image], "flag --top=0"),
      ([image], "flag --workdir=None"),
  ]
  for args, message in cases:
    assert predict.main(["predict", *args]) == 2, args
    assert message in single_line_error(capsys.readouterr()), args


def test_eval_without_config_reproduces_the_recorded_final_test_accuracy(run):
  final = run.records[-1]
  result = eval_cli.evaluate_checkpoint(None, run.workdir)
  assert result["checkpoint"] == "final" and result["step"] == final["step"]
  assert result["test_accuracy"] == final["test_accuracy"]
  assert result["recorded_test_accuracy"] == final["test_accuracy"]
  assert json.loads((run.workdir / "eval.json").read_text())["step"] == final["step"]


def test_a_workdir_from_before_newer_config_keys_still_evaluates(run, tmp_path):
  old = tmp_path / "old"
  shutil.copytree(run.workdir, old)
  saved = json.loads((old / "config.json").read_text())
  for dotted in train.ADDED_KEYS:
    *sections, key = dotted.split(".")
    tree = saved
    for section in sections:
      tree = tree[section]
    del tree[key]
  (old / "config.json").write_text(json.dumps(saved))
  config = inference.load_config(old)
  assert config.augment.alternate_flip is False and config.bn_bias_lr_scale == 1.0
  result = eval_cli.evaluate_checkpoint(None, old)
  assert result["test_accuracy"] == run.records[-1]["test_accuracy"]


def run_module(module, *args, **kwargs):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, **kwargs)


def test_eval_cli_needs_only_the_workdir(run):
  result = run_module("s9jax.eval", "--workdir", run.workdir)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  assert f"test accuracy {100 * run.records[-1]['test_accuracy']:.2f}%" in result.stdout
  assert result.stdout.startswith(f"checkpoint final (epoch 2, step {run.records[-1]['step']}")
  override = run_module("s9jax.eval", "--workdir", run.workdir, "--config.data.data_dir=/x")
  assert override.returncode == 2 and override.stderr.count("\n") == 1, override.stderr
  assert override.stderr.startswith("error: --config.data.data_dir overrides a --config")


# Runs in a fresh interpreter with JAX alone: s9jax must not be needed, nor imported.
CONSUMER = """
import sys, jax, numpy
exported = jax.export.deserialize(open(sys.argv[1], "rb").read())
images = numpy.load(sys.argv[2])
one, five = exported.call(images[:1]), exported.call(images)
numpy.savez(sys.argv[3], one=numpy.asarray(one), five=numpy.asarray(five))
assert "s9jax" not in sys.modules, "the artifact's consumer imported s9jax"
"""


def run_without_s9jax(code: str, *args, cwd):
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  result = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  return result.stdout


def test_export_round_trip_in_a_process_without_s9jax_gives_the_same_logits(
    run, tmp_path, capsys):
  artifact = tmp_path / "out" / "cifar.jaxexport"
  assert export.main(["export", "--workdir", str(run.workdir), "--output", str(artifact)]) == 0
  out = capsys.readouterr().out
  assert out.startswith(f"wrote {artifact}") and "jax.export.deserialize" in out
  spec = json.loads((tmp_path / "out" / "cifar.json").read_text())
  assert spec["class_names"] == list(input_pipeline.CLASS_NAMES)
  assert spec["platforms"] == ["cpu"] and spec["input"]["dtype"] == "uint8"
  assert spec["checkpoint"]["step"] == run.records[-1]["step"]

  images = sample_images(run)[0][-5:]  # Noise: logits that differ between images.
  np.save(tmp_path / "images.npy", images)
  run_without_s9jax(CONSUMER, artifact, tmp_path / "images.npy", tmp_path / "logits.npz",
                    cwd=tmp_path)
  logits = np.load(tmp_path / "logits.npz")
  model = s9jax.load(run.workdir)
  expected = model.logits(images)  # The run's own conv_impl; the artifact's is 'lax'.
  assert logits["one"].shape == (1, 10) and logits["five"].shape == (5, 10)
  np.testing.assert_allclose(logits["five"], expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(logits["one"], expected[:1], rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(logits["five"].argmax(-1), model(images).argmax(-1))

  # The snippet the CLI prints (and the README shows) runs as printed, on an image file.
  snippet = out.split("(no s9jax):\n\n", 1)[1]
  assert len(snippet.strip().splitlines()) == 10
  write_image(tmp_path / "cat.jpg", images[0], "RGB")
  printed = run_without_s9jax(snippet + "import sys; assert 's9jax' not in sys.modules\n",
                              cwd=tmp_path)
  assert re.fullmatch(rf"({'|'.join(input_pipeline.CLASS_NAMES)}) \d+\.\d%\n", printed), printed


def test_export_refuses_unknown_platforms_in_one_line(run, capsys):
  assert export.main(["export", "--workdir", str(run.workdir), "--platforms", "cpu,gpu"]) == 2
  assert "platforms must be some of cpu, cuda, rocm, tpu" in single_line_error(
      capsys.readouterr())
  assert not (run.workdir / "model.jaxexport").exists()
