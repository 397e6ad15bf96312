"""Validation accuracy of trained runs under each test-time augmentation variant.

    python benchmarks/tta_variants.py runs/screen/NAME [runs/screen/OTHER ...]

For choosing `eval_flip`, `eval_translate` and `eval_translate_weight` without the test
set: each workdir must have trained with a validation split (`data.validation_size` > 0).
Its final checkpoint is evaluated on that split (the last `validation_size` training
images, normalised with the run's own statistics, as training validated) under every
variant below; the test split is never read. One line per workdir, then the mean of each
variant over them. Training's own validation figure is the "none" column (no TTA).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from s9jax import host_memory, inference, input_pipeline, train  # noqa: E402

# (name, flip, translate in pixels, translate_weight): the configs' settings are
# flip (base.py) and flip+t1 (fast.py, best.py, tiny.py).
VARIANTS = (("none", False, 0, 0.5), ("flip", True, 0, 0.5), ("flip+t1", True, 1, 0.5),
            ("flip+t1 w1/3", True, 1, 1 / 3), ("flip+t2", True, 2, 0.5),
            ("flip+t2 w1/3", True, 2, 1 / 3), ("flip+t3", True, 3, 0.5))


def restore_with_validation_split(workdir):
  """(config, state, mean, std, (train images, labels), (validation images, labels)) of
  `workdir`'s final checkpoint; exits if it trained without a validation split."""
  held_out = inference.load_config(workdir).data.validation_size
  if not held_out:  # Checked before restoring anything.
    sys.exit(f"error: {workdir} trained without a validation split "
             "(data.validation_size 0); this tool never reads the test set")
  config, state, mean, std, _ = inference.restore(workdir, "final")
  return (config, state, mean, std, *input_pipeline.split_validation(
      *input_pipeline.load_split(config.data, "train"), held_out))


def print_table(doc: str, columns: list[str], accuracies_of) -> None:
  """The workdirs named on the command line (a script with docstring `doc`), one line
  each of `accuracies_of(workdir)` (one per column), then each column's mean."""
  host_memory.reuse_freed_memory()  # Before JAX starts its CPU client.
  parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
  parser.add_argument("workdirs", nargs="+")
  args = parser.parse_args()
  print("run: " + " | ".join(columns))
  table = []
  for workdir in args.workdirs:
    table.append(accuracies_of(workdir))
    print(f"{workdir}: " + " | ".join(f"{100 * a:.2f}" for a in table[-1]), flush=True)
  print("mean: " + " | ".join(f"{100 * a:.2f}" for a in np.mean(table, axis=0)))


def validation_accuracies(workdir) -> list[float]:
  """Each variant's accuracy on `workdir`'s validation split, final checkpoint."""
  config, state, mean, std, _, (images, labels) = restore_with_validation_split(workdir)
  inputs = input_pipeline.normalize_batch(images, mean, std)
  # Each variant through training's own `evaluate`, so the figures are what a config
  # with it would score; views shared between variants are recomputed (~45 s a run).
  return [train.evaluate(state, inputs, labels, config.eval_batch_size, flip,
                         translate=shift, split="val", translate_weight=weight)[0]
          ["val_accuracy"] for _, flip, shift, weight in VARIANTS]


def main():
  print_table(__doc__, [name for name, *_ in VARIANTS], validation_accuracies)


if __name__ == "__main__":
  main()
