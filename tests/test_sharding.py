"""Data parallelism on 8 simulated CPU devices. Each test runs a script in a fresh
process started with 8 host devices (the rest of the suite keeps one device)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT

PRELUDE = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 8)
from s9jax import train
from tests.conftest import tiny_config
assert jax.device_count() == 8
"""


def run_on_8_devices(script: str, tmp_path, *args) -> dict:
  path = tmp_path / "script.py"
  path.write_text(PRELUDE + textwrap.dedent(script))
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, str(path), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_eight_devices_give_the_one_device_metrics(tiny_archive, tmp_path):
  out = run_on_8_devices("""
    archive, base = sys.argv[1], sys.argv[2]
    runs = {}
    for n in (1, 8):
      config = tiny_config(archive, base + "/tfds", num_devices=n, batch_size=16,
                           eval_batch_size=16, num_epochs=2, plots=False)
      records = train.train_and_evaluate(config, f"{base}/work{n}")
      runs[n] = [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in records]
    print(json.dumps(runs))
  """, tmp_path, tiny_archive, tmp_path)
  one, eight = out["1"], out["8"]
  assert [r["epoch"] for r in eight] == [1, 2]
  for a, b in zip(one, eight):
    assert a["step"] == b["step"]
    for key in ("train_loss", "test_loss", "train_accuracy", "test_accuracy", "learning_rate"):
      assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key


def test_checkpoints_restore_across_device_counts(tiny_archive, tmp_path):
  out = run_on_8_devices("""
    from s9jax import eval as evaluation
    archive, base = sys.argv[1], sys.argv[2]
    result = {}
    for saved_on, restored_on in ((8, 1), (1, 8)):
      work = f"{base}/work{saved_on}"
      config = tiny_config(archive, base + "/tfds", num_devices=saved_on, batch_size=16,
                           eval_batch_size=16, num_epochs=1, plots=False)
      recorded = train.train_and_evaluate(config, work)[-1]["test_accuracy"]
      config.unlock()
      config.num_devices = restored_on
      restored = evaluation.evaluate_checkpoint(config, work, "latest")
      config.num_epochs = 2  # Training goes on from the other device count's checkpoint.
      records = train.train_and_evaluate(config, work)
      result[f"{saved_on}->{restored_on}"] = {
          "recorded": recorded, "restored": restored["test_accuracy"],
          "epochs": [r["epoch"] for r in records]}
    print(json.dumps(result))
  """, tmp_path, tiny_archive, tmp_path)
  for case in out.values():
    assert case["restored"] == case["recorded"]
    assert case["epochs"] == [1, 2]


def test_batch_not_divisible_by_the_devices_is_refused(tiny_archive, tmp_path):
  out = run_on_8_devices("""
    archive, base = sys.argv[1], sys.argv[2]
    config = tiny_config(archive, base + "/tfds", batch_size=10)
    try:
      train.train_and_evaluate(config, base + "/work")
    except train.ConfigError as e:
      print(json.dumps({"error": str(e)}))
  """, tmp_path, tiny_archive, tmp_path)
  assert "batch_size 10 is not divisible by the 8 devices" in out["error"]
  assert not (tmp_path / "work").exists()
