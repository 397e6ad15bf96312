"""Benchmark 3: wall time to the first epoch at >= 85% test accuracy, per seed, for a
config trained in full on CIFAR-10 (JPEG copy).

    python benchmarks/time_to_85.py --config configs/base.py --seeds 0 1 2 --root runs/t85

Each seed trains in ROOT/seed<N> (rerunning resumes, and a finished run is only
reported). Time to 85% is wall time: the epochs up to the first one at >= 85% (training,
compilation, per-epoch evaluation and checkpoint) plus everything this process did
outside the epochs (data loading, the constraint report, the final plots), so it is an
upper bound. Prints one line per seed and the mean +- std.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from s9jax import host_memory, receptive_field, train  # noqa: E402

TARGET = 0.85


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main():
  host_memory.reuse_freed_memory()  # Before JAX starts its CPU client.
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/base.py")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--root", default="runs/t85")
  args = parser.parse_args()
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  rows = []
  for seed in args.seeds:
    config = load_config(args.config)
    config.seed = seed
    workdir = pathlib.Path(args.root) / f"seed{seed}"
    resumed = bool(train.read_metrics(workdir))
    start = time.perf_counter()
    records = train.train_and_evaluate(config, workdir)
    wall = time.perf_counter() - start
    first = next((r for r in records if r.get("test_accuracy", 0) >= TARGET), None)
    passed = receptive_field.analyse_config(config).passed
    rows.append((seed, first, records[-1], wall, passed))
    if not first:
      to85 = "not reached"
    elif resumed:  # Earlier processes' startup is unknown: epochs only.
      to85 = (f"epoch {first['epoch']} after {first['elapsed_seconds'] / 60:.1f} min of epochs "
              "(resumed run: no wall time)")
    else:  # Plus what this process did outside the epochs (loading, compiling, plots).
      outside_epochs = wall - records[-1]["elapsed_seconds"]
      to85 = (f"epoch {first['epoch']} at {(first['elapsed_seconds'] + outside_epochs) / 60:.1f} "
              f"min wall ({first['elapsed_seconds'] / 60:.1f} min of epochs)")
    print(f"seed {seed}: >=85% {to85}; final {100 * records[-1]['test_accuracy']:.2f}% after "
          f"{records[-1]['epoch']} epochs, {records[-1]['elapsed_seconds'] / 60:.1f} min of epochs, "
          f"{wall / 60:.1f} min this process; constraints {'PASS' if passed else 'FAIL'}",
          flush=True)
  finals = np.array([100 * r[2]["test_accuracy"] for r in rows])
  print(f"final accuracy {finals.mean():.2f} +- {finals.std():.2f}% over seeds {args.seeds}")


if __name__ == "__main__":
  main()
