"""Restore a trained checkpoint and evaluate it on the test split.

    python -m s9jax.eval --config configs/base.py --workdir runs/base [--checkpoint best|latest|STEP]

Prints test loss, accuracy and per-class accuracy; writes eval.json and
confusion_matrix.png into the workdir. The numbers come from the same `evaluate` as
training, with the data statistics stored in the checkpoint, so they match the
accuracy recorded for that checkpoint.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from s9jax import host_memory, input_pipeline, plots, train

FLAGS = flags.FLAGS


def pick_step(manager, which: str) -> int:
  steps = manager.all_steps()
  if not steps:
    raise train.ConfigError(f"no checkpoints in {manager.directory}: train first")
  if which == "best":
    return manager.best_step()
  if which == "latest":
    return manager.latest_step()
  if which.isdigit() and int(which) in steps:
    return int(which)
  raise train.ConfigError(f"--checkpoint must be 'best', 'latest' or one of {sorted(steps)}")


def evaluate_checkpoint(config, workdir, which: str = "best") -> dict:
  workdir = pathlib.Path(workdir)
  manager = train.checkpoint_manager(workdir, config.checkpoint_keep)
  step = pick_step(manager, which)
  mesh = train.make_mesh(config.num_devices)
  state = jax.device_put(train.create_train_state(config, jax.random.PRNGKey(0),
                                                  train.create_learning_rate_fn(config, 1)),
                         train.replicated(mesh))
  state, meta = train.restore_checkpoint(manager, step, state)
  manager.close()
  mean, std = np.asarray(meta["mean"]), np.asarray(meta["std"])
  images, labels = input_pipeline.load_split(config.data, "test")
  inputs = input_pipeline.normalize(images, mean, std)
  metrics, predictions = train.evaluate_test_set(config, state, inputs, labels, mesh)
  names = input_pipeline.CLASS_NAMES
  matrix = np.zeros((len(names), len(names)), np.int64)
  np.add.at(matrix, (labels, predictions), 1)
  result = {"checkpoint": which, "step": step, "epoch": meta["epoch"], **metrics,
            # None for a checkpoint saved mid-epoch on SIGTERM/Ctrl-C.
            "recorded_test_accuracy": meta.get("record", {}).get("test_accuracy"),
            "per_class_accuracy": {n: float(matrix[i, i] / matrix[i].sum())
                                   for i, n in enumerate(names)},
            "confusion_matrix": matrix.tolist()}
  (workdir / "eval.json").write_text(json.dumps(result, indent=2))
  plots.confusion_matrix(workdir / "confusion_matrix.png", matrix, names)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  host_memory.reuse_freed_memory()  # Before JAX starts its CPU client.
  try:
    result = evaluate_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint)
  except (train.ConfigError, input_pipeline.DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"checkpoint {result['checkpoint']} (epoch {result['epoch']}, step {result['step']})")
  recorded = result["recorded_test_accuracy"]
  print(f"test loss {result['test_loss']:.4f}  test accuracy {100 * result['test_accuracy']:.2f}%"
        + (f"  (recorded in training: {100 * recorded:.2f}%)" if recorded is not None else ""))
  for name, acc in result["per_class_accuracy"].items():
    print(f"  {name:10s} {100 * acc:6.2f}%")
  print(f"wrote {pathlib.Path(FLAGS.workdir) / 'eval.json'} and confusion_matrix.png")


def define_flags():
  """Defined only when run as a program, so modules can import each other."""
  config_flags.DEFINE_config_file("config", None, "Config the run was trained with.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
  flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=train.parse_flags)
