"""Benchmark 1: train-step throughput (images/s) of s9jax vs the same network in PyTorch
eager (channels_last, CPU), measured side by side in one process, for each network
(base.py's, fast.py's: the same with the stride in the stem, and the seed network).

    pip install -e ".[bench]" && python benchmarks/train_step.py [--steps 20] [--batch N] [--repeats 2]

Prints one line per network:
    network  params  batch  s9jax img/s  torch img/s  torch-glibc img/s  ratio
Each network at its config's training batch size unless --batch is given; s9jax with the
config's `model.conv_impl` ('auto': the C++ kernels on one CPU device).
Both sides run the same maths: same layer shapes, BatchNorm in training mode, dropout
where the config has it, softmax cross-entropy, SGD with momentum.

The process runs with s9jax's malloc settings (s9jax/host_memory.py), as training does.
They change torch's speed too (faster on the seed network, slower on the others), so
torch is also timed in a child process with glibc's defaults (`torch-glibc`), and the
ratio is s9jax over the faster of torch's two.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from s9jax import host_memory, train  # noqa: E402


def jax_images_per_second(config, batch: int, steps: int, size: int = 32) -> tuple[float, int]:
  """(images a second, params) of the train step on random `size`-px images (24: the
  size of a progressive-resizing epoch)."""
  lr_fn = train.create_learning_rate_fn(config, steps)
  state = train.create_train_state(config, jax.random.PRNGKey(0), lr_fn)
  rng = np.random.default_rng(0)
  data = {"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
          "label": rng.integers(0, 10, batch).astype(np.int32)}
  key, loss_options = jax.random.PRNGKey(1), train.LossOptions.from_config(config)
  for _ in range(2):  # Compile and warm up.
    state, metrics = train.train_step(state, data, key, loss_options)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = train.train_step(state, data, key, loss_options)
  jax.block_until_ready(metrics)
  params = sum(p.size for p in jax.tree.leaves(state.params))
  return batch * steps / (time.perf_counter() - start), params


def torch_network(config):
  import torch.nn as tnn

  m = config.model

  def bn_relu_after(conv, c):
    return [conv, tnn.BatchNorm2d(c), tnn.ReLU()]

  def separable(cin, cout, stride=1, dilation=1, padding=None):
    padding = dilation if padding is None else padding
    return [tnn.Conv2d(cin, cin, 3, stride, padding, dilation, groups=cin, bias=False),
            tnn.Conv2d(cin, cout, 1, bias=False)]

  class Residual(tnn.Module):
    def __init__(self, c, dilation):
      super().__init__()
      self.body = tnn.Sequential(*separable(c, c, dilation=dilation), tnn.BatchNorm2d(c), tnn.ReLU(),
                                 *separable(c, c, dilation=dilation), tnn.BatchNorm2d(c), tnn.ReLU())

    def forward(self, x):
      return x + self.body(x)

  if m.name == "seed":
    def rbd(c):  # The reference's ReLU -> BN -> dropout.
      return [tnn.ReLU(), tnn.BatchNorm2d(c), tnn.Dropout(m.dropout)]
    layers = [tnn.Conv2d(3, 128, 3, padding=2, bias=False), *rbd(128)]
    cin = 128
    blocks = [((64,), 32, 2), ((256, 70), 32, 2), ((128, 128), 32, 2), ((100, 64), 80, 1)]
    for seps, down, dilation in blocks:
      for c in seps:
        layers += [*separable(cin, c, padding=2), *rbd(c)]
        cin = c
      layers += [tnn.Conv2d(cin, down, 3, 2, 2, dilation, bias=False), *rbd(down)]
      cin = down
    layers += [tnn.AdaptiveAvgPool2d(1), tnn.Conv2d(cin, 10, 1, bias=False), tnn.Flatten()]
    return tnn.Sequential(*layers)

  layers = bn_relu_after(tnn.Conv2d(3, m.stem_width, 3, m.stem_stride, padding=1,
                                    bias=False), m.stem_width)
  cin = m.stem_width
  for width, depth, sep, stride, down_dilation, dilation in zip(
      m.widths, m.depths, m.separable_down, m.down_strides, m.down_dilations, m.block_dilations):
    down = (separable(cin, width, stride, down_dilation) if sep
            else [tnn.Conv2d(cin, width, 3, stride, down_dilation, down_dilation, bias=False)])
    layers += [*down, tnn.BatchNorm2d(width), tnn.ReLU()]
    layers += [Residual(width, dilation) for _ in range(depth)]
    cin = width
  layers += [tnn.AdaptiveAvgPool2d(1), tnn.Dropout(m.dropout), tnn.Conv2d(cin, 10, 1), tnn.Flatten()]
  return tnn.Sequential(*layers)


def torch_images_per_second(config, batch: int, steps: int) -> tuple[float, int]:
  import torch

  torch.manual_seed(0)
  net = torch_network(config).to(memory_format=torch.channels_last).train()
  opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=config.momentum,
                        nesterov=config.nesterov, weight_decay=config.weight_decay)
  loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
  x = torch.randn(batch, 3, 32, 32).to(memory_format=torch.channels_last)
  y = torch.randint(0, 10, (batch,))

  def step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(net(x), y)
    loss.backward()
    opt.step()

  for _ in range(2):
    step()
  start = time.perf_counter()
  for _ in range(steps):
    step()
  params = sum(p.numel() for p in net.parameters())
  return batch * steps / (time.perf_counter() - start), params


def torch_with_glibc_malloc(args) -> dict[str, float]:
  """Torch's best images/s per network, timed in a child process with glibc's malloc
  defaults (S9JAX_MALLOC=system)."""
  command = [sys.executable, __file__, "--torch-only", "--steps", str(args.steps),
             "--repeats", str(args.repeats), "--configs", *args.configs]
  if args.batch:
    command += ["--batch", str(args.batch)]
  result = subprocess.run(command, env={**os.environ, "S9JAX_MALLOC": "system"},
                          capture_output=True, text=True, check=True)
  return {name: float(ips) for name, ips in (line.split() for line in result.stdout.splitlines())}


def main():
  host_memory.reuse_freed_memory()  # Before JAX starts its CPU client.
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--batch", type=int, help="default: each config's batch_size")
  parser.add_argument("--configs", nargs="+", default=["base", "fast", "seed"])
  parser.add_argument("--repeats", type=int, default=2,
                      help="alternate s9jax and torch this many times; report each one's best")
  parser.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  import torch
  if args.torch_only:  # The child of torch_with_glibc_malloc.
    for name in args.configs:
      config = importlib.import_module(f"configs.{name}").get_config()
      runs = [torch_images_per_second(config, args.batch or config.batch_size, args.steps)
              for _ in range(args.repeats)]
      print(name, max(runs)[0], flush=True)
    return
  print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {args.steps} timed steps, best of {args.repeats}")
  print(f"{'network':8s} {'params':>8s} {'batch':>5s} {'s9jax img/s':>12s} {'torch img/s':>12s} "
        f"{'torch-glibc img/s':>18s} {'ratio':>6s}")
  measured = []
  for name in args.configs:
    config = importlib.import_module(f"configs.{name}").get_config()
    batch = args.batch or config.batch_size
    # Alternated and best-of: measured once each, a network timed second in the process
    # ran up to 17% slower (base: 1,128 then 938 img/s), so no single run is trusted.
    jax_runs, torch_runs = [], []
    for _ in range(args.repeats):
      jax_runs.append(jax_images_per_second(config, batch, args.steps))
      torch_runs.append(torch_images_per_second(config, batch, args.steps))
    (jax_ips, jax_params), (torch_ips, torch_params) = max(jax_runs), max(torch_runs)
    assert jax_params == torch_params, f"{name}: jax {jax_params} vs torch {torch_params} params"
    measured.append((name, jax_params, batch, jax_ips, torch_ips))
  glibc = torch_with_glibc_malloc(args)
  for name, params, batch, jax_ips, torch_ips in measured:
    best_torch = max(torch_ips, glibc[name])
    print(f"{name:8s} {params:8,d} {batch:5d} {jax_ips:12.1f} {torch_ips:12.1f} "
          f"{glibc[name]:18.1f} {jax_ips / best_torch:6.2f}", flush=True)


if __name__ == "__main__":
  main()
