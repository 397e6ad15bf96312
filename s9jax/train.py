"""Training: state, the jitted train and eval steps, the epoch loop, Orbax checkpoints.

    python -m s9jax.train --config configs/base.py --workdir runs/base [--config.key=value]

Rerunning the same command with the same workdir resumes from the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging as pylogging
import os
import pathlib
import shutil
import signal
import sys
import time
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app, flags, logging
from flax.training import train_state
from jax.experimental import multihost_utils
from ml_collections import config_flags
from tqdm import tqdm

from s9jax import (compilation_cache, host_memory, input_pipeline, metric_writers, models,
                   ops, plots, receptive_field)

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_SLACK_BYTES = 1 << 20  # Orbax's metadata files, rounded up to pages.
# learning_curves.png is redrawn after an epoch at most this often, and after the last:
# matplotlib takes ~0.3 s a drawing, ~2% of fast.py's run when every epoch drew one.
# TensorBoard's curves stay live.
CURVES_EVERY_SECONDS = 60.0
CONFIG_FILE = "config.json"


class TrainState(train_state.TrainState):
  batch_stats: Any


class LookaheadTrainState(TrainState):
  """With `lookahead_every` > 0: the slow copy of params and batch_stats, and the decay
  of its pull towards the fast ones as a function of the step. A subclass, so every
  other run's checkpoints keep TrainState's tree (and older ones restore)."""
  slow: Any = None
  slow_decay: Callable | None = flax.struct.field(pytree_node=False, default=None)


class ConfigError(Exception):
  """A config or workdir that cannot be trained as asked."""


class TrainingDiverged(Exception):
  """The loss went NaN or infinite."""


class Interrupted(Exception):
  """SIGTERM or Ctrl-C arrived; the state was saved mid-epoch."""


class CheckpointWriteError(Exception):
  """A checkpoint could not be written (disk full, permissions); nothing was committed."""


# ------------------------------------------------------------------ devices

def make_mesh(num_devices: int = 0) -> jax.sharding.Mesh:
  """A 1-D 'data' mesh over the first `num_devices` devices (0: all, over every host).
  Batches are split along it and the state is replicated, so XLA all-reduces the
  gradients and BatchNorm's batch statistics: both are over the global batch."""
  devices = jax.devices()
  count = num_devices or len(devices)
  if count > len(devices):
    raise ConfigError(f"num_devices is {count} but only {len(devices)} devices are visible")
  return jax.make_mesh((count,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices[:count])


def replicated(mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def shard_batch(batch: dict, mesh) -> dict:
  """This host's rows of a global batch -> global arrays split along the 'data' axis."""
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def host_rows(array: np.ndarray) -> np.ndarray:
  """This host's equal share of a global batch held whole by every host."""
  per_host = len(array) // jax.process_count()
  return array[jax.process_index() * per_host:(jax.process_index() + 1) * per_host]


# ------------------------------------------------------------------ state and steps

def create_learning_rate_fn(config, steps_per_epoch: int):
  if config.schedule == "constant":
    return optax.constant_schedule(config.learning_rate)
  if config.schedule == "onecycle":
    total = config.num_epochs * steps_per_epoch
    warmup = max(1, int(config.warmup_epochs * steps_per_epoch))
    return optax.join_schedules([
        optax.linear_schedule(config.learning_rate * config.warmup_start, config.learning_rate,
                              warmup),
        optax.linear_schedule(config.learning_rate, 0.0, max(1, total - warmup)),
    ], boundaries=[warmup])
  raise ConfigError(f"schedule must be 'constant' or 'onecycle', got {config.schedule!r}")


@functools.partial(jax.jit, static_argnums=0)  # Static: any Python int seeds it, as eagerly.
def run_keys(seed: int):
  """The initialiser's, dropout's and the on-device augmentation's keys of a run. One
  program, compiled once a process for a seed: op by op, its random ops compiled three."""
  key = jax.random.PRNGKey(seed)
  init_rng, dropout_rng = jax.random.split(key)
  return init_rng, dropout_rng, jax.random.fold_in(key, 0xA06)


def epoch_image_size(config, epoch: int) -> int:
  """The pixels epoch `epoch` (from 1) trains at: `progressive_size` for the first
  `progressive_epochs` (progressive resizing), then `augment.image_size`."""
  return (config.progressive_size if epoch <= config.progressive_epochs
          else config.augment.image_size)


def create_optimizer(config, learning_rate_fn) -> optax.GradientTransformation:
  if config.optimizer not in ("sgd", "muon"):
    raise ConfigError(f"optimizer must be 'sgd' or 'muon', got {config.optimizer!r}")
  # Decay conv kernels only: BatchNorm scales and biases are not weights to shrink.
  kernels = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: path[-1].key == "kernel", params)
  sgd = lambda scale=1.0: optax.sgd(
      learning_rate_fn if scale == 1.0 else lambda step: scale * learning_rate_fn(step),
      momentum=config.momentum, nesterov=config.nesterov)
  decayed_sgd = optax.chain(optax.add_decayed_weights(config.weight_decay, mask=kernels), sgd())
  if (config.optimizer == "sgd" and config.bn_bias_lr_scale == 1.0
      and not config.bn_scale_frozen and not config.whiten_stem):
    return decayed_sgd  # One group: checkpoints of such runs keep their optimizer state.

  def group(path, leaf):
    if config.whiten_stem and tuple(k.key for k in path) == STEM_KERNEL:
      return "frozen"
    if config.optimizer == "muon" and is_hidden_conv_kernel(path, leaf):
      return "muon"
    if not any("BatchNorm" in str(getattr(key, "key", "")) for key in path):
      return "weights"
    return "bn_scale" if path[-1].key == "scale" else "bn_bias"

  # airbench's BatchNorm: scales frozen at 1, biases at a multiple of the learning rate.
  groups = {"weights": decayed_sgd, "bn_bias": sgd(config.bn_bias_lr_scale),
            "bn_scale": optax.set_to_zero() if config.bn_scale_frozen else sgd(),
            "frozen": optax.set_to_zero()}
  if config.optimizer == "muon":
    groups["muon"] = muon(config, learning_rate_fn)
  return optax.multi_transform(groups,
                               lambda params: jax.tree_util.tree_map_with_path(group, params))


def is_hidden_conv_kernel(path, leaf) -> bool:
  """A conv kernel other than the classifier's (whose outputs are the class logits)."""
  return path[-1].key == "kernel" and leaf.ndim == 4 and leaf.shape[-1] != models.NUM_CLASSES


def muon_dimensions(path, leaf):
  """How Muon reads a kernel (kh, kw, in, out) as matrices: a dense or 1x1 conv as one
  (kh*kw*in) x out map; a depthwise conv as `out` separate 9 x 1 maps, one per channel,
  whose orthogonal update is the channel's gradient scaled to unit norm."""
  if any(getattr(key, "key", None) == "depthwise" for key in path):
    return optax.contrib.MuonDimensionNumbers(reduction_axis=(0, 1), output_axis=2)
  return optax.contrib.MuonDimensionNumbers(reduction_axis=(0, 1, 2), output_axis=3)


def muon(config, learning_rate_fn) -> optax.GradientTransformation:
  """airbench94_muon's optimizer for the hidden conv kernels: Nesterov momentum,
  orthogonalised by Newton-Schulz (`optax.contrib.scale_by_muon`), a step of
  `muon_learning_rate` x the schedule's shape, then each kernel rescaled to a fixed
  norm (sqrt of its output channels). BatchNorm follows every such conv, so a kernel's
  norm does nothing but set its effective step size; holding it fixed stands in for
  weight decay, and keeps the step the rate says."""
  scale = config.muon_learning_rate / config.learning_rate
  dimensions = lambda tree: jax.tree_util.tree_map_with_path(muon_dimensions, tree)
  return optax.chain(
      optax.contrib.scale_by_muon(beta=config.muon_momentum, nesterov=True,
                                  weight_dimension_numbers=dimensions),
      optax.scale_by_learning_rate(lambda step: scale * learning_rate_fn(step)),
      hold_kernel_norms())


def hold_kernel_norms() -> optax.GradientTransformation:
  """Turns each update into the step to `params + update` rescaled to norm sqrt(out)."""

  def update_fn(updates, state, params):
    def step(update, param):
      new = param + update
      return new * (jnp.sqrt(new.shape[-1]) / jnp.linalg.norm(new)) - param
    return jax.tree.map(step, updates, params), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


STEM_KERNEL = ("Conv_0", "kernel")  # s9net's first conv, on the RGB input.


def whitening_kernel(images: np.ndarray, mean, std, width: int, size: int = 3,
                     count: int = 2000, eps: float = 5e-4) -> np.ndarray:
  """airbench's frozen first layer: a (size, size, 3, width) conv kernel whose filters
  are the top width/2 eigenvectors of the covariance of size x size patches of the
  (normalised) `images`, each scaled by 1/sqrt(eigenvalue + eps) and taken with both
  signs, so the ReLU after it keeps every direction: its outputs are decorrelated
  patches. Computed from the first `count` images."""
  x = (images[:count].astype(np.float32) / 255.0 - mean) / std
  patches = np.lib.stride_tricks.sliding_window_view(x, (size, size), axis=(1, 2))
  patches = patches.reshape(-1, 3 * size * size).astype(np.float64)  # (C, kh, kw) order.
  patches -= patches.mean(0)
  eigenvalues, eigenvectors = np.linalg.eigh(patches.T @ patches / len(patches))
  top = np.argsort(eigenvalues)[::-1][:width // 2]
  filters = eigenvectors[:, top] / np.sqrt(eigenvalues[top] + eps)
  filters = filters.reshape(3, size, size, -1).transpose(1, 2, 0, 3)  # -> HWIO.
  return np.concatenate([filters, -filters], axis=-1).astype(np.float32)


def with_whitened_stem(state: TrainState, images: np.ndarray, mean, std) -> TrainState:
  """`state` with its stem kernel replaced by `whitening_kernel` of `images`."""
  name, key = STEM_KERNEL
  kernel = whitening_kernel(images, mean, std, width=state.params[name][key].shape[-1])
  return state.replace(params={**state.params, name: {**state.params[name], key: kernel}})


def create_train_state(config, rng, learning_rate_fn, conv_impl: str | None = None,
                       total_steps: int = 0) -> TrainState:
  """`conv_impl` overrides the config's (a run passes the one it resolved); `total_steps`
  (the run's) sets the lookahead's decay schedule, when it has one."""
  model = models.create_model(config.model, conv_impl)
  size = config.augment.image_size
  tx = create_optimizer(config, learning_rate_fn)

  @jax.jit
  def init(rng):
    # The optimizer's state in the same program: op by op, each of its zeros is a
    # program of its own (~17 a run, ~0.6 s), each compiled again by every run.
    variables = model.init({"params": rng}, jnp.zeros((1, size, size, 3), jnp.float32),
                           train=False)
    return variables, tx.init(variables["params"])

  variables, opt_state = init(rng)
  # What TrainState.create builds, with the optimizer's state already made.
  fields = dict(step=0, apply_fn=model.apply, params=variables["params"],
                batch_stats=variables["batch_stats"], tx=tx, opt_state=opt_state)
  if not config.lookahead_every:
    return TrainState(**fields)
  return LookaheadTrainState(
      **fields,
      slow=jax.tree.map(jnp.copy, {"params": variables["params"],  # Own buffers: both
                                   "batch_stats": variables["batch_stats"]}),  # are donated.
      slow_decay=functools.partial(lookahead_decay, every=config.lookahead_every,
                                   total_steps=max(1, total_steps)))


def lookahead_decay(step, every: int, total_steps: int):
  """airbench94's lookahead schedule: at every `every`-th step the slow weights move
  1 - decay of the way to the fast ones and the fast ones restart from them, decay
  growing as (step / total)^3 to 0.95^every; at the last step decay is 1, so the run
  ends on the slow weights. Returns (sync now, decay)."""
  last = step >= total_steps
  decay = jnp.where(last, 1.0, 0.95 ** every * (jnp.minimum(step, total_steps) / total_steps) ** 3)
  return (step % every == 0) | last, decay


def lookahead_sync(state: LookaheadTrainState) -> LookaheadTrainState:
  sync, decay = state.slow_decay(state.step)
  fast = {"params": state.params, "batch_stats": state.batch_stats}
  slow = jax.tree.map(lambda s, f: jnp.where(sync, s + (1 - decay) * (f - s), s),
                      state.slow, fast)
  fast = jax.tree.map(lambda s, f: jnp.where(sync, s, f), slow, fast)
  return state.replace(params=fast["params"], batch_stats=fast["batch_stats"], slow=slow)


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def mixup_weight(rng, alpha: float):
  """Mixup's (Zhang et al. 2018) weight for one batch, as big_vision's `get_mixup` draws
  it: a ~ Beta(alpha, alpha), folded to a >= 1/2 so that each image keeps its own label
  as the larger share."""
  a = jax.random.beta(rng, alpha, alpha)
  return jnp.maximum(a, 1 - a)


class LossOptions(NamedTuple):
  """The training loss's settings, one static argument of every jitted train step: a
  hashable tuple, so each setting compiles its own program and a new one is added here
  and in `from_config`, not to every step's signature."""
  label_smoothing: float = 0.0
  mixup_alpha: float = 0.0  # Off: the step traces as it did before mixup existed.

  @classmethod
  def from_config(cls, config) -> "LossOptions":
    return cls(float(config.label_smoothing), float(config.mixup_alpha))


def _train_step(state: TrainState, batch, dropout_rng, loss_options: LossOptions = LossOptions()):
  """One SGD step on one batch. Pure: the dropout key (and mixup's) is folded with the
  step number, so a resumed run draws the same masks."""
  label_smoothing, mixup_alpha = loss_options
  rng = jax.random.fold_in(dropout_rng, state.step)
  images, labels = batch["image"], batch["label"]
  if mixup_alpha:  # Without it, the dropout keys stay those of runs before mixup existed.
    # Each image mixed with its neighbour in the (already shuffled) batch, as big_vision.
    rng, mixup_rng = jax.random.split(rng)
    a = mixup_weight(mixup_rng, mixup_alpha)
    images = a * images + (1 - a) * jnp.roll(images, 1, axis=0)

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True,
        mutable=["batch_stats"], rngs={"dropout": rng})
    loss = cross_entropy(logits, labels, label_smoothing)
    if mixup_alpha:  # The targets mixed as the images were.
      loss = a * loss + (1 - a) * cross_entropy(logits, jnp.roll(labels, 1), label_smoothing)
    loss = loss.mean()
    return loss, (logits, updates["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if isinstance(state, LookaheadTrainState):
    state = lookahead_sync(state)
  # Against each image's own label: with mixup, the larger share of its target.
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return state, {"loss": loss, "accuracy": accuracy}


@functools.cache
def _jitted(step_fn, backend: str, static_argnames: tuple[str, ...]):
  """A train step jitted for one backend, the state donated: XLA:CPU's options only where
  XLA:CPU compiles. Built on first use, not at import, so importing s9jax starts no
  backend (multi-host runs must call jax.distributed.initialize() first)."""
  return jax.jit(step_fn, static_argnames=static_argnames, donate_argnums=0,
                 compiler_options=ops.compiler_options(backend))


def jitted_train_step(backend: str):
  return _jitted(_train_step, backend, ("loss_options",))


def train_step(state: TrainState, batch, dropout_rng, loss_options: LossOptions = LossOptions()):
  """`_train_step`, jitted with the default backend's compiler options."""
  return jitted_train_step(jax.default_backend())(state, batch, dropout_rng, loss_options)


def _train_step_at_size(state: TrainState, images, labels, dropout_rng, size: int,
                        loss_options: LossOptions):
  """`_train_step` on normalised `images`, first resized to `size` pixels where they
  differ (progressive resizing): the tail both input paths share."""
  if size != images.shape[1]:
    images = input_pipeline.resize_batch(images, size)
  return _train_step(state, {"image": images, "label": labels}, dropout_rng, loss_options)


def _train_step_on_host_batch(state: TrainState, batch, dropout_rng, normalize, size: int,
                              loss_options: LossOptions = LossOptions()):
  """`_train_step` on a host pipeline's batch of augmented uint8 images: `normalize`
  (`input_pipeline.normalize_batch` with the run's statistics bound) and the resize to
  `size` pixels (progressive resizing) run inside the step's one XLA program, off the
  host's per-image path, and the host sends a quarter of float32's bytes."""
  return _train_step_at_size(state, normalize(batch["image"]), batch["label"], dropout_rng,
                             size, loss_options)


def train_step_on_host_batch(state: TrainState, batch, dropout_rng, normalize, size: int,
                             loss_options: LossOptions = LossOptions()):
  """`_train_step_on_host_batch`, jitted with the default backend's compiler options."""
  return _jitted(_train_step_on_host_batch, jax.default_backend(),
                 ("normalize", "size", "loss_options"))(
      state, batch, dropout_rng, normalize, size, loss_options)


def _train_step_on_device(state: TrainState, train_set, index, dropout_rng, augment_rng,
                          augment, size: int, loss_options: LossOptions = LossOptions(),
                          flip=None):
  """`_train_step` on a batch gathered from the uint8 training set held on the devices
  (`augment.backend = 'jax'`): the host sends only the records' `index` (and `flip`, with
  `augment.alternate_flip`). `augment` (`input_pipeline.device_augment` with the config
  bound) is seeded by the step, so a resumed run draws the same; then the batch is
  resized to `size` pixels if smaller (progressive resizing)."""
  images = augment(jax.random.fold_in(augment_rng, state.step), train_set["image"][index],
                   flip=flip)
  return _train_step_at_size(state, images, train_set["label"][index], dropout_rng, size,
                             loss_options)


def train_step_on_device(state: TrainState, train_set, index, dropout_rng, augment_rng,
                         augment, size: int, loss_options: LossOptions = LossOptions(),
                         flip=None):
  """`_train_step_on_device`, jitted with the default backend's compiler options."""
  return _jitted(_train_step_on_device, jax.default_backend(),
                 ("augment", "size", "loss_options"))(
      state, train_set, index, dropout_rng, augment_rng, augment, size, loss_options, flip)


def place_on_devices(arrays: dict, mesh) -> dict:
  """Host arrays held whole by every process -> global arrays replicated on every device
  of the mesh (the training set of `augment.backend = 'jax'`: 150 MB of uint8)."""
  return {k: jax.make_array_from_process_local_data(replicated(mesh), np.asarray(v))
          for k, v in arrays.items()}


def tta_logits(apply_fn, variables, images, flip: bool = False, translate: int = 0,
               translate_weight: float = 0.5):
  """Eval-mode logits of normalised NHWC `images`, averaged over the test-time
  augmentations (see `eval_step`). Pure: the evaluation, `s9jax.load` and the exported
  artifact all compute it."""

  def predict(x):
    logits = apply_fn(variables, x, train=False)
    if flip:
      logits = (logits + apply_fn(variables, x[:, :, ::-1], train=False)) / 2
    return logits

  logits = predict(images)
  if translate:
    t, (h, w) = translate, images.shape[1:3]
    padded = jnp.pad(images, ((0, 0), (t, t), (t, t), (0, 0)), mode="reflect")
    shifted = (predict(padded[:, :h, :w]) + predict(padded[:, 2 * t:, 2 * t:])) / 2
    logits = (1 - translate_weight) * logits + translate_weight * shifted
  return logits


# Without COMPILER_OPTIONS: in a forward-only graph, YNNPACK dot fusions swallow the
# depthwise taps and BatchNorm before each 1x1 and run them slowly; measured, the
# default options evaluate 4x faster (flip-TTA on 10,000 images: 20.4 s -> 4.8 s).
@functools.partial(jax.jit, static_argnames=("flip", "translate", "translate_weight"))
def eval_step(state: TrainState, batch, flip: bool = False, translate: int = 0,
              translate_weight: float = 0.5):
  """Sums over the unmasked examples, and each example's prediction, from the logits
  averaged over the test-time augmentations: with `flip`, the mirrored image; with
  `translate`, the image shifted `translate` pixels up-left and down-right
  (reflect-padded, each with its mirror too) weighs `translate_weight` together, the
  original the rest (airbench: 0.5, so a quarter each shift)."""
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  logits = tta_logits(state.apply_fn, variables, batch["image"], flip, translate,
                      translate_weight)
  mask = batch["mask"]
  predictions = jnp.argmax(logits, -1)
  return {"loss_sum": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
          "correct": jnp.sum((predictions == batch["label"]) * mask),
          "count": jnp.sum(mask)}, predictions


def evaluate(state, images, labels, batch_size: int, flip: bool, mesh=None,
             translate: int = 0, split: str = "test", translate_weight: float = 0.5):
  """`{split}_loss`, `{split}_accuracy` and every prediction, over the whole normalised
  split (each host holds it all and evaluates its share of every batch)."""
  mesh = mesh or make_mesh(1)
  totals = {"loss_sum": 0.0, "correct": 0, "count": 0}
  predictions = []
  for batch in input_pipeline.eval_batches(images, labels, batch_size):
    sums, pred = eval_step(state, shard_batch({k: host_rows(v) for k, v in batch.items()},
                                              mesh), flip=flip, translate=translate,
                                 translate_weight=translate_weight)
    for key, value in jax.device_get(sums).items():
      totals[key] += value
    predictions.append(multihost_utils.process_allgather(pred, tiled=True)[batch["mask"]])
  count = int(totals["count"])
  return {f"{split}_loss": float(totals["loss_sum"]) / count,
          f"{split}_accuracy": int(totals["correct"]) / count}, np.concatenate(predictions)


def evaluate_test_set(config, state, images, labels, mesh=None):
  """`evaluate` as the config asks: its eval batch size and test-time augmentations."""
  return evaluate(state, images, labels, config.eval_batch_size, config.eval_flip, mesh,
                  config.eval_translate, translate_weight=config.eval_translate_weight)


def _raw_moments(stats, back: bool = False):
  """Each BatchNorm's {'mean', 'var'} in a batch_stats tree as {'mean', E[x^2]}, or with
  `back` the reverse: raw moments are what average over batches."""
  if set(stats) == {"mean", "var"}:
    mean = stats["mean"]
    if back:  # On the host, in float64; rounding must not make a variance negative.
      return {"mean": mean, "var": np.maximum(stats["var"] - mean ** 2, 0.0)}
    return {"mean": mean, "var": stats["var"] + mean ** 2}
  return {name: _raw_moments(layer, back) for name, layer in stats.items()}


@jax.jit
def _batch_raw_moments(state: TrainState, batch):
  """`_raw_moments` of every BatchNorm over one batch in training mode (normalised by its
  own statistics all the way through, as in a train step), read back from the running
  averages' update of zeros: (1 - momentum) x the batch's statistics."""
  zeros = jax.tree.map(jnp.zeros_like, state.batch_stats)
  _, updates = state.apply_fn({"params": state.params, "batch_stats": zeros}, batch, train=True,
                              mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(0)})
  return _raw_moments(jax.tree.map(lambda v: v / (1 - models.BATCH_NORM_MOMENTUM),
                                   updates["batch_stats"]))


def recalibrate_batch_stats(state: TrainState, images, batch_size: int, normalize,
                            mesh=None) -> TrainState:
  """`state` with BatchNorm's running statistics replaced by their values over `images`
  (uint8, un-augmented, the same on every host), in whole batches of `batch_size`: each
  batch's statistics as a train step computes them, pooled (the mean of the batch means;
  the mean of the batch variances plus the variance of the batch means). Why: the
  running averages follow the last ~10 batches of augmented images (momentum 0.9), and
  evaluation sees clean ones (`bn_recalibrate`, docs/benchmarks.md)."""
  mesh = mesh or make_mesh(1)
  count = len(images) // batch_size
  if not count:
    raise ValueError(f"{len(images)} images make no whole batch of {batch_size}")
  total = None
  for start in range(0, count * batch_size, batch_size):
    batch = shard_batch({"image": normalize(host_rows(images[start:start + batch_size]))},
                        mesh)["image"]
    moments = jax.tree.map(lambda v: np.asarray(v, np.float64),  # Summed in float64.
                           jax.device_get(_batch_raw_moments(state, batch)))
    total = moments if total is None else jax.tree.map(np.add, total, moments)
  pooled = _raw_moments(jax.tree.map(lambda v: v / count, total), back=True)
  batch_stats = jax.tree.map(lambda new, old: jnp.asarray(new, old.dtype), pooled,
                             state.batch_stats)
  return state.replace(batch_stats=jax.device_put(batch_stats, replicated(mesh)))


# ------------------------------------------------------------------ checkpoints, files

BEST_METRIC = "val_accuracy"  # Never the test set's: it is read once, at the end.


def checkpoint_manager(workdir, keep: int, track_best: bool = True) -> ocp.CheckpointManager:
  # Keep the latest `keep` and, with `track_best` (a validation split), the best by
  # validation accuracy. Plain max_to_keep + best_fn would keep the best N and could
  # delete the newest, so resume would go backwards.
  policy, best = ocp.checkpoint_managers.LatestN(n=keep), {}
  if track_best:  # Without it there is nothing to rank by, and a best_fn warns every save.
    metric = lambda m: m[BEST_METRIC]
    # Mid-epoch checkpoints (SIGTERM) carry no metrics: once they fall out of the latest N
    # they go, instead of being kept forever.
    best_one = ocp.checkpoint_managers.BestN(get_metric_fn=metric, n=1,
                                             keep_checkpoints_without_metrics=False)
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([policy, best_one])
    best = dict(best_fn=metric, best_mode="max")
  # A save killed before its final rename leaves only a *.orbax-checkpoint-tmp folder,
  # which is never read back; cleanup removes it on the next start.
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, enable_async_checkpointing=False,
      cleanup_tmp_directories=True, **best)
  return ocp.CheckpointManager(pathlib.Path(workdir).absolute() / "checkpoints",
                               options=options)


def save_checkpoint(manager, state: TrainState, meta: dict, metrics: dict | None = None):
  """Writes and commits checkpoint `state.step`, or raises CheckpointWriteError. Orbax
  writes into a temporary folder and renames it last, so a failed or killed save never
  leaves a checkpoint that looks complete."""
  step = int(state.step)
  # Checked first: when Orbax itself hits a full disk, its writer threads fail one by one
  # and print hundreds of lines around our one.
  needed = 2 * sum(x.nbytes for x in jax.tree.leaves(state)) + CHECKPOINT_SLACK_BYTES
  free = shutil.disk_usage(manager.directory).free
  if free < needed:
    raise CheckpointWriteError(
        f"not enough space to write checkpoint {step} to {manager.directory} ({free:,} bytes "
        f"free, {needed:,} needed); nothing was written and the last complete checkpoint is "
        f"{manager.latest_step()}: free space and rerun the same command to resume from it")
  try:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), metrics=metrics)
    manager.wait_until_finished()
  except Exception as e:  # TensorStore reports a full disk as ValueError(RESOURCE_EXHAUSTED).
    with contextlib.suppress(Exception):
      manager.close()  # Joins Orbax's writer threads, which otherwise die noisily at exit.
    text = str(e)
    reason = ("no space left on device" if "No space left" in text or "os_error_code='28'" in text
              else (text.strip().splitlines() or [type(e).__name__])[0][:200])
    raise CheckpointWriteError(
        f"could not write checkpoint {step} to {manager.directory} ({reason}); nothing was "
        f"committed and the last complete checkpoint is {manager.latest_step()}: free space "
        "(or fix the folder) and rerun the same command to resume from it") from e


def restore_checkpoint(manager, step: int, abstract_state: TrainState):
  """(state, meta) of checkpoint `step`; meta holds the epoch record and data stats."""
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  except Exception as e:  # Orbax/TensorStore raise many types; all mean the same here.
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise ConfigError(
        f"checkpoint {step} in {manager.directory} does not restore into this config's "
        f"network ({type(e).__name__}: {reason}): it is truncated, foreign, or from another "
        "config; use the config it was trained with, or another --workdir") from e
  return restored["state"], restored["meta"]


def read_metrics(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_atomically(path: pathlib.Path, text: str):
  """A kill mid-write leaves the old file, never half of the new one."""
  tmp = path.with_suffix(".tmp")
  try:
    tmp.write_text(text)
  except OSError:
    tmp.unlink(missing_ok=True)
    raise
  os.replace(tmp, path)


def write_metrics(workdir, records: list[dict]):
  write_atomically(pathlib.Path(workdir) / METRICS_FILE,
                   "".join(json.dumps(r) + "\n" for r in records))


# Keys of the resumable sections that say where or how fast, not what is trained: a
# resume may change them (the data moved, another machine, another implementation of
# the same maths).
RESUMABLE_CHANGES = ("data.workers", "data.data_dir", "data.source_path", "data.url",
                     "data.md5", "model.conv_impl")


# Config keys that came after runs were trained without them, each with the value that
# trains as those runs did: a workdir's config.json from before reads as holding it.
ADDED_KEYS = {"eval_translate_weight": 0.5, "augment.alternate_flip": False,
              "bn_bias_lr_scale": 1.0, "bn_scale_frozen": False, "whiten_stem": False,
              "lookahead_every": 0, "muon_learning_rate": 0.08, "muon_momentum": 0.6,
              "model.stem_depth": 0, "model.activation": "relu",
              "model.residual_activation": "branch", "model.eca_kernel": 0,
              "model.zero_init_residual": False, "bn_recalibrate": False,
              "model.pointwise_bf16": False, "model.dense_bf16": False, "mixup_alpha": 0.0}


def with_added_keys(saved: dict) -> dict:
  """A config.json's tree, with every `ADDED_KEYS` entry it lacks."""
  saved = json.loads(json.dumps(saved))  # A deep copy.
  for dotted, value in ADDED_KEYS.items():
    *sections, key = dotted.split(".")
    tree = saved
    for section in sections:
      tree = tree.setdefault(section, {})
    tree.setdefault(key, value)
  return saved


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def check_workdir_config(workdir, config):
  """A workdir belongs to one network, data and augmentation: resuming it with another
  is an error. Everything else (epochs, evaluation batch size, where the data lives, ...)
  may change on resume. Writes nothing: see `write_workdir_config`."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return
  sections = ("model", "data", "augment")
  saved = with_added_keys(json.loads(path.read_text()))
  previous = _flatten({k: v for k, v in saved.items() if k in sections})
  current = _flatten({k: v for k, v in json.loads(config.to_json()).items() if k in sections})
  changed = sorted(k for k in previous.keys() | current.keys()
                   if k not in RESUMABLE_CHANGES and previous.get(k) != current.get(k))
  if changed:
    raise ConfigError(
        f"{workdir} holds a run with different {', '.join(changed)} "
        f"(was {', '.join(repr(previous.get(k)) for k in changed)}); use a new --workdir "
        "(or delete that one) to train this config")


def write_workdir_config(workdir, config):
  if jax.process_index() == 0:  # One writer when several hosts share the workdir.
    write_atomically(pathlib.Path(workdir) / CONFIG_FILE,
                     json.dumps(json.loads(config.to_json()), indent=2))


# ------------------------------------------------------------------ the loop

def validate_config(config):
  """Values no run can train with, refused before any work starts."""
  problems = [f"{name} must be > 0, got {value}" for name, value in (
      ("learning_rate", config.learning_rate), ("num_epochs", config.num_epochs),
      ("batch_size", config.batch_size), ("eval_batch_size", config.eval_batch_size))
      if not value > 0]
  problems += [f"augment.{name} must be in [0, 1], got {config.augment[name]}"
               for name in ("hflip_p", "affine_p", "cutout_p")
               if not 0 <= config.augment[name] <= 1]
  if config.augment.backend not in ("albumentations", "jax"):
    problems.append(f"augment.backend must be 'albumentations' or 'jax', got {config.augment.backend!r}")
  if config.progressive_epochs and not 8 <= config.progressive_size <= config.augment.image_size:
    problems.append(f"progressive_size must be in [8, augment.image_size="
                    f"{config.augment.image_size}] when progressive_epochs > 0, "
                    f"got {config.progressive_size}")
  if not 0 <= config.progressive_epochs <= config.num_epochs:
    problems.append(f"progressive_epochs must be in [0, num_epochs], got {config.progressive_epochs}")
  if config.data.validation_size < 0:
    problems.append(f"data.validation_size must be >= 0, got {config.data.validation_size}")
  if not 0 <= config.eval_translate < config.augment.image_size // 2:
    problems.append(f"eval_translate must be in [0, {config.augment.image_size // 2}), "
                    f"got {config.eval_translate}")
  if config.whiten_stem and (config.model.name != "s9net" or config.model.stem_width % 2):
    problems.append("whiten_stem needs model.name 's9net' and an even model.stem_width "
                    "(half the filters are the other half negated)")
  problems += [problem for key in models.BF16_KEYS if key in config.model
               if (problem := models.bf16_value_problem(key, config.model[key]))]
  if config.lookahead_every < 0:
    problems.append(f"lookahead_every must be >= 0, got {config.lookahead_every}")
  if config.optimizer == "muon" and not config.muon_learning_rate > 0:
    problems.append(f"muon_learning_rate must be > 0, got {config.muon_learning_rate}")
  if not config.bn_bias_lr_scale > 0:
    problems.append(f"bn_bias_lr_scale must be > 0, got {config.bn_bias_lr_scale}")
  if config.weight_decay < 0:
    problems.append(f"weight_decay must be >= 0, got {config.weight_decay}")
  if not 0 <= config.label_smoothing < 1:
    problems.append(f"label_smoothing must be in [0, 1), got {config.label_smoothing}")
  if config.mixup_alpha < 0:
    problems.append(f"mixup_alpha must be >= 0, got {config.mixup_alpha}")
  devices = config.num_devices or jax.device_count()
  if not 0 <= config.num_devices <= jax.device_count():
    problems.append(f"num_devices must be in [0, {jax.device_count()}], got {config.num_devices}")
  for name in ("batch_size", "eval_batch_size"):
    if config[name] > 0 and config[name] % devices:
      problems.append(f"{name} {config[name]} is not divisible by the {devices} devices")
  if problems:
    raise ConfigError("invalid config: " + "; ".join(problems))


def constraint_report(config) -> receptive_field.Report:
  """One line of S9 verdict (the full table: `python -m s9jax.summary`)."""
  report = receptive_field.analyse_config(config)
  verdict = "PASS" if report.passed else "FAIL: " + "; ".join(report.failures())
  print(f"S9 rules {verdict} ({report.total_params:,} params, receptive field {report.rf})",
        flush=True)
  if not report.passed and not config.allow_constraint_violation:
    raise ConfigError("the network breaks S9 constraints (" + "; ".join(report.failures())
                      + "); set --config.allow_constraint_violation=True to train it anyway")
  return report


@contextlib.contextmanager
def stop_requests():
  """SIGTERM and Ctrl-C only raise a flag, read by the loop between steps, so the
  process stops at a step boundary with its state saved, never inside a write."""
  requested = []

  def request(signum, _):
    requested.append(signum)
    if len(requested) > 1:  # Asked twice: stop now, unsaved.
      raise KeyboardInterrupt

  handled = (signal.SIGTERM, signal.SIGINT)
  try:
    previous = {s: signal.signal(s, request) for s in handled}
  except ValueError:  # Not the main thread: signals stay as they are.
    previous = {}
  try:
    yield requested
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Trains config in workdir (resuming if it holds checkpoints); returns the metrics.
  Raises Interrupted after saving, if SIGTERM or Ctrl-C arrives mid-epoch."""
  with stop_requests() as stop:
    return _train_and_evaluate(config, pathlib.Path(workdir), stop)


def run_header(config, impl: str) -> str:
  """The first line of every run: where it computes, and with what."""
  devices = jax.devices()
  used = config.num_devices or len(devices)
  return (f"s9jax: jax {jax.__version__}, backend {jax.default_backend()}, {used} of "
          f"{len(devices)} {devices[0].device_kind} device(s) over {jax.process_count()} "
          f"process(es); conv_impl {config.model.conv_impl!r} -> {impl!r}: "
          f"{ops.describe(impl)}{_bf16_choices(config.model, impl)}")


def _bf16_choices(model_config, impl: str) -> str:
  """The bfloat16 convs a run asked for, and what 'auto' resolved to on this machine."""
  said = []
  for key in models.BF16_KEYS:
    value = model_config.get(key, False)
    if value == "auto":
      said.append(f"{key} 'auto' -> {models.resolve_bf16(key, value, impl)}")
    elif value:
      said.append(f"{key} True")
  return "; " + ", ".join(said) if said else ""


_DATA_BARRIERS = itertools.count()  # Barrier names are single-use: one per run, per process.


def _train_and_evaluate(config, workdir: pathlib.Path, stop: list) -> list[dict]:
  validate_config(config)
  impl = ops.resolve(config.model.conv_impl)  # Once per run; create_model gets the result.
  print(run_header(config, impl), flush=True)
  check_workdir_config(workdir, config)
  report = constraint_report(config)
  # With several hosts only the first writes files; Orbax coordinates the checkpoints.
  chief = jax.process_index() == 0
  make_plots = config.plots and chief

  if jax.process_count() > 1:
    # Processes on one machine share its data_dir: two preparing it at once collide
    # (TFDS's final rename fails in the second). The chief prepares it first, the others
    # wait at a barrier of the distributed service: a device collective would give up
    # after gloo's 30 s, and a download takes longer.
    try:
      if chief:
        input_pipeline.prepare(config.data)
    finally:  # Reached on failure too: the others then fail alike, instead of waiting.
      ocp.multihost.get_barrier_sync_fn()(
          key=f"s9jax data prepared {next(_DATA_BARRIERS)}", timeout_ms=3_600_000)
  images, labels = input_pipeline.load_split(config.data, "train")
  test_images, test_labels = input_pipeline.load_split(config.data, "test")
  held_out = config.data.validation_size
  if held_out and held_out + config.batch_size > len(images):
    raise ConfigError(f"data.validation_size {held_out} leaves fewer than one batch of "
                      f"{config.batch_size} of the {len(images):,} training images")
  # The test set is read once, at the end.
  (train_images, train_labels), (val_images, val_labels) = input_pipeline.split_validation(
      images, labels, held_out)
  mean, std = input_pipeline.channel_stats(train_images)  # Train, validation, test alike.
  normalize = functools.partial(input_pipeline.normalize_batch, mean=mean, std=std)
  val_inputs = normalize(val_images)
  test_inputs = normalize(test_images)
  on_device = config.augment.backend == "jax"
  batches = input_pipeline.TrainBatches(
      train_images, train_labels,
      None if on_device else lambda: input_pipeline.train_transform(config.augment, mean, std),
      config.batch_size, config.seed, workers=config.data.workers,
      process_index=jax.process_index(), process_count=jax.process_count(),
      alternate_flip=config.augment.alternate_flip)
  mesh = make_mesh(config.num_devices)
  steps_per_epoch = batches.steps_per_epoch
  workdir.mkdir(parents=True, exist_ok=True)
  write_workdir_config(workdir, config)  # Only now: a run that could not start locks nothing.

  learning_rate_fn = create_learning_rate_fn(config, steps_per_epoch)
  # Jitted: one small program, where op by op the schedule's arithmetic compiled ~7.
  logged_learning_rate = jax.jit(learning_rate_fn)
  init_rng, dropout_rng, augment_rng = run_keys(config.seed)
  if on_device:  # Placed once; from here on the host sends each step's indices alone.
    train_set = place_on_devices({"image": train_images, "label": train_labels}, mesh)
    augment = functools.partial(input_pipeline.device_augment, aug_config=config.augment,
                                mean=mean, std=std)

  loss_options = LossOptions.from_config(config)

  def one_step(state, batch, epoch):
    size = epoch_image_size(config, epoch)
    batch = shard_batch(batch, mesh)
    if on_device:
      return train_step_on_device(state, train_set, batch["index"], dropout_rng, augment_rng,
                                  augment, size, loss_options, batch.get("flip"))
    return train_step_on_host_batch(state, batch, dropout_rng, normalize, size, loss_options)

  manager = checkpoint_manager(workdir, config.checkpoint_keep, track_best=held_out > 0)
  state = create_train_state(config, init_rng, learning_rate_fn, impl,
                             total_steps=config.num_epochs * steps_per_epoch)
  if config.whiten_stem and manager.latest_step() is None:  # A resume restores it.
    state = with_whitened_stem(state, train_images, mean, std)
  # Placed on the mesh before any restore, so a checkpoint from any device count
  # restores onto this one.
  state = jax.device_put(state, replicated(mesh))
  board = metric_writers.open(workdir) if chief else None
  records = read_metrics(workdir)
  start_epoch, start_step, carried_metrics, carried_seconds, elapsed = 0, 0, [], 0.0, 0.0
  if manager.latest_step() is not None:
    state, meta = restore_checkpoint(manager, manager.latest_step(), state)
    start_epoch = meta["epoch"]
    records = [r for r in records if r["epoch"] <= start_epoch]
    if "record" in meta and (not records or records[-1]["epoch"] < start_epoch):
      records.append(meta["record"])  # Killed after the checkpoint, before metrics.jsonl.
    # A checkpoint saved on SIGTERM/Ctrl-C sits inside the next epoch.
    start_step = meta.get("step_in_epoch", 0)
    carried_metrics = meta.get("step_metrics", [])
    carried_seconds = meta.get("epoch_seconds_so_far", 0.0)
    elapsed = records[-1]["elapsed_seconds"] if records else 0.0
    where = f", step {start_step} of epoch {start_epoch + 1}" if start_step else ""
    print(f"Resumed from {workdir} at epoch {start_epoch}{where} (step {int(state.step)}).",
          flush=True)
  elif chief:
    preview = batches.preview(32)
    if on_device:
      preview["image"] = np.asarray(jax.jit(augment)(augment_rng, preview["image"],
                                                     flip=preview.get("flip")))
    else:
      preview["image"] = normalize(preview["image"])
    if board:
      board.add_images("augmentations", plots.to_display(preview["image"], mean, std), 0,
                       dataformats="NHWC")
    if make_plots:
      plots.image_grid(workdir / "augmentations.png", preview["image"],
                       [input_pipeline.CLASS_NAMES[l] for l in preview["label"]], mean, std,
                       suptitle="training augmentations (epoch 0)")

  print(f"Training {config.model.name}: {report.total_params:,} params, "
        f"{len(train_images):,} train / {len(val_labels):,} validation / "
        f"{len(test_images):,} test images, {steps_per_epoch} steps of {config.batch_size} "
        f"per epoch, epochs {start_epoch + 1}..{config.num_epochs}", flush=True)
  meta_common = {"mean": mean.tolist(), "std": std.tolist(), "config": config.to_dict()}
  predictions, curves_drawn = None, -float("inf")
  for epoch in range(start_epoch + 1, config.num_epochs + 1):
    started = time.time() - carried_seconds
    step_metrics, carried_metrics, carried_seconds = carried_metrics, [], 0.0
    # Progress on stderr, in images: a log of stdout holds only the epoch lines.
    bar = tqdm(batches.epoch(epoch, start_step), initial=start_step, total=steps_per_epoch,
               desc=f"epoch {epoch}/{config.num_epochs}", leave=False, dynamic_ncols=True,
               mininterval=2.0, file=sys.stderr, unit="img", unit_scale=config.batch_size,
               disable=not chief)
    for i, batch in enumerate(bar, start=start_step):
      state, metrics = one_step(state, batch, epoch)
      step_metrics.append(metrics)
      if i % 20 == 0:
        shown = jax.device_get(metrics)
        bar.set_postfix(loss=f"{shown['loss']:.3f}", acc=f"{shown['accuracy']:.3f}")
      if stop and i + 1 < steps_per_epoch:
        bar.close()
        save_checkpoint(manager, state, {
            "epoch": epoch - 1, "step_in_epoch": i + 1,
            "step_metrics": [{k: float(v) for k, v in m.items()}
                             for m in jax.device_get(step_metrics)],
            "epoch_seconds_so_far": time.time() - started, **meta_common})
        raise Interrupted(f"stopped by signal at epoch {epoch}, step {i + 1}/{steps_per_epoch}: "
                          f"saved checkpoint {int(state.step)}; rerun the same command to resume")
    trained_steps = steps_per_epoch - start_step
    start_step = 0
    bar.close()
    step_metrics = jax.device_get(step_metrics)
    train_seconds = time.time() - started
    losses = np.array([m["loss"] for m in step_metrics])
    if not np.all(np.isfinite(losses)):
      bad = int(np.flatnonzero(~np.isfinite(losses))[0])
      raise TrainingDiverged(
          f"loss became {losses[bad]} at step {int(state.step) - len(losses) + bad + 1} "
          f"(epoch {epoch}); stopped without saving it, the last good checkpoint is step "
          f"{manager.latest_step()}: lower --config.learning_rate and rerun")
    # float32 throughout, so a mean over steps carried through a resume is bit-identical.
    train_metrics = {k: float(np.mean(np.asarray([m[k] for m in step_metrics], np.float32)))
                     for k in ("loss", "accuracy")}
    if epoch == config.num_epochs and config.bn_recalibrate:
      # Before the last validation and the test: both, and the final checkpoint, see them.
      state = recalibrate_batch_stats(state, train_images, config.batch_size, normalize, mesh)
    # Validation every epoch, without test-time augmentation (cheap); it alone picks the
    # best checkpoint. The test set is read once, after the last epoch, as the config asks.
    val_metrics = {}
    if held_out:
      val_metrics, _ = evaluate(state, val_inputs, val_labels, config.eval_batch_size,
                                flip=False, mesh=mesh, split="val")
    test_metrics = {}
    if epoch == config.num_epochs:
      test_metrics, predictions = evaluate_test_set(config, state, test_inputs, test_labels,
                                                    mesh)
    seconds = time.time() - started
    elapsed += seconds
    record = {"epoch": epoch, "step": int(state.step),
              "train_loss": train_metrics["loss"], "train_accuracy": train_metrics["accuracy"],
              **val_metrics, **test_metrics,
              "learning_rate": float(logged_learning_rate(int(state.step) - 1)),
              "images_per_second": round(trained_steps * config.batch_size / train_seconds, 1),
              "epoch_seconds": round(seconds, 2), "elapsed_seconds": round(elapsed, 2)}
    save_checkpoint(manager, state, {"epoch": epoch, "record": record, **meta_common},
                    metrics={BEST_METRIC: record[BEST_METRIC]} if val_metrics else None)
    records.append(record)
    if chief:
      write_metrics(workdir, records)
      metric_writers.write_record(board, record)
    if make_plots and (epoch == config.num_epochs or stop
                       or time.time() - curves_drawn >= CURVES_EVERY_SECONDS):
      plots.learning_curves(workdir / "learning_curves.png", records, config.plot_goal)
      curves_drawn = time.time()
    shown = "".join(f"  {name} loss {record[f'{key}_loss']:.4f} acc "
                    f"{100 * record[f'{key}_accuracy']:.2f}%"
                    for key, name in (("val", "val"), ("test", "test"))
                    if f"{key}_accuracy" in record)
    print(f"epoch {epoch:3d}  train loss {record['train_loss']:.4f} acc "
          f"{100 * record['train_accuracy']:.2f}%{shown}  lr {record['learning_rate']:.4f}  "
          f"{seconds:.1f}s (total {elapsed / 60:.1f} min)", flush=True)
    if stop and epoch < config.num_epochs:
      raise Interrupted(f"stopped by signal after epoch {epoch}: saved checkpoint "
                        f"{int(state.step)}; rerun the same command to resume")

  if board:
    board.close()
  if config.plots and records and predictions is None:  # Nothing trained in this process.
    # Every process: the evaluation is a computation over the global mesh, which would
    # wait forever for hosts that skipped it.
    _, predictions = evaluate_test_set(config, state, test_inputs, test_labels, mesh)
  if make_plots and records:
    wrong = np.flatnonzero(predictions != test_labels)[:32]
    names = input_pipeline.CLASS_NAMES
    plots.image_grid(workdir / "misclassified.png", test_inputs[wrong],
                     [f"{names[predictions[i]]}\n(true {names[test_labels[i]]})" for i in wrong],
                     mean, std, suptitle="misclassified test images: predicted (true)")
  batches.close()
  manager.close()
  return records


# ------------------------------------------------------------------ CLI

FLAGS = flags.FLAGS


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parser for the CLIs, with one-line errors for a bad --config.
  ml_collections reports a misspelt --config.key as an AttributeError traceback and a
  config file that fails to load only when first read; both are caught here. Also
  silences JAX's probe of absent backends ("Unable to initialize backend 'tpu'"): noise
  on every machine without that backend, and the run's first line says what it uses."""
  pylogging.getLogger("jax._src.xla_bridge").setLevel(pylogging.WARNING)
  try:
    rest = FLAGS(argv)
    if "config" in FLAGS:
      FLAGS.config.keys()  # A file that failed to load raises on first use.
    return rest
  except Exception as e:
    detail = e.args[0] if e.args else e
    if isinstance(detail, KeyError):  # AttributeError(KeyError("'key'\nDid you mean ...")).
      detail = detail.args[0]
    lines = [line.strip() for line in str(detail).splitlines() if line.strip()]
    if isinstance(e, AttributeError):
      text = "unknown config key " + " ".join(lines)
    else:  # Keep the reason: the last line of a quoted traceback, else the whole text.
      text = lines[-1] if any(l.startswith("Traceback") for l in lines) else " ".join(lines)
    print(f"error: {text}", file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO.
  host_memory.reuse_freed_memory()  # Before JAX starts its CPU client.
  compilation_cache.enable(FLAGS.compilation_cache_dir)  # Before the first compilation.
  given = {name: FLAGS[name].value for name in ("coordinator_address", "num_processes",
                                                "process_id") if FLAGS[name].value is not None}
  if given and not FLAGS.distributed:
    raise app.UsageError(f"--{' --'.join(given)} need --distributed")
  if FLAGS.distributed:  # Before any other JAX call: joins this process to the job.
    host = given.get("coordinator_address", "").rpartition(":")[0].strip("[]")
    if host in ("127.0.0.1", "localhost", "::1"):
      # Processes on one machine: the coordinator listens there, not on every interface.
      given["coordinator_bind_address"] = given["coordinator_address"]
    platform = (jax.config.jax_platforms or "cpu").split(",")[0]  # Read, not started.
    if given.get("num_processes", 1) > 1 and platform == "cpu":
      # Cross-process collectives on CPU (gloo, over TCP; JAX 0.10's default, made explicit).
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**given)  # No arguments: detected (Cloud TPU, Slurm, ...).
  try:
    records = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ConfigError, TrainingDiverged, CheckpointWriteError, input_pipeline.DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except OSError as e:  # A full disk or a read-only workdir while writing metrics or plots.
    where = f" ({e.filename})" if e.filename else ""
    print(f"error: {e.strerror or e}{where}: free space or fix the folder and rerun the same "
          "command; it resumes from the last checkpoint", file=sys.stderr)
    sys.exit(2)
  except Interrupted as e:
    print(str(e), file=sys.stderr)
    sys.exit(130)
  if records and "test_accuracy" in records[-1]:  # The last epoch always is.
    validated = [r for r in records if "val_accuracy" in r]
    best = max(validated, key=lambda r: r["val_accuracy"]) if validated else None
    print(f"Done: final test accuracy {100 * records[-1]['test_accuracy']:.2f}%"
          + (f" (best validation {100 * best['val_accuracy']:.2f}% at epoch {best['epoch']})"
             if best else "")
          + f", {records[-1]['elapsed_seconds'] / 60:.1f} min of training. "
          f"Workdir: {FLAGS.workdir}")


def define_flags():
  """Defined only when run as a program, so modules can import each other."""
  config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, plots.")
  flags.DEFINE_bool("distributed", False, "Multi-host: call jax.distributed.initialize() "
                    "first (run the same command on every host).")
  # Where the cluster is not detected (e.g. several processes on one machine):
  flags.DEFINE_string("coordinator_address", None, "With --distributed: process 0's "
                      "host:port, the same for every process (127.0.0.1:PORT on one machine).")
  flags.DEFINE_integer("num_processes", None, "With --distributed: how many processes.")
  flags.DEFINE_integer("process_id", None, "With --distributed: this one's, 0..num_processes-1.")
  compilation_cache.define_flag()


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=parse_flags)
