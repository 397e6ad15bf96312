"""Shared fixtures: a tiny CIFAR-10-shaped image-folder archive, and configs loaded the
way the CLI loads them (locked, so a misspelt key is an error, not a new key)."""

import importlib
import io
import os
import pathlib
import shutil
import tarfile
import tempfile

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests check behaviour on tiny data, where XLA's compile time, not run time, is the
# cost: as Flax's example tests do, compile with most optimisations off (test_models.py:
# 58 -> 29 s on 2 cores). In the environment, so the CLI subprocesses inherit it.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Most tests compile the same tiny networks, many in fresh processes (the CLI, the
# crash and multi-host drills): one JAX compilation cache for the whole run, workers and
# subprocesses alike, compiles each program once. A new directory per run, made by the
# process pytest starts (xdist's workers inherit its environment), so a run never reads
# another's; removed at the end (pytest_sessionfinish). A size limit turns on JAX's file
# lock (the `filelock` package): no process reads an entry another is still writing.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _RUN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
      prefix="s9jax-tests-jax-cache-")
  os.environ.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
                    JAX_COMPILATION_CACHE_MAX_SIZE=str(4 << 30))
else:
  _RUN_CACHE = None  # The caller's own cache: used, not removed.

from s9jax import input_pipeline  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A real CIFAR-10 copy for the tests that read one (skipped without it): S9JAX_CIFAR10_JPEG,
# else the JPEG copy the development machines keep beside the checkout.
SHARED_ARCHIVE = pathlib.Path(os.environ.get(
    "S9JAX_CIFAR10_JPEG", ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"))


def class_colour(label: int) -> int:
  """Each tiny-archive image is one flat grey level that encodes its class."""
  return 12 + 24 * label


def label_of(image: np.ndarray) -> int:
  return int(round((float(image.mean()) - 12) / 24))


def png_bytes(value: int, size=(32, 32)) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.full(size + (3,), value, np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


def write_tiny_tree(root: pathlib.Path, per_class={"train": 3, "test": 2}):
  for split, count in per_class.items():
    for label, name in enumerate(input_pipeline.CLASS_NAMES):
      folder = root / split / name
      folder.mkdir(parents=True, exist_ok=True)
      for i in range(count):
        (folder / f"{i:04d}.png").write_bytes(png_bytes(class_colour(label)))


# The two subprocess drills, ~40-70 s of module fixtures each, run first. xdist's
# worksteal gives each worker half the list and lets an idle one take the far end of
# another's queue: at the front they never end the run late, and a steal never splits
# one module across two workers, which would run its fixture twice.
RUN_FIRST = ("test_multihost.py", "test_sharding.py")


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: item.path.name not in RUN_FIRST)  # Stable: order kept within.


def pytest_sessionfinish(session):
  # Only the process that made the run's cache removes it (xdist's workers inherit it).
  if _RUN_CACHE:
    shutil.rmtree(_RUN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory) -> pathlib.Path:
  """tar.gz laid out like the shared JPEG copy: tiny-cifar/{train,test}/<class>/NNNN.png."""
  base = tmp_path_factory.mktemp("archive")
  write_tiny_tree(base / "tiny-cifar")
  path = base / "tiny-cifar.tar.gz"
  with tarfile.open(path, "w:gz") as tf:
    tf.add(base / "tiny-cifar", arcname="tiny-cifar")
  return path


def load_config(name: str, variant: str = ""):
  module = importlib.import_module(f"configs.{name}")
  config = module.get_config(variant) if variant else module.get_config()
  config.lock()
  return config


def tiny_config(tiny_archive, data_dir, **overrides):
  """The base recipe, shrunk: a narrow s9net on the tiny archive, one epoch."""
  config = load_config("base", "smoke")
  config.data.source_path = str(tiny_archive)
  config.data.data_dir = str(data_dir)
  config.data.train_limit = 0
  config.data.test_limit = 0
  config.data.validation_size = 0  # Tests that need one set it (30 training images here).
  config.model.stem_width = 8
  config.model.widths = (8, 16, 16)
  config.model.depths = (1, 1, 1)
  config.batch_size = 10
  config.eval_batch_size = 8  # 20 test images: the last batch is padded and masked.
  config.warmup_epochs = 0.0
  for key, value in overrides.items():
    section = config
    *path, last = key.split(".")
    for part in path:
      section = section[part]
    section[last] = value
  return config
