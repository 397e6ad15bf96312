"""Where a train step's time goes: XLA's own per-op profile, summed by op kind.

    python benchmarks/profile_step.py [--config base] [--batch 256] [--steps 5] [--top 15]

Runs the real jitted `train.train_step` on random data under `jax.profiler`, then reads
the Perfetto trace it writes and prints images/s, the slowest ops and the time per op kind
(XLA's fusion names without their numbers, e.g. `wrapped_reduce-window`,
`ynn_fusion`). Pass `--hlo FILE` to also write the optimised HLO, to look up what an op
computes, and `--by-size` to sum the time by the largest map (H x W) of the batch each op
reads or writes: where a network with blocks at several resolutions spends its step.
This is how every fast path in `s9jax/ops.py` was found.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import importlib
import json
import math
import pathlib
import re
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from s9jax import host_memory, train  # noqa: E402


def main():
  host_memory.reuse_freed_memory()  # Before JAX starts its CPU client.
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="base", help="a module in configs/")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--top", type=int, default=15)
  parser.add_argument("--hlo", help="write the optimised HLO of the step here")
  parser.add_argument("--by-size", action="store_true",
                      help="also sum the op time by the largest batch map each op touches")
  args = parser.parse_args()

  config = importlib.import_module(f"configs.{args.config}").get_config()
  state = train.create_train_state(config, jax.random.PRNGKey(0),
                                   train.create_learning_rate_fn(config, 100))
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(args.batch, 32, 32, 3)).astype(np.float32),
           "label": rng.integers(0, 10, args.batch).astype(np.int32)}
  key = jax.random.PRNGKey(1)
  # Compile once, ahead of time, so the HLO written and mapped below is the very
  # executable profiled (the compiled step takes the static loss options no more).
  step = train.jitted_train_step(jax.default_backend()).lower(
      state, batch, key, train.LossOptions.from_config(config)).compile()
  hlo = step.as_text()
  if args.hlo:
    pathlib.Path(args.hlo).write_text(hlo)
  for _ in range(3):  # Warm up.
    state, metrics = step(state, batch, key)
  jax.block_until_ready(metrics)

  with tempfile.TemporaryDirectory() as trace_dir:
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(args.steps):
        state, metrics = step(state, batch, key)
      jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
    trace_file = next(pathlib.Path(trace_dir).rglob("*.trace.json.gz"))
    events = json.load(gzip.open(trace_file))["traceEvents"]

  per_op, per_kind, kind_count = collections.Counter(), collections.Counter(), collections.Counter()
  for event in events:
    name = event.get("name", "")
    # Complete events of XLA ops only: skip Python frames ($...) and the executor's own.
    if event.get("ph") != "X" or name.startswith("$") or "Thunk" in name or "::" in name:
      continue
    per_op[name] += event["dur"] / 1e3 / args.steps
    kind = re.sub(r"\.\d+$", "", name)
    per_kind[kind] += event["dur"] / 1e3 / args.steps
    kind_count[kind] += 1 / args.steps

  print(f"{args.config}, batch {args.batch}: {args.batch * args.steps / seconds:.1f} images/s "
        f"under the profiler; op time {sum(per_kind.values()):.1f} ms a step")
  print("\nslowest ops (ms a step):")
  for name, ms in per_op.most_common(args.top):
    print(f"  {ms:8.2f}  {name}")
  print("\nby op kind (ms a step, ops a step):")
  for kind, ms in per_kind.most_common(args.top):
    print(f"  {ms:8.2f}  {kind_count[kind]:5.0f}  {kind}")
  if args.by_size:
    print_by_size(per_op, hlo, args.batch)


def map_sizes(hlo: str, batch: int) -> dict[str, int]:
  """Each instruction's name -> the largest H of the square maps of the batch among its
  result and operands in the optimised HLO: (batch, H, H, C) arrays, and the
  (batch * H * H, C) matrices of the 1x1 convs and their gradients; 0 for none."""
  def height(shape: str) -> int:
    dims = [int(d) for d in shape.split(",") if d]
    if len(dims) == 4 and dims[0] == batch:
      return dims[1]
    side = math.isqrt(dims[0] // batch) if len(dims) == 2 else 0
    return side if side > 1 and dims[0] == batch * side * side else 0

  instructions = {}  # name -> (its result's height, its operands' names)
  for line in hlo.splitlines():
    match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \(?\w+\[([\d,]*)\][^ ]* (.*)", line)
    if match and match[1] not in instructions:
      instructions[match[1]] = (height(match[2]), re.findall(r"%([\w.\-]+)", match[3]))
  return {name: max([own] + [instructions.get(o, (0,))[0] for o in operands])
          for name, (own, operands) in instructions.items()}


def print_by_size(per_op, hlo: str, batch: int):
  sizes = map_sizes(hlo, batch)
  per_size = collections.defaultdict(collections.Counter)
  for name, ms in per_op.items():
    # Ops of no HLO instruction (the executable's own overhead) go under -1.
    per_size[sizes.get(name, -1)][re.sub(r"\.\d+$", "", name)] += ms
  print("\nby the largest batch map an op touches (ms a step; 0: none, -1: not an HLO op):")
  for size, kinds in sorted(per_size.items(), reverse=True):
    parts = ", ".join(f"{kind} {ms:.1f}" for kind, ms in kinds.most_common(5))
    print(f"  {size:>3}x{size:<3} {sum(kinds.values()):8.2f}  {parts}")


if __name__ == "__main__":
  main()
