"""TensorBoard event files beside metrics.jsonl (which stays the record of truth).

tensorboardX writes them without TensorFlow: `tensorboard --logdir WORKDIR` shows a run.
"""

from __future__ import annotations

import pathlib

from tensorboardX import SummaryWriter

# metrics.jsonl key -> TensorBoard tag: one chart per quantity, train and val side by side.
TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "test_loss": "loss/test",
        "train_accuracy": "accuracy/train", "val_accuracy": "accuracy/val",
        "test_accuracy": "accuracy/test", "learning_rate": "learning_rate",
        "images_per_second": "images_per_second"}


def open(workdir) -> SummaryWriter:  # noqa: A001 - the writer's verb, in its own module.
  return SummaryWriter(logdir=str(pathlib.Path(workdir) / "tensorboard"))


def write_record(writer: SummaryWriter | None, record: dict):
  """One epoch's record, at its epoch, then flushed (a killed run keeps what it logged)."""
  if writer is None:
    return
  for key, tag in TAGS.items():
    if key in record:
      writer.add_scalar(tag, record[key], record["epoch"])
  writer.flush()
