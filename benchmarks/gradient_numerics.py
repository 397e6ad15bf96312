"""How exact a config's float32 gradient is, per conv implementation: a numerics check,
not a timing.

    python benchmarks/gradient_numerics.py [--config configs/tiny.py] [--batches 6] \
        [--source_path ../shared/data/cifar10-jpeg.tar.xz]

The network at initialisation (its stem whitened where the config whitens it, as a run
starts), on batches of 64 training images normalised as training does, with dropout off.
For each implementation ('lax': XLA's convolutions and flax's BatchNorm; 'fast': s9jax's
XLA forms; 'native': the C++ kernels, where they build), one line per batch with two
medians over the parameter leaves of |g - g_ref| / |g_ref|:
  order    the gradient against the same batch's in reverse order (the loss is a mean
           over images, so the two are equal in exact arithmetic);
  float64  the gradient against the 'lax' network computed in float64 (jax_enable_x64;
           only its logits are rounded to float32, as the network returns them).
Both measure float32 rounding (and bfloat16's, where the config's 'auto' keys take it),
amplified by how sensitive the gradient is to it on that batch. The test split is never
read.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)  # For the float64 reference; the rest is cast.
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from s9jax import input_pipeline, models, native, train  # noqa: E402

BATCH = 64


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def gradient_fn(model, dtype):
  """(params, batch_stats, images, labels) -> the loss's gradient, all cast to `dtype`."""
  def loss(params, batch_stats, images, labels):
    logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, images,
                            train=True, mutable=["batch_stats"])
    return jnp.mean(train.cross_entropy(logits.astype(dtype), labels))

  grad = jax.jit(jax.grad(loss))
  cast = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)  # noqa: E731
  return lambda variables, images, labels: grad(
      cast(variables["params"]), cast(variables["batch_stats"]), cast(images), labels)


def median_relative_error(got, want) -> float:
  return float(np.median([
      np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.py"))
  parser.add_argument("--batches", type=int, default=6)
  parser.add_argument("--source_path", default="", help="as --config.data.source_path")
  parser.add_argument("--data_dir", default="", help="as --config.data.data_dir")
  args = parser.parse_args()
  config = load_config(args.config)
  config.model.dropout = 0.0
  if args.source_path:
    config.data.source_path = args.source_path
  if args.data_dir:
    config.data.data_dir = args.data_dir
  images, labels = input_pipeline.load_split(config.data, "train")
  mean, std = input_pipeline.channel_stats(images)

  impls = ["lax", "fast"] + (["native"] if native.available() else [])
  # A run's initial state (its learning rate does not enter a gradient).
  state = train.create_train_state(config, jax.random.PRNGKey(0), lambda step: 0.0, "lax")
  if config.whiten_stem:
    state = train.with_whitened_stem(state, images, mean, std)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  # Computed in float64 throughout: the module's own dtype (casting its inputs and params
  # is not enough: each layer casts back to its dtype). Its logits still end in float32.
  reference = models.create_model(config.model, conv_impl="lax")
  exact = gradient_fn(reference.clone(dtype=jnp.float64), jnp.float64)
  grads = {impl: gradient_fn(models.create_model(config.model, conv_impl=impl), jnp.float32)
           for impl in impls}

  print(f"{pathlib.Path(args.config).name}, {BATCH} training images a batch, at initialisation")
  print(f"{'batch':>12}  {'impl':7}  {'order':>8}  {'float64':>8}")
  for b in range(args.batches):
    chosen = slice(b * 1000, b * 1000 + BATCH)  # Batches 1,000 images apart.
    x = input_pipeline.normalize_batch(images[chosen], mean, std)
    y = jnp.asarray(labels[chosen])
    want = jax.tree.map(lambda a: np.asarray(a, np.float64), exact(variables, x, y))
    for impl in impls:
      got = grads[impl](variables, x, y)
      reversed_order = grads[impl](variables, x[::-1], y[::-1])
      print(f"{chosen.start:>5}-{chosen.stop - 1:<6}  {impl:7}  "
            f"{median_relative_error(got, reversed_order):8.1e}  "
            f"{median_relative_error(got, want):8.1e}")


if __name__ == "__main__":
  main()
