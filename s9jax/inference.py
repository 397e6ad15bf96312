"""A trained run from its workdir alone: the config it was trained with (`config.json`),
a checkpoint, and the data statistics stored in that checkpoint.

    model = s9jax.load("runs/base")        # the final checkpoint
    probabilities = model(images)          # uint8 (N, 32, 32, 3) RGB -> float32 (N, 10)

eval, predict and export all start here, so they read a workdir the same way and need
no --config. Which checkpoint: 'final' (the default: the latest, the last epoch's),
'best' (the best by validation accuracy, for a run that held a validation split out of
train) or a step number. The test set never chooses one: it is read once, at the end.
"""

from __future__ import annotations

import contextlib
import json
import logging as pylogging
import math
import pathlib
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import flags

from s9jax import input_pipeline, ops, train

CHECKPOINTS = "'final', 'best' or a step number"
BEST_METRIC = train.BEST_METRIC  # What 'best' ranks by; the test set never picks one.


class UsageError(Exception):
  """A command line that cannot run: bad flags or arguments."""


# ------------------------------------------------------------------ config and checkpoint

def _tuples(tree):
  """JSON has no tuples: the config's sequences (model widths, ...) come back as lists.
  Tuples again, as the config files write them, so `--config`-style overrides and the
  models see the types they were trained with."""
  if isinstance(tree, dict):
    return {key: _tuples(value) for key, value in tree.items()}
  if isinstance(tree, list):
    return tuple(_tuples(value) for value in tree)
  return tree


def load_config(workdir) -> ml_collections.ConfigDict:
  """The config a workdir was trained with, from the `config.json` training wrote into
  it, locked (a misspelt key is an error, not a new key)."""
  workdir = pathlib.Path(workdir)
  path = workdir / train.CONFIG_FILE
  if not workdir.is_dir():
    raise train.ConfigError(f"no workdir {workdir}: give the --workdir a run trained into")
  if not path.is_file():
    raise train.ConfigError(f"{workdir} has no {train.CONFIG_FILE}, so it is not a training "
                            "workdir: train into it first (python -m s9jax.train)")
  try:
    tree = train.with_added_keys(json.loads(path.read_text()))  # Older runs' too.
  except (OSError, ValueError) as e:
    raise train.ConfigError(f"cannot read {path}: {e}") from e
  config = ml_collections.ConfigDict(_tuples(tree))
  config.lock()
  return config


@contextlib.contextmanager
def _quiet_absl_warnings():
  """Orbax warns at every read-only manager that it is read-only: that is the point."""
  logger = pylogging.getLogger("absl")
  level = logger.level
  logger.setLevel(pylogging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def open_checkpoints(workdir) -> ocp.CheckpointManager:
  """A read-only manager of the workdir's checkpoints. Read-only, so reading a run that
  is still training never deletes its half-written checkpoint or anything else (the
  training manager cleans temporary folders up when it opens)."""
  directory = pathlib.Path(workdir).absolute() / "checkpoints"
  if not directory.is_dir():
    raise train.ConfigError(f"no checkpoints in {directory}: train first")
  with _quiet_absl_warnings():
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        read_only=True, create=False, save_interval_steps=0))


def read_meta(manager, step: int) -> dict:
  """Checkpoint `step`'s meta alone (epoch, record, data statistics, config)."""
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def best_step(manager) -> int:
  """The kept checkpoint with the best validation accuracy in its epoch record (the
  later one on a tie). Read from the checkpoints themselves, so it is the same whatever
  the training manager's own ranking was when the run was written."""
  scored = [(meta["record"][BEST_METRIC], step) for step in manager.all_steps()
            if BEST_METRIC in (meta := read_meta(manager, step)).get("record", {})]
  if not scored:
    raise train.ConfigError(
        f"no checkpoint in {manager.directory} records a validation accuracy (the run held "
        "no validation split: data.validation_size = 0), so none is 'best': use "
        "--checkpoint final")
  return max(scored)[1]


def pick_step(manager, which: str = "final") -> int:
  """The step of checkpoint `which`: 'final' (the latest; 'latest' says the same), 'best'
  (by validation accuracy) or a step number that is kept."""
  steps = manager.all_steps()
  if not steps:
    raise train.ConfigError(f"no checkpoints in {manager.directory}: train first")
  which = str(which)
  if which in ("final", "latest"):
    return max(steps)
  if which == "best":
    return best_step(manager)
  if which.isdigit() and int(which) in steps:
    return int(which)
  raise train.ConfigError(f"checkpoint must be 'final', 'best' or a kept step "
                          f"({', '.join(map(str, sorted(steps)))}), got {which!r}")


def conv_impl_here(config) -> str:
  """The run's conv_impl if it runs on this machine, else 'auto' resolved: every
  implementation computes the same maths from the same parameters, so a run trained with
  the C++ kernels ('native') still evaluates where they do not build (a GPU, macOS)."""
  try:
    return ops.resolve(config.model.conv_impl)
  except ValueError:
    return ops.resolve("auto")


def restore(workdir, checkpoint: str = "final", *, config=None, mesh=None):
  """(config, state, mean, std, meta) of a workdir's checkpoint: the config from its
  `config.json` unless one is given (eval's --config, e.g. to read the data elsewhere),
  the state placed replicated on `mesh` (default: one device), its `apply_fn` the
  network with `conv_impl_here`, and the per-channel statistics the run normalised with
  (fractions of 255)."""
  workdir = pathlib.Path(workdir)
  trained = load_config(workdir)  # Also refuses a folder that is not a workdir.
  config = trained if config is None else config
  manager = open_checkpoints(workdir)
  try:
    step = pick_step(manager, checkpoint)
    mesh = train.make_mesh(1) if mesh is None else mesh
    # Shapes only: the checkpoint supplies every value, so nothing is initialised.
    shapes = jax.eval_shape(lambda: train.create_train_state(
        config, jax.random.PRNGKey(0), train.create_learning_rate_fn(config, 1),
        conv_impl_here(config)))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=train.replicated(mesh)), shapes)
    state, meta = train.restore_checkpoint(manager, step, target)
  finally:
    manager.close()
  mean, std = np.asarray(meta["mean"], np.float64), np.asarray(meta["std"], np.float64)
  return config, state, mean, std, meta


# ------------------------------------------------------------------ the network as a function

def tta_options(config) -> dict:
  """The test-time augmentations the run's test accuracy was measured with."""
  return {"flip": bool(config.eval_flip), "translate": int(config.eval_translate),
          "translate_weight": float(config.eval_translate_weight)}


def logits_function(apply_fn: Callable, mean, std, flip: bool = False, translate: int = 0,
                    translate_weight: float = 0.5) -> Callable:
  """f(variables, images) -> float32 logits, pure and jittable: uint8 NHWC RGB images
  normalised as training does (`input_pipeline.normalize_batch`, the run's statistics),
  the network (`apply_fn`, a Flax module's apply) in eval mode, and the logits averaged
  over the test-time augmentations by `train.tta_logits`, as the evaluation does."""
  def f(variables, images):
    x = input_pipeline.normalize_batch(images, mean, std)
    return train.tta_logits(apply_fn, variables, x, flip, translate,
                            translate_weight).astype(jnp.float32)

  return f


class Model:
  """A trained network as a function: uint8 (N, H, W, 3) RGB images at the run's size
  (32x32) -> float32 (N, classes) probabilities. Any N: more images than the run's eval
  batch size go through in chunks of it (the last padded), so memory stays bounded and
  any large N compiles the one chunk shape.

  Attributes: `class_names`, `config`, `step`, `epoch`, `mean`, `std`, `meta`."""

  def __init__(self, config, state, mean, std, meta, tta: bool = True):
    self.config, self.mean, self.std, self.meta = config, mean, std, meta
    self.step = int(state.step)
    self.epoch = meta.get("epoch")
    self.class_names = input_pipeline.CLASS_NAMES
    self.image_size = config.augment.image_size
    self.batch_size = int(config.eval_batch_size)
    self.variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits = logits_function(state.apply_fn, mean, std, **(tta_options(config) if tta else {}))

    def forward(variables, images):
      z = logits(variables, images)
      return z, jax.nn.softmax(z, axis=-1)

    self._forward = jax.jit(forward)  # Once: each new batch shape compiles, nothing else.

  def _check(self, images) -> np.ndarray:
    images = np.asarray(images)
    size = self.image_size
    if images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 RGB (0..255), got {images.dtype}")
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
      raise ValueError(f"images must be (N, {size}, {size}, 3), got {images.shape}"
                       + (": add the batch axis, images[None]" if images.ndim == 3 else ""))
    return images

  def _run(self, images) -> tuple[np.ndarray, np.ndarray]:
    images = self._check(images)
    n, size = len(images), self.batch_size
    if n <= size:
      if not n:
        empty = np.zeros((0, len(self.class_names)), np.float32)
        return empty, empty
      return tuple(np.asarray(a) for a in self._forward(self.variables, images))
    chunks = math.ceil(n / size)
    padded = np.zeros((chunks * size,) + images.shape[1:], np.uint8)
    padded[:n] = images
    outs = [self._forward(self.variables, padded[i * size:(i + 1) * size])
            for i in range(chunks)]
    return tuple(np.concatenate([np.asarray(o[k]) for o in outs])[:n] for k in (0, 1))

  def __call__(self, images) -> np.ndarray:
    """Class probabilities (softmax of the logits), float32 (N, classes)."""
    return self._run(images)[1]

  def logits(self, images) -> np.ndarray:
    """The logits behind the probabilities, float32 (N, classes)."""
    return self._run(images)[0]


def load(workdir, checkpoint: str = "final", tta: bool = True) -> Model:
  """A trained run as a function from uint8 NHWC images to class probabilities (see
  `Model`), from its workdir alone. `checkpoint`: 'final', 'best' or a step number.
  `tta`: average over the test-time augmentations the run's test accuracy was measured
  with (its config's eval_flip, eval_translate), else one forward pass per image."""
  config, state, mean, std, meta = restore(workdir, checkpoint)
  return Model(config, state, mean, std, meta, tta=tta)


# ------------------------------------------------------------------ the workdir CLIs

HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "--helpfull")


def parse_cli(argv: list[str], define: Callable[[flags.FlagValues], None],
              doc: str) -> tuple[flags.FlagValues, list[str]] | None:
  """A workdir CLI's flags on a FlagValues of its own, so its `main(argv)` runs any
  number of times in one process (tests call it in-process) and beside other CLIs'
  global flags. Returns (flag values, positional arguments), or None after printing
  the help. Raises UsageError with a one-line reason."""
  pylogging.getLogger("jax._src.xla_bridge").setLevel(pylogging.WARNING)  # See train.parse_flags.
  values = flags.FlagValues()
  define(values)
  if any(arg in HELP_FLAGS for arg in argv[1:]):
    print(doc.strip() + "\n\nflags:\n" + values.get_help(include_special_flags=False))
    return None
  try:
    rest = values(list(argv))
  except flags.Error as e:
    raise UsageError(" ".join(line.strip() for line in str(e).splitlines() if line.strip()))
  return values, rest[1:]


def run_cli(body: Callable[[list[str]], int], argv: list[str], *errors: type) -> int:
  """Runs a CLI body; the errors a user can fix (these and `errors`) become one `error:`
  line on stderr and exit status 2."""
  try:
    return body(argv)
  except (UsageError, train.ConfigError, input_pipeline.DataError, *errors) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
