"""Benchmark 3: final test accuracy and whole-run wall time of a config, over seeds.

    python benchmarks/time_to_85.py --config configs/fast.py --seeds 100 101 102 103 104 \
        --root runs/report [-- --config.data.source_path=PATH ...]

Each seed is one fresh `python -m s9jax.train --config CONFIG --workdir ROOT/seed<N>
--config.seed=N` process, the README's command: its wall time counts everything a user
waits for (interpreter and JAX start, data loading, compilation, every epoch, the one test
evaluation, checkpoints, plots), with the dataset already prepared. The accuracy is the
final epoch's, on the test set read once at the end: no epoch or checkpoint is chosen by
it. Flags after `--` go to every run. Report on seeds the recipe was never tuned on
(100 and up). Prints one line per seed, with where its wall went (the median epoch at
each training size, the last epoch, which holds the test evaluation, and the time besides
the epochs), then mean +- std (sample) and min.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import time

import ml_collections
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from s9jax import inference, train  # noqa: E402


def epoch_times(records: list[dict], config: dict) -> str:
  """'median epoch 10.6 s at 24 px, 17.8 s at 32 px; the last 24.0 s' from a run's
  metrics records and its config (a ConfigDict or config.json's dict): each epoch's size
  as the run picked it, the last epoch (which also evaluates the test set) on its own."""
  config = ml_collections.ConfigDict(config)
  by_size: dict[int, list[float]] = {}
  for record in records[:-1]:
    size = train.epoch_image_size(config, record["epoch"])
    by_size.setdefault(size, []).append(record["epoch_seconds"])
  sizes = ", ".join(f"{np.median(seconds):.1f} s at {size} px"
                    for size, seconds in by_size.items())
  last = f"the last {records[-1]['epoch_seconds']:.1f} s"
  return f"median epoch {sizes}; {last}" if sizes else last


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/fast.py")
  parser.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102])
  parser.add_argument("--root", default="runs/report")
  parser.add_argument("--target", type=float, default=85.0, help="Accuracy goal, percent.")
  args, extra = parser.parse_known_args()
  extra = [flag for flag in extra if flag != "--"]
  accuracies = []
  for seed in args.seeds:
    workdir = pathlib.Path(args.root) / f"seed{seed}"
    if workdir.exists():
      sys.exit(f"error: {workdir} exists: a resumed run has no whole-run wall time; "
               "pass another --root or delete it")
    command = [sys.executable, "-m", "s9jax.train", "--config", args.config,
               "--workdir", str(workdir), f"--config.seed={seed}", *extra]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT)
    wall = time.perf_counter() - start
    if result.returncode != 0:
      sys.exit(f"error: seed {seed} failed (exit {result.returncode}): {' '.join(command)}")
    records, config = train.read_metrics(workdir), inference.load_config(workdir)
    final = 100 * records[-1]["test_accuracy"]
    accuracies.append(final)
    seconds_of_epochs = records[-1]["elapsed_seconds"]
    print(f"seed {seed}: final test accuracy {final:.2f}% after {records[-1]['epoch']} epochs, "
          f"{wall / 60:.2f} min wall ({seconds_of_epochs / 60:.2f} min of epochs); "
          f"{'>=' if final >= args.target else '<'} {args.target:g}%\n"
          f"  {epoch_times(records, config)}; {(wall - seconds_of_epochs) / 60:.2f} min besides the "
          "epochs", flush=True)
  finals = np.array(accuracies)
  spread = finals.std(ddof=1) if len(finals) > 1 else 0.0
  print(f"{args.config}: final test accuracy {finals.mean():.2f} +- {spread:.2f}% "
        f"(min {finals.min():.2f}%) over seeds {args.seeds}")


if __name__ == "__main__":
  main()
