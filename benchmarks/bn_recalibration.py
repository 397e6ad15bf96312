"""Validation accuracy of trained runs with their running BatchNorm statistics and with
statistics recomputed after training (`bn_recalibrate`), in each variant below.

    python benchmarks/bn_recalibration.py runs/screen/NAME [runs/screen/OTHER ...]

For choosing `bn_recalibrate` without the test set: each workdir must have trained with
a validation split (`data.validation_size` > 0). Its final checkpoint (as trained, so
from a run without `bn_recalibrate`) is evaluated on that split as training validated
(no TTA), once with its own statistics ("running") and once per variant with
`train.recalibrate_batch_stats` over its training images (the run's batch size): all of
them un-augmented (what `bn_recalibrate` does), the first 10,000 of them, or all of them
augmented as in training (the run's Albumentations transform, a new draw). The test split
is never read. One line per workdir, then the mean of each column over them.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from s9jax import host_memory, inference, input_pipeline, train  # noqa: E402

# (name, how many training images (0: all), augmented).
VARIANTS = (("clean", 0, False), ("clean 10k", 10_000, False), ("augmented", 0, True))


def validation_accuracies(workdir) -> list[float]:
  """The running statistics' accuracy on `workdir`'s validation split, then each variant's."""
  held_out = inference.load_config(workdir).data.validation_size
  if not held_out:  # Checked before restoring anything.
    sys.exit(f"error: {workdir} trained without a validation split "
             "(data.validation_size 0); this tool never reads the test set")
  config, state, mean, std, _ = inference.restore(workdir, "final")
  (train_images, _), (images, labels) = input_pipeline.split_validation(
      *input_pipeline.load_split(config.data, "train"), held_out)
  normalize = functools.partial(input_pipeline.normalize_batch, mean=mean, std=std)
  inputs = normalize(images)

  def accuracy(state):
    return train.evaluate(state, inputs, labels, config.eval_batch_size, flip=False,
                          split="val")[0]["val_accuracy"]

  accuracies = [accuracy(state)]
  transform = input_pipeline.train_transform(config.augment, mean, std)
  for _, count, augmented in VARIANTS:
    chosen = train_images[:count] if count else train_images
    if augmented:
      chosen = np.stack([transform(image=image)["image"] for image in chosen])
    accuracies.append(accuracy(train.recalibrate_batch_stats(
        state, chosen, config.batch_size, normalize)))
  return accuracies


def main():
  host_memory.reuse_freed_memory()  # Before JAX starts its CPU client.
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("workdirs", nargs="+")
  args = parser.parse_args()
  print("run: running | " + " | ".join(name for name, *_ in VARIANTS))
  table = []
  for workdir in args.workdirs:
    table.append(validation_accuracies(workdir))
    print(f"{workdir}: " + " | ".join(f"{100 * a:.2f}" for a in table[-1]), flush=True)
  print("mean: " + " | ".join(f"{100 * a:.2f}" for a in np.mean(table, axis=0)))


if __name__ == "__main__":
  main()
