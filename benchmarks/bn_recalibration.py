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

import functools
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.tta_variants import print_table, restore_with_validation_split  # noqa: E402
from s9jax import input_pipeline, train  # noqa: E402

# (name, how many training images (0: all), augmented).
VARIANTS = (("clean", 0, False), ("clean 10k", 10_000, False), ("augmented", 0, True))


def validation_accuracies(workdir) -> list[float]:
  """The running statistics' accuracy on `workdir`'s validation split, then each variant's."""
  config, state, mean, std, (train_images, _), (images, labels) = (
      restore_with_validation_split(workdir))
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


if __name__ == "__main__":
  print_table(__doc__, ["running"] + [name for name, *_ in VARIANTS], validation_accuracies)
