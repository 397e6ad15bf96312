"""benchmarks/time_to_85.py's summary of where a run's wall went, the figures every report
row in docs/benchmarks.md cites."""

from benchmarks.time_to_85 import epoch_times


def records(seconds):
  return [{"epoch": e, "epoch_seconds": s} for e, s in enumerate(seconds, start=1)]


def test_epoch_medians_by_training_size_and_the_last_epoch_apart():
  config = {"progressive_size": 24, "progressive_epochs": 3, "augment": {"image_size": 32}}
  # Epochs 1-3 at 24 px, 4-5 at 32; the last (6), which evaluates the test set, apart.
  summary = epoch_times(records([9.0, 12.0, 10.0, 17.0, 19.0, 25.0]), config)
  assert summary == "median epoch 10.0 s at 24 px, 18.0 s at 32 px; the last 25.0 s"


def test_without_progressive_resizing_every_epoch_is_at_the_image_size():
  config = {"progressive_size": 0, "progressive_epochs": 0, "augment": {"image_size": 32}}
  assert epoch_times(records([20.0, 21.0, 30.0]), config) == (
      "median epoch 20.5 s at 32 px; the last 30.0 s")
  assert epoch_times(records([30.0]), config) == "the last 30.0 s"
