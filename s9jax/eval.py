"""Restore a trained checkpoint and evaluate it on the test split.

    python -m s9jax.eval --workdir runs/base [--checkpoint final|best|STEP]
    python -m s9jax.eval --workdir runs/base --config configs/base.py --config.data.source_path=...

Prints test loss, accuracy and per-class accuracy; writes eval.json and
confusion_matrix.png into the workdir. The network and data come from the workdir's
config.json (the config it was trained with); `--config` replaces it, with overrides,
e.g. to read the data from elsewhere. The default checkpoint is the final one: the test
set does not choose checkpoints ('best' is by validation accuracy). The numbers come from
the same `evaluate` as training, with the data statistics stored in the checkpoint, so
they match the accuracy recorded for that checkpoint.
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from s9jax import compilation_cache, host_memory, inference, input_pipeline, plots, train

FLAGS = flags.FLAGS


def evaluate_checkpoint(config, workdir, which: str = "final") -> dict:
  """Test metrics of checkpoint `which` ('final', 'best' or a step) of a workdir, with
  `config` (None: the workdir's own, from its config.json)."""
  workdir = pathlib.Path(workdir)
  config = inference.load_config(workdir) if config is None else config
  mesh = train.make_mesh(config.num_devices)
  config, state, mean, std, meta = inference.restore(workdir, which, config=config, mesh=mesh)
  step = int(state.step)
  images, labels = input_pipeline.load_split(config.data, "test")
  inputs = input_pipeline.normalize_batch(images, mean, std)
  metrics, predictions = train.evaluate_test_set(config, state, inputs, labels, mesh)
  names = input_pipeline.CLASS_NAMES
  matrix = np.zeros((len(names), len(names)), np.int64)
  np.add.at(matrix, (labels, predictions), 1)
  result = {"checkpoint": which, "step": step, "epoch": meta["epoch"], **metrics,
            # None for a checkpoint saved mid-epoch on SIGTERM/Ctrl-C.
            "recorded_test_accuracy": meta.get("record", {}).get("test_accuracy"),
            "recorded_val_accuracy": meta.get("record", {}).get("val_accuracy"),
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
  compilation_cache.enable(FLAGS.compilation_cache_dir)
  try:
    config = FLAGS.config if "config" in FLAGS else None  # None: the workdir's config.json.
    result = evaluate_checkpoint(config, FLAGS.workdir, FLAGS.checkpoint)
  except (train.ConfigError, input_pipeline.DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  validated = result["recorded_val_accuracy"]
  print(f"checkpoint {result['checkpoint']} (epoch {result['epoch']}, step {result['step']}"
        + (f", validation accuracy {100 * validated:.2f}%" if validated is not None else "")
        + ")")
  recorded = result["recorded_test_accuracy"]
  print(f"test loss {result['test_loss']:.4f}  test accuracy {100 * result['test_accuracy']:.2f}%"
        + (f"  (recorded in training: {100 * recorded:.2f}%)" if recorded is not None else ""))
  for name, acc in result["per_class_accuracy"].items():
    print(f"  {name:10s} {100 * acc:6.2f}%")
  print(f"wrote {pathlib.Path(FLAGS.workdir) / 'eval.json'} and confusion_matrix.png")


def config_given(argv: list[str]) -> bool:
  """Whether the command line names a --config file."""
  return any(arg.split("=")[0].lstrip("-") == "config" for arg in argv[1:])


def define_flags(with_config: bool = True):
  """Defined only when run as a program, so modules can import each other. The config
  flag only when a --config is given: train.parse_flags reads it whenever it exists."""
  if with_config:
    config_flags.DEFINE_config_file("config", None, "Config to evaluate with, instead of "
                                    "the workdir's config.json.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Training workdir holding config.json and checkpoints/.")
  flags.DEFINE_string("checkpoint", "final", f"Which checkpoint: {inference.CHECKPOINTS}.")
  compilation_cache.define_flag()


if __name__ == "__main__":
  with_config = config_given(sys.argv)
  override = next((arg for arg in sys.argv[1:] if arg.startswith("--config.")), None)
  if override and not with_config:
    print(f"error: {override.split('=')[0]} overrides a --config: give --config FILE too "
          "(without one, the workdir's config.json is used as trained)", file=sys.stderr)
    sys.exit(2)
  define_flags(with_config)
  flags.mark_flags_as_required(["workdir"])
  app.run(main, flags_parser=train.parse_flags)
