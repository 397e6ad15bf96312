"""CIFAR-10 input: TFDS sources -> uint8 NHWC arrays -> Albumentations -> float32 batches.

Two sources, one code path after loading:
- 'tfds': the official `cifar10` builder (needs internet once, and TensorFlow to prepare).
- 'image_folder': `Cifar10ImageFolder`, a TFDS builder over a manually supplied archive or
  directory laid out `{train,test}/<class>/<image>` (tar, tar.gz, tar.xz, zip or a plain
  directory), such as the JPEG copy in ../shared/data. It is prepared once into the TFDS
  data dir as array_record (no TensorFlow needed) and read back with `as_data_source`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import gzip
import io
import lzma
import os
import pathlib
import stat
import tarfile
import threading
import zipfile
from typing import Callable, Iterator

import albumentations as A
import cv2
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from jax.scipy import ndimage

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck")
IMAGE_SHAPE = (32, 32, 3)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".zip")

# Albumentations and JAX share two cores: OpenCV's own thread pool would fight both.
cv2.setNumThreads(0)


class DataError(Exception):
  """Bad or missing data, with a message that says what to do."""


# ----------------------------------------------------------------------------- sources

def _decode_image(data: bytes, name: str) -> np.ndarray:
  from PIL import Image  # Pillow comes with matplotlib and TFDS.
  try:
    with Image.open(io.BytesIO(data)) as im:
      image = np.asarray(im.convert("RGB"))
  except Exception as e:  # Pillow raises several types for broken files.
    raise DataError(f"cannot decode image {name}: {e}") from e
  if image.shape != IMAGE_SHAPE:
    raise DataError(f"image {name} is {image.shape[1]}x{image.shape[0]}, expected 32x32")
  return image


def _split_class_of(parts: tuple[str, ...]):
  """('cifar10-jpeg', 'train', 'cat', '0001.jpg') -> ('train', 'cat'); None if not an image
  under {train,test}/<class>/."""
  if len(parts) < 3 or not parts[-1].lower().endswith(IMAGE_SUFFIXES):
    return None
  split, cls = parts[-3], parts[-2]
  if split not in ("train", "test"):
    return None
  return split, cls


def _refuse_escaping_member(source, name: str, is_link: bool):
  """Nothing is extracted, so such a member could never be written anywhere; it is still
  refused, because an archive holding one was not made by the tools we document."""
  if is_link or name.startswith("/") or ".." in name.split("/"):
    what = "a link" if is_link else "a path outside the archive's folder"
    raise DataError(f"{source}: member {name!r} is {what}; refusing the archive: "
                    "re-create it from plain files laid out {train,test}/<class>/<image>")


def iter_image_folder(source: str | os.PathLike, split: str) -> Iterator[tuple[str, bytes, str]]:
  """Yields (member name, encoded bytes, class name) for one split of an archive or
  directory, reading archives in place: nothing is extracted, so no member can be
  written outside anything."""
  source = pathlib.Path(source)
  if source.is_dir():
    for path in sorted(source.rglob("*")):
      found = path.is_file() and _split_class_of(path.relative_to(source).parts)
      if found and found[0] == split:
        yield str(path), path.read_bytes(), found[1]
  elif source.name.endswith(".zip"):
    with zipfile.ZipFile(source) as zf:
      for info in sorted(zf.infolist(), key=lambda i: i.filename):
        _refuse_escaping_member(source, info.filename,
                                stat.S_ISLNK(info.external_attr >> 16))
        found = not info.is_dir() and _split_class_of(tuple(info.filename.split("/")))
        if found and found[0] == split:
          yield info.filename, zf.read(info), found[1]
  elif source.name.endswith(ARCHIVE_SUFFIXES):
    with tarfile.open(source, "r:*") as tf:
      for member in tf:  # Streamed: one pass over a compressed archive.
        _refuse_escaping_member(source, member.name, member.issym() or member.islnk())
        found = member.isfile() and _split_class_of(tuple(member.name.split("/")))
        if found and found[0] == split:
          yield member.name, tf.extractfile(member).read(), found[1]
  else:
    raise DataError(f"{source} is neither a directory nor an archive ({', '.join(ARCHIVE_SUFFIXES)})")


class Cifar10ImageFolder(tfds.core.GeneratorBasedBuilder):
  """CIFAR-10 from a manually supplied image-folder archive or directory."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Place one archive (tar, tar.gz, tar.xz, zip) or directory laid out "
      "{train,test}/<class>/<image> with CIFAR-10's ten class names in the manual dir, "
      "or pass its path as --config.data.source_path.")

  def __init__(self, *, source_name: str | None = None, **kwargs):
    self._source_name = source_name
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description="CIFAR-10 read from a local image-folder archive.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    manual_dir = pathlib.Path(dl_manager.manual_dir)
    source = manual_dir / self._source_name if self._source_name else manual_dir
    return {split: self._generate_examples(source, split) for split in ("train", "test")}

  def _generate_examples(self, source, split):
    counts = collections.Counter()
    for name, data, cls in iter_image_folder(source, split):
      if cls not in CLASS_NAMES:
        raise DataError(f"{name}: class folder {cls!r} is not a CIFAR-10 class {CLASS_NAMES}")
      counts[cls] += 1
      yield name, {"image": _decode_image(data, name), "label": CLASS_NAMES.index(cls)}
    if not counts:
      raise DataError(f"{source} has no images under {split}/<class>/")
    missing = [c for c in CLASS_NAMES if not counts[c]]
    if missing:
      raise DataError(f"{source} has no {split} images of {', '.join(missing)}: "
                      f"every CIFAR-10 class needs a {split}/<class>/ folder")


def _prepare_image_folder(source_path: str, data_dir: str) -> Cifar10ImageFolder:
  source = pathlib.Path(source_path).expanduser().resolve()
  if not source.exists():
    raise DataError(f"data source {source} does not exist: pass --config.data.source_path "
                    "pointing at the CIFAR-10 image-folder archive or directory")
  manual_dir, source_name = (source, None) if source.is_dir() else (source.parent, source.name)
  builder = Cifar10ImageFolder(data_dir=data_dir, file_format="array_record",
                               source_name=source_name)
  # The prepared copy remembers its source, so pointing at another one cannot silently
  # reuse it.
  stamp = pathlib.Path(builder.data_dir) / "s9jax_source.txt"
  if builder.is_prepared():
    if not stamp.exists():  # Prepared before sources were recorded: adopt it.
      stamp.write_text(str(source))
    prepared_from = stamp.read_text()
    if prepared_from != str(source):
      raise DataError(f"{builder.data_dir} was prepared from {prepared_from}, not {source}: "
                      "pass another --config.data.data_dir (or delete that one)")
    return builder
  print(f"Preparing CIFAR-10 from {source} into {builder.data_dir} (once)...", flush=True)
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(manual_dir)))
  except (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, lzma.LZMAError, EOFError) as e:
    raise DataError(f"cannot read {source} ({type(e).__name__}: {e}): the archive is corrupt "
                    "or truncated; fetch or re-create it") from e
  stamp.write_text(str(source))
  return builder


def load_split(data_config, split: str) -> tuple[np.ndarray, np.ndarray]:
  """The whole split as (uint8 images NHWC, int32 labels), from the configured source."""
  data_dir = os.path.expanduser(data_config.data_dir)
  if data_config.source == "image_folder":
    builder = _prepare_image_folder(data_config.source_path, data_dir)
    source = builder.as_data_source(split=split)
  elif data_config.source == "tfds":
    try:
      source = tfds.data_source("cifar10", split=split, data_dir=data_dir,
                                builder_kwargs={"file_format": "array_record"})
    except Exception as e:  # Download, TensorFlow import, or preparation failed.
      raise DataError(
          f"could not load TFDS 'cifar10' ({type(e).__name__}: {e}). Without internet or "
          "TensorFlow, use the offline source: --config.data.source=image_folder "
          "--config.data.source_path=PATH/TO/cifar10-jpeg.tar.xz") from e
  else:
    raise DataError(f"data.source must be 'tfds' or 'image_folder', got {data_config.source!r}")
  records = source.__getitems__(list(range(len(source))))
  images = np.stack([r["image"] for r in records]).astype(np.uint8)
  labels = np.asarray([r["label"] for r in records], dtype=np.int32)
  limit = data_config.get(f"{split}_limit", 0)
  if limit:  # Small subsets for smoke runs and tests.
    images, labels = images[:limit], labels[:limit]
  return images, labels


# ------------------------------------------------------------------------ augmentation

def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std of uint8 images, as fractions of 255."""
  pixels = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
  return pixels.mean(axis=0), pixels.std(axis=0)


def train_transform(aug_config, mean: np.ndarray, std: np.ndarray) -> A.Compose:
  """The reference's augmentations with Albumentations 2.x names; strict=True makes a
  misspelt or renamed argument an error rather than a silently ignored default."""
  fill = tuple(float(m) * 255.0 for m in mean)  # uint8 units: this runs before Normalize.
  size = aug_config.image_size
  transforms = []
  if aug_config.hflip_p > 0:
    transforms.append(A.HorizontalFlip(p=aug_config.hflip_p))
  if aug_config.affine_p > 0:  # The reference's ShiftScaleRotate, as the Affine it now is.
    transforms.append(A.Affine(
        translate_percent=(-aug_config.shift, aug_config.shift),
        scale=(1 - aug_config.scale, 1 + aug_config.scale),
        rotate=(-aug_config.rotate, aug_config.rotate),
        border_mode=cv2.BORDER_CONSTANT, fill=fill, p=aug_config.affine_p))
  if aug_config.cutout_p > 0:
    hole = aug_config.cutout_size
    transforms.append(A.CoarseDropout(
        num_holes_range=(1, 1), hole_height_range=(hole, hole),
        hole_width_range=(hole, hole), fill=fill, p=aug_config.cutout_p))
  transforms += [A.Resize(size, size), A.Normalize(mean=tuple(mean), std=tuple(std))]
  return A.Compose(transforms, strict=True)


def device_augment(rng, images, aug_config, mean, std):
  """The training augmentations as jitted JAX ops on uint8 NHWC images, for when the
  host cannot keep up (`augment.backend = 'jax'`): HorizontalFlip, the Affine standing
  in for ShiftScaleRotate (bilinear, dataset-mean border), CoarseDropout (one hole of the
  dataset mean), Resize, Normalize; the same order and probabilities as
  `train_transform`. Same distributions, not the same draws."""
  n, h, w, c = images.shape
  fill = jnp.asarray(mean, jnp.float32) * 255.0
  x = images.astype(jnp.float32)
  k_flip, k_affine, k_cut = jax.random.split(rng, 3)

  flip = jax.random.uniform(k_flip, (n,)) < aug_config.hflip_p
  x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)

  if aug_config.affine_p > 0:
    ks, kr, kt, kp = jax.random.split(k_affine, 4)
    angle = jnp.deg2rad(jax.random.uniform(kr, (n,), minval=-aug_config.rotate,
                                           maxval=aug_config.rotate))
    scale = jax.random.uniform(ks, (n,), minval=1 - aug_config.scale, maxval=1 + aug_config.scale)
    shift = jax.random.uniform(kt, (n, 2), minval=-aug_config.shift,
                               maxval=aug_config.shift) * jnp.asarray([h, w])
    apply = jax.random.uniform(kp, (n,)) < aug_config.affine_p
    rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                              indexing="ij")
    centre = jnp.asarray([(h - 1) / 2, (w - 1) / 2])

    def warp(image, angle, scale, shift):
      # Output pixel -> source pixel: undo the shift, then the rotation and scale about
      # the centre.
      dy, dx = rows - centre[0] - shift[0], cols - centre[1] - shift[1]
      cos, sin = jnp.cos(angle) / scale, jnp.sin(angle) / scale
      src = jnp.stack([cos * dy - sin * dx + centre[0], sin * dy + cos * dx + centre[1]])
      # map_coordinates wants a static border value: warp (image - fill) with 0 outside.
      return jnp.stack([ndimage.map_coordinates(image[..., i] - fill[i], list(src), order=1,
                                                mode="constant", cval=0.0) + fill[i]
                        for i in range(c)], axis=-1)

    warped = jax.vmap(warp)(x, angle, scale, shift)
    x = jnp.where(apply[:, None, None, None], warped, x)

  if aug_config.cutout_p > 0:
    hole = aug_config.cutout_size
    ky, kx, kp = jax.random.split(k_cut, 3)
    top = jax.random.randint(ky, (n, 1, 1), 0, h - hole + 1)
    left = jax.random.randint(kx, (n, 1, 1), 0, w - hole + 1)
    r, q = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
    inside = (r >= top) & (r < top + hole) & (q >= left) & (q < left + hole)
    inside &= (jax.random.uniform(kp, (n,)) < aug_config.cutout_p)[:, None, None]
    x = jnp.where(inside[..., None], fill, x)

  size = aug_config.image_size
  if (h, w) != (size, size):
    x = resize_batch(x, size)
  return (x / 255.0 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def resize_batch(images, size: int):
  """NHWC images resized to size x size, bilinear and antialiased (the device Resize,
  and progressive resizing). Linear in the pixels, so resizing normalised images equals
  normalising resized ones."""
  n, _, _, c = images.shape
  return jax.image.resize(images, (n, size, size, c), "linear", antialias=True)


def eval_transform(mean: np.ndarray, std: np.ndarray) -> A.Compose:
  return A.Compose([A.Normalize(mean=tuple(mean), std=tuple(std))], strict=True)


def normalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """Evaluation input: the same Normalize as training, image by image."""
  transform = eval_transform(mean, std)
  return np.stack([transform(image=im)["image"] for im in images])


class TrainBatches:
  """Shuffled, augmented training batches, built in background threads while the
  train step runs (JAX releases the GIL during the step).

  Deterministic: the order of epoch e is a permutation drawn from (seed, e), and the
  augmentation of batch b of epoch e is seeded from (seed, e, b), whichever thread
  builds it. Drops the last incomplete batch so every step has the same shape.

  `batch_size` is global: with several hosts, each builds only its own equal share of
  every batch (process `process_index` of `process_count`).
  """

  def __init__(self, images, labels, make_transform: Callable[[], A.Compose] | None,
               batch_size: int, seed: int, workers: int = 1, prefetch: int = 4,
               process_index: int = 0, process_count: int = 1):
    if len(images) < batch_size:
      raise DataError(f"batch size {batch_size} is larger than the training set ({len(images)})")
    self.images, self.labels, self.batch_size, self.seed = images, labels, batch_size, seed
    self._host, self._hosts = process_index, process_count
    self.steps_per_epoch = len(images) // batch_size
    self._make_transform = make_transform
    self._local = threading.local()
    self._workers, self._prefetch = workers, prefetch

  def _thread_transform(self) -> A.Compose:
    if not hasattr(self._local, "transform"):  # Compose carries RNG state: one per thread.
      self._local.transform = self._make_transform()
    return self._local.transform

  def order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng((self.seed, epoch)).permutation(len(self.images))

  def _build(self, epoch: int, step: int, index: np.ndarray):
    if self._make_transform is None:  # Augmented on device: raw uint8, a quarter the bytes.
      return {"image": self.images[index], "label": self.labels[index]}
    transform = self._thread_transform()
    key = (self.seed, epoch, step) + ((self._host,) if self._hosts > 1 else ())
    transform.set_random_seed(int(np.random.default_rng(key).integers(2**31)))
    batch = np.stack([transform(image=self.images[i])["image"] for i in index])
    return {"image": batch.astype(np.float32), "label": self.labels[index]}

  def preview(self, count: int) -> dict:
    """The first `count` augmented images of epoch 0, for a look at the augmentations."""
    return self._build(0, 0, self.order(0)[:count])

  def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
    """The batches of one epoch from `start_step` on (mid-epoch resume)."""
    order = self.order(epoch)
    steps = range(start_step, self.steps_per_epoch)
    with concurrent.futures.ThreadPoolExecutor(self._workers) as pool:
      pending = []
      for step in steps:
        index = order[step * self.batch_size:(step + 1) * self.batch_size]
        index = np.array_split(index, self._hosts)[self._host]
        pending.append(pool.submit(self._build, epoch, step, index))
        if len(pending) > self._prefetch:
          yield pending.pop(0).result()
      for future in pending:
        yield future.result()


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int) -> Iterator[dict]:
  """Fixed-order batches of already normalised images; the last batch is padded and
  masked so every example counts once and shapes stay static."""
  for start in range(0, len(images), batch_size):
    x, y = images[start:start + batch_size], labels[start:start + batch_size]
    mask = np.ones(len(x), bool)
    if len(x) < batch_size:
      pad = batch_size - len(x)
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
      y = np.concatenate([y, np.zeros(pad, y.dtype)])
      mask = np.concatenate([mask, np.zeros(pad, bool)])
    yield {"image": x, "label": y, "mask": mask}
