"""Benchmark 2: images/s the Albumentations input pipeline (`TrainBatches`: Grain, with
`data.workers` augmentation processes) delivers, alone and feeding the real train step,
for each worker count, on this machine; then the data-on-device path.

    python benchmarks/input_pipeline.py [--config base] [--batches 60] [--workers 0 1 2]
                                        [--images random|dataset] [--size 24]

Worker counts: 0 (a background thread of this process), 1, 2, and 4 and 8 where this
machine has that many cores, unless --workers lists them. Prints the train step alone on
a ready batch (--batches steps), then one line per worker count:
    workers N: pipeline P img/s (ratio to the step), end to end E img/s
each with, where /proc has them (Linux), the cores this process's threads kept busy: XLA's
compute threads (`tf_XLA*`), the main thread (dispatch), and the rest (with 0 workers,
the augmentation thread). On a machine the step fills, the step's threads lose what the
rest take; unlike img/s, these shares hold still while the machine's speed drifts. Then
`data on device` (`augment.backend = 'jax'`): the training set placed on the
device once, the host sending indices, the step gathering and augmenting them, end to end.
`pipeline`: batches taken as fast as they come, nothing else running. `end to end`: the
training loop's work per batch: the next batch (uint8), then
`train.train_step_on_host_batch` on it (which normalises it), JAX's dispatch running
ahead as in training (what a 2-core machine really delivers: the augmentation and the
step share its cores). Start-up (worker processes, compilation) is not timed: `--warmup`
batches first.

`--size`: the step trains at this many pixels, as in a progressive-resizing epoch (the
32-px batches resized inside the step); default the config's `augment.image_size`.

Images: 50,000 random uint8 images by default (augmentation costs the same on any
content; nothing to download), or the config's training split with --images dataset.
The process runs with s9jax's malloc settings, as training does.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import pathlib
import sys
import threading
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from s9jax import host_memory, input_pipeline, train  # noqa: E402

RANDOM_IMAGES = 50_000  # CIFAR-10's training set.


def default_worker_counts() -> list[int]:
  cores = os.cpu_count() or 1
  return [0, 1, 2] + [n for n in (4, 8) if n <= cores]


def training_images(config, kind: str):
  if kind == "dataset":
    return input_pipeline.load_split(config.data, "train")
  rng = np.random.default_rng(0)
  return (rng.integers(0, 256, (RANDOM_IMAGES, 32, 32, 3), dtype=np.uint8),
          rng.integers(0, 10, RANDOM_IMAGES).astype(np.int32))


class Trainer:
  """The real train step on a state of the config's network, compiled and warm.
  The state is donated to each step, so it lives here, threaded from step to step."""

  def __init__(self, config, mean, std, size: int):
    self.loss_options = train.LossOptions.from_config(config)
    self.size = size
    self.normalize = functools.partial(input_pipeline.normalize_batch, mean=mean, std=std)
    self.state = train.create_train_state(config, jax.random.PRNGKey(0),
                                          train.create_learning_rate_fn(config, 100))
    self.key = jax.random.PRNGKey(1)
    rng = np.random.default_rng(0)
    self.ready_batch = {
        "image": rng.integers(0, 256, (config.batch_size, 32, 32, 3), dtype=np.uint8),
        "label": rng.integers(0, 10, config.batch_size).astype(np.int32)}
    self.run(lambda: self.ready_batch, 2)  # Compile.

  def run(self, next_batch, steps: int, on_device=None) -> float:
    """Seconds for `steps` steps, each on `next_batch()`, until the last one is done.
    `on_device`: (training set on the device, augment) for batches of indices."""
    start = time.perf_counter()
    for _ in range(steps):
      if on_device:
        train_set, augment = on_device
        batch = next_batch()
        self.state, metrics = train.train_step_on_device(
            self.state, train_set, batch["index"], self.key, self.key, augment,
            self.size, self.loss_options, batch.get("flip"))
      else:
        self.state, metrics = train.train_step_on_host_batch(
            self.state, next_batch(), self.key, self.normalize, self.size, self.loss_options)
    jax.block_until_ready(metrics)
    return time.perf_counter() - start


def thread_seconds() -> dict[int, tuple[str, float]]:
  """Thread id -> (name, CPU seconds so far) for this process's threads; {} without
  /proc (not Linux)."""
  seconds = {}
  for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ():
    try:
      with open(f"/proc/self/task/{tid}/stat") as f:
        stat = f.read()
    except OSError:  # The thread ended.
      continue
    fields = stat[stat.rindex(")") + 2:].split()  # utime and stime: fields 14 and 15.
    seconds[int(tid)] = (stat[stat.index("(") + 1:stat.rindex(")")],
                         (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
  return seconds


def busy_cores(before: dict, after: dict, wall: float) -> str:
  """Cores kept busy between two `thread_seconds`, by kind of thread."""
  if not before:
    return ""
  main, kinds = threading.get_native_id(), {"XLA compute": 0.0, "main": 0.0, "rest": 0.0}
  for tid, (name, seconds) in after.items():
    kind = "main" if tid == main else "XLA compute" if name.startswith("tf_XLA") else "rest"
    kinds[kind] += seconds - before.get(tid, (name, 0.0))[1]
  return "; busy cores: " + ", ".join(f"{kind} {s / wall:.2f}" for kind, s in kinds.items())


def measure(batches, trainer: Trainer, count: int, warmup: int) -> tuple[float, float, str]:
  """(pipeline alone, end to end) img/s of one `TrainBatches`, over `count` batches each,
  from one epoch's stream, and the busy cores end to end."""
  needed = 2 * (warmup + count)
  if needed > batches.steps_per_epoch:
    raise SystemExit(f"--batches {count} and --warmup {warmup} need {needed} batches of an "
                     f"epoch; it has {batches.steps_per_epoch}")
  stream = batches.epoch(1)
  for _ in range(warmup):  # Worker start-up.
    next(stream)
  start = time.perf_counter()
  for _ in range(count):
    next(stream)
  pipeline = count * batches.batch_size / (time.perf_counter() - start)
  trainer.run(lambda: next(stream), warmup)
  before = thread_seconds()
  seconds = trainer.run(lambda: next(stream), count)
  return (pipeline, count * batches.batch_size / seconds,
          busy_cores(before, thread_seconds(), seconds))


def main():
  host_memory.reuse_freed_memory()  # Before JAX starts its CPU client.
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="base")
  parser.add_argument("--batches", type=int, default=60)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--workers", type=int, nargs="+", default=None)
  parser.add_argument("--images", choices=("random", "dataset"), default="random")
  parser.add_argument("--size", type=int, default=0,
                      help="train at this many pixels (progressive resizing); "
                           "default the config's augment.image_size")
  args = parser.parse_args()
  config = importlib.import_module(f"configs.{args.config}").get_config()
  images, labels = training_images(config, args.images)
  mean, std = input_pipeline.channel_stats(images)
  size = args.size or config.augment.image_size
  trainer = Trainer(config, mean, std, size)
  trainer.run(lambda: trainer.ready_batch, 5)
  before = thread_seconds()
  seconds = trainer.run(lambda: trainer.ready_batch, args.batches)
  step_ips = args.batches * config.batch_size / seconds
  print(f"{args.config}, batch {config.batch_size}, {size} px, {os.cpu_count()} cores, "
        f"{args.images} images: train step alone {step_ips:.0f} img/s (config data.workers = "
        f"{config.data.workers}){busy_cores(before, thread_seconds(), seconds)}", flush=True)
  for workers in args.workers or default_worker_counts():
    with input_pipeline.TrainBatches(
        images, labels, lambda: input_pipeline.train_transform(config.augment, mean, std),
        config.batch_size, config.seed, workers=workers) as batches:
      pipeline, end_to_end, cores = measure(batches, trainer, args.batches, args.warmup)
    where = "a thread of this process" if workers == 0 else "processes"
    print(f"workers {workers} ({where}): pipeline {pipeline:.0f} img/s "
          f"({pipeline / step_ips:.2f}x the step), end to end {end_to_end:.0f} img/s{cores}",
          flush=True)
  with input_pipeline.TrainBatches(images, labels, None, config.batch_size, config.seed,
                                   alternate_flip=config.augment.alternate_flip) as batches:
    on_device = (train.place_on_devices({"image": images, "label": labels}, train.make_mesh(1)),
                 functools.partial(input_pipeline.device_augment, aug_config=config.augment,
                                   mean=mean, std=std))
    stream = batches.epoch(1)
    trainer.run(lambda: next(stream), args.warmup, on_device)  # Compiles.
    seconds = trainer.run(lambda: next(stream), args.batches, on_device)
  print(f"data on device (augment.backend = 'jax'): end to end "
        f"{args.batches * config.batch_size / seconds:.0f} img/s", flush=True)


if __name__ == "__main__":
  main()
