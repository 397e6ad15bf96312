"""Benchmark 2: images/s the Albumentations input pipeline delivers vs images/s the
train step consumes, on this machine.

    python benchmarks/input_pipeline.py [--config base] [--batches 40]

The pipeline is timed alone (its threads free to use both cores); the train step alone
on random data. Prints one line: pipeline img/s, step img/s, ratio.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.train_step import jax_images_per_second  # noqa: E402
from s9jax import host_memory, input_pipeline  # noqa: E402


def main():
  host_memory.reuse_freed_memory()  # Before JAX starts its CPU client.
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="base")
  parser.add_argument("--batches", type=int, default=40)
  parser.add_argument("--workers", type=int, default=None)
  args = parser.parse_args()
  config = importlib.import_module(f"configs.{args.config}").get_config()
  workers = args.workers or config.data.workers
  images, labels = input_pipeline.load_split(config.data, "train")
  mean, std = input_pipeline.channel_stats(images)
  batches = input_pipeline.TrainBatches(
      images, labels, lambda: input_pipeline.train_transform(config.augment, mean, std),
      config.batch_size, config.seed, workers=workers)
  stream = batches.epoch(1)
  next(stream)  # Thread start-up.
  start = time.perf_counter()
  for _ in range(args.batches):
    next(stream)
  pipeline_ips = args.batches * config.batch_size / (time.perf_counter() - start)
  step_ips, _ = jax_images_per_second(config, config.batch_size, 10)
  print(f"{args.config}: pipeline {pipeline_ips:.0f} img/s ({workers} threads), "
        f"train step {step_ips:.0f} img/s, ratio {pipeline_ips / step_ips:.2f}")


if __name__ == "__main__":
  main()
