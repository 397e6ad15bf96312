"""CIFAR-10 input: TFDS sources -> uint8 NHWC arrays -> Albumentations -> uint8 batches,
normalised to float32 by the train step (`normalize_batch`).

Three sources (`data.source`), one code path after loading:
- 'cifar10' (default): the official binary archive, `cifar-10-binary.tar.gz`. With an empty
  `data.source_path` it is downloaded once from `data.url` into `<data_dir>/downloads` and
  checked against `data.md5`; with a path, that local file is used instead: the binary
  archive fetched by hand, or an image-folder archive or directory (told apart by content).
  `Cifar10Binary` reads the binary records straight from the archive.
- 'image_folder': `Cifar10ImageFolder`, a TFDS builder over a manually supplied archive or
  directory laid out `{train,test}/<class>/<image>` (tar, tar.gz, tar.xz, zip or a plain
  directory), such as a JPEG copy of CIFAR-10.
- 'tfds': the official TFDS `cifar10` builder (needs internet once, and TensorFlow to prepare).
The two offline builders are prepared once into the TFDS data dir as array_record (no
TensorFlow needed), stamped with their source, and read back with `as_data_source`; later
runs read only that prepared copy. Archives are read in place, never extracted.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import gzip
import hashlib
import http.client
import io
import lzma
import os
import pathlib
import posixpath
import signal
import stat
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from typing import Callable, Iterator

# Albumentations asks PyPI for a newer version when imported, unless told not to: a run
# makes no network connection but the download it was asked for.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
from albumentations.augmentations.geometric import functional as fgeometric  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from tqdm import tqdm  # noqa: E402

from s9jax import ops  # noqa: E402

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck")
IMAGE_SHAPE = (32, 32, 3)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".zip")
# What a broken or cut-short archive raises while it is read.
ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, lzma.LZMAError,
                  zlib.error, EOFError)

# The official binary archive: one folder of record files, each record a label byte, then
# the R, G and B planes of a 32x32 image, row by row.
BINARY_FOLDER = "cifar-10-batches-bin"
BINARY_FILES = {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
                "test": ("test_batch.bin",)}
RECORD_BYTES = 1 + 32 * 32 * 3
DOWNLOAD_TIMEOUT_S = 60.0  # Seconds the server may stay silent before a download fails.
DOWNLOAD_CHUNK = 1 << 20
SOURCES = ("cifar10", "image_folder", "tfds")

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


def _refuse_escaping_member(source, name: str, is_link: bool,
                            remedy: str = "re-create it from plain files laid out "
                                          "{train,test}/<class>/<image>"):
  """Nothing is extracted, so such a member could never be written anywhere; it is still
  refused, because an archive holding one was not made by the tools we document."""
  if is_link or name.startswith("/") or ".." in name.split("/"):
    what = "a link" if is_link else "a path outside the archive's folder"
    raise DataError(f"{source}: member {name!r} is {what}; refusing the archive: {remedy}")


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
    return _cifar10_info(self, "CIFAR-10 read from a local image-folder archive.")

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


def iter_binary_records(source: str | os.PathLike, split: str
                        ) -> Iterator[tuple[str, np.ndarray, int]]:
  """Yields (key, uint8 HWC image, label) for one split of the official binary archive (or
  a directory holding its `cifar-10-batches-bin/` folder). Archives are streamed in one
  pass and nothing is extracted; each record file is checked before its records go out."""
  source = pathlib.Path(source)
  wanted = BINARY_FILES[split]
  seen = set()
  for name, size, read in _binary_members(source):
    if name not in wanted:
      continue
    if name in seen:  # Two copies: which one is the data is anyone's guess.
      raise DataError(f"{source} holds {BINARY_FOLDER}/{name} twice: fetch the archive again")
    seen.add(name)
    if not size or size % RECORD_BYTES:
      raise DataError(f"{source}: {BINARY_FOLDER}/{name} is {size:,} bytes, not a whole "
                      f"number of {RECORD_BYTES:,}-byte records: fetch the archive again")
    records = np.frombuffer(read(), np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0]
    if labels.max() >= len(CLASS_NAMES):
      bad = int(np.argmax(labels >= len(CLASS_NAMES)))
      raise DataError(f"{source}: record {bad} of {BINARY_FOLDER}/{name} has label "
                      f"{labels[bad]}, not 0..9: not a CIFAR-10 binary file")
    # Each record is the R plane, then G, then B: planes to channels-last.
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    for i in range(len(records)):
      yield f"{name}:{i:05d}", images[i], int(labels[i])
  missing = [name for name in wanted if name not in seen]
  if missing:
    raise DataError(f"{source} has no {', '.join(f'{BINARY_FOLDER}/{m}' for m in missing)}: "
                    "it is not the complete CIFAR-10 binary archive; fetch it again")


def _binary_members(source: pathlib.Path) -> Iterator[tuple[str, int, Callable[[], bytes]]]:
  """(file name, size, reader) of each file in a `cifar-10-batches-bin/` folder of `source`."""
  if source.is_dir():
    folder = source if source.name == BINARY_FOLDER else source / BINARY_FOLDER
    for path in sorted(folder.iterdir()) if folder.is_dir() else ():
      if path.is_file():
        yield path.name, path.stat().st_size, path.read_bytes
    return
  with tarfile.open(source, "r:*") as tf:
    for member in tf:  # Streamed: one pass over the compressed archive.
      _refuse_escaping_member(source, member.name, member.issym() or member.islnk(),
                              "fetch the official archive again")
      parts = member.name.split("/")
      if member.isfile() and len(parts) >= 2 and parts[-2] == BINARY_FOLDER:
        yield parts[-1], member.size, tf.extractfile(member).read


def _is_binary_source(source: pathlib.Path) -> bool:
  """Whether a local source is the official binary archive (or its unpacked folder) rather
  than an image folder, from its first members, whatever the file is called. Anything
  else goes to the image-folder reader, which says what it expected."""
  if source.is_dir():
    return source.name == BINARY_FOLDER or (source / BINARY_FOLDER).is_dir()
  if source.name.endswith(".zip"):
    return False
  try:
    with tarfile.open(source, "r:*") as tf:
      for member in tf:  # The first telling member decides: no pass over the whole archive.
        parts = tuple(member.name.rstrip("/").split("/"))
        if BINARY_FOLDER in parts:
          return True
        if _split_class_of(parts):
          return False
  except ARCHIVE_ERRORS as e:
    if source.name.endswith(ARCHIVE_SUFFIXES):
      raise _corrupt_archive(source, e) from e
  return False


def _corrupt_archive(source, e: Exception) -> DataError:
  return DataError(f"cannot read {source} ({type(e).__name__}: {e}): the archive is corrupt "
                   "or truncated; fetch or re-create it")


def _cifar10_info(builder, description: str) -> tfds.core.DatasetInfo:
  """Decoded uint8 pixels: `features.Image` would PNG-encode them with TensorFlow."""
  return tfds.core.DatasetInfo(
      builder=builder,
      description=description,
      features=tfds.features.FeaturesDict({
          "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
          "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
      }),
      supervised_keys=("image", "label"),
  )


class Cifar10Binary(tfds.core.GeneratorBasedBuilder):
  """CIFAR-10 from the official binary archive (`cifar-10-binary.tar.gz`), read in place."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, archive: str | os.PathLike | None = None, **kwargs):
    self._archive = archive  # Only needed to prepare; a prepared copy is read without it.
    super().__init__(**kwargs)

  def _info(self):
    return _cifar10_info(self, "CIFAR-10 read from the official binary archive.")

  def _split_generators(self, dl_manager):
    if self._archive is None:
      raise DataError("Cifar10Binary(archive=...) is needed to prepare the dataset")
    return {split: self._generate_examples(self._archive, split) for split in BINARY_FILES}

  def _generate_examples(self, archive, split):
    for key, image, label in iter_binary_records(archive, split):
      yield key, {"image": image, "label": label}


def _md5_of(path: pathlib.Path) -> str:
  digest = hashlib.md5()
  with open(path, "rb") as f:
    while chunk := f.read(DOWNLOAD_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def download_archive(url: str, md5: str, downloads_dir: str | os.PathLike) -> pathlib.Path:
  """The archive at `url` in `downloads_dir`, downloaded unless a copy with this MD5 is
  already there. The bytes go to a `.part` file, renamed only once its size and MD5 are
  right, so a file under the final name is always a complete, verified one; any failure
  deletes the `.part` file and raises a one-line DataError saying what to do."""
  name = posixpath.basename(urllib.parse.urlparse(url).path) or "cifar-10-binary.tar.gz"
  final = pathlib.Path(downloads_dir) / name
  md5 = md5.lower()
  if final.is_file():
    if _md5_of(final) == md5:
      return final
    print(f"{final} does not have MD5 {md5}: downloading it again", flush=True)
    final.unlink()  # The final name only ever holds a verified file.

  def failed(what: str) -> DataError:
    return DataError(f"could not download CIFAR-10 from {url}: {what}; nothing was kept. "
                     f"Rerun to retry, or fetch that file by hand and pass "
                     f"--config.data.source_path=PATH/TO/{name} (an image-folder archive "
                     "works too)")

  def reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError) and isinstance(e.reason, BaseException):
      e = e.reason
    if isinstance(e, TimeoutError):
      return f"nothing received for {DOWNLOAD_TIMEOUT_S:g} s"
    if isinstance(e, OSError) and e.strerror:
      return e.strerror
    return " ".join(str(getattr(e, "reason", e) or type(e).__name__).split())

  final.parent.mkdir(parents=True, exist_ok=True)
  part = final.with_name(name + ".part")
  print(f"Downloading CIFAR-10 from {url} into {final} (once)...", flush=True)
  try:
    try:
      response = urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S)
    except urllib.error.HTTPError as e:
      raise failed(f"the server answered HTTP {e.code} {reason(e)}") from e
    except TimeoutError as e:  # Connected, but no response came.
      raise failed(f"the server sent no answer within {DOWNLOAD_TIMEOUT_S:g} s") from e
    except (OSError, http.client.HTTPException) as e:  # Refused, unknown host, no route.
      raise failed(f"cannot connect ({reason(e)})") from e
    length = response.headers.get("Content-Length")
    expected = int(length) if length and length.isdigit() else None
    digest, received = hashlib.md5(), 0
    with response, open(part, "wb") as out, tqdm(
        total=expected, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
        file=sys.stderr, mininterval=2.0) as progress:
      while True:
        try:  # Only the network's errors here: a full disk stays an OSError of its own.
          chunk = response.read(DOWNLOAD_CHUNK)
        except (OSError, http.client.HTTPException) as e:
          raise failed(f"the transfer broke after {received:,} bytes ({reason(e)})") from e
        if not chunk:
          break
        out.write(chunk)
        digest.update(chunk)
        received += len(chunk)
        progress.update(len(chunk))
    # http.client returns a short body without complaint when the server closes early.
    if expected is not None and received != expected:
      raise failed(f"the transfer stopped after {received:,} of {expected:,} bytes")
    if digest.hexdigest() != md5:
      raise failed(f"the file's MD5 is {digest.hexdigest()}, not {md5} (corrupt, or not "
                   "the expected file)")
    os.replace(part, final)
  finally:  # Failed or interrupted (Ctrl-C included): no partial file stays behind.
    part.unlink(missing_ok=True)
  return final


def _prepare_once(builder, source: str, prepare: Callable[[], None]):
  """`builder`, prepared by `prepare()` unless it already is. The prepared copy remembers
  its source, so pointing at another one cannot silently reuse it. TFDS prepares into an
  `incomplete.*` folder and renames it when done: an interrupted preparation never looks
  prepared (the next run starts over)."""
  stamp = pathlib.Path(builder.data_dir) / "s9jax_source.txt"
  # is_prepared() logs a warning for a folder that is not there yet: look first.
  if (stamp.parent / "dataset_info.json").exists() and builder.is_prepared():
    if not stamp.exists():  # Prepared before sources were recorded (or killed just now).
      stamp.write_text(source)
    prepared_from = stamp.read_text()
    if prepared_from != source:
      raise DataError(f"{builder.data_dir} was prepared from {prepared_from}, not {source}: "
                      "pass another --config.data.data_dir (or delete that one)")
    return builder
  prepare()
  stamp.write_text(source)
  return builder


def _download_and_prepare(builder, source: pathlib.Path | None, manual_dir=None):
  print(f"Preparing CIFAR-10 from {source} into {builder.data_dir} (once)...", flush=True)
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir and str(manual_dir), try_download_gcs=False))
  except ARCHIVE_ERRORS as e:
    raise _corrupt_archive(source, e) from e


def _prepare_image_folder(source: pathlib.Path, data_dir: str) -> Cifar10ImageFolder:
  manual_dir, source_name = (source, None) if source.is_dir() else (source.parent, source.name)
  builder = Cifar10ImageFolder(data_dir=data_dir, file_format="array_record",
                               source_name=source_name)
  return _prepare_once(builder, str(source),
                       lambda: _download_and_prepare(builder, source, manual_dir))


def _prepare_binary(archive: pathlib.Path | None, data_config, data_dir: str) -> Cifar10Binary:
  """From a local binary archive, or (archive None) from `data_config.url`, downloaded."""
  builder = Cifar10Binary(data_dir=data_dir, file_format="array_record", archive=archive)
  if archive is not None:
    return _prepare_once(builder, str(archive),
                         lambda: _download_and_prepare(builder, archive))

  def download_then_prepare():
    path = download_archive(data_config.url, data_config.md5,
                            pathlib.Path(data_dir) / "downloads")
    builder._archive = path
    _download_and_prepare(builder, path)

  # A run after the first needs neither the network nor the downloaded file.
  return _prepare_once(builder, f"{data_config.url} (MD5 {data_config.md5.lower()})",
                       download_then_prepare)


def _tfds_official(data_dir: str, split: str):
  try:
    return tfds.data_source("cifar10", split=split, data_dir=data_dir,
                            builder_kwargs={"file_format": "array_record"})
  except Exception as e:  # Download, TensorFlow import, or preparation failed.
    detail = " ".join(str(e).split())
    raise DataError(
        f"could not load TFDS 'cifar10' ({type(e).__name__}: {detail}). Without TensorFlow, "
        "use --config.data.source=cifar10 (downloads the official archive once), or offline "
        "--config.data.source_path=PATH/TO/cifar-10-binary.tar.gz") from e


def prepare(data_config):
  """Makes the configured source ready to read, downloading and preparing it if this data
  dir has no prepared copy yet; returns its TFDS builder (None for 'tfds'). Call it before
  writing anything to fail early on missing data; `load_split` calls it too."""
  data_dir = os.path.expanduser(data_config.data_dir)
  source = data_config.source
  if source not in SOURCES:
    raise DataError(f"data.source must be one of {', '.join(map(repr, SOURCES))}, "
                    f"got {source!r}")
  if source == "tfds":
    _tfds_official(data_dir, "train")  # Prepares both splits.
    return None
  if not data_config.source_path:
    if source == "image_folder":
      raise DataError("data.source=image_folder needs --config.data.source_path=PATH to an "
                      "image-folder archive or directory")
    return _prepare_binary(None, data_config, data_dir)
  path = pathlib.Path(data_config.source_path).expanduser().resolve()
  if not path.exists():
    raise DataError(f"data source {path} does not exist: pass --config.data.source_path "
                    "pointing at the CIFAR-10 binary archive (cifar-10-binary.tar.gz) or an "
                    "image-folder archive or directory, or leave it empty to download")
  if source == "cifar10" and _is_binary_source(path):
    return _prepare_binary(path, data_config, data_dir)
  return _prepare_image_folder(path, data_dir)


def load_split(data_config, split: str) -> tuple[np.ndarray, np.ndarray]:
  """The whole split as (uint8 images NHWC, int32 labels), from the configured source."""
  if data_config.source == "tfds":
    images, labels = _decode(_tfds_official(os.path.expanduser(data_config.data_dir), split))
  else:
    images, labels = _decoded_once(prepare(data_config), split)
  limit = data_config.get(f"{split}_limit", 0)
  if limit:  # Small subsets for smoke runs and tests.
    images, labels = images[:limit], labels[:limit]
  return images, labels


def _decode(source) -> tuple[np.ndarray, np.ndarray]:
  records = source.__getitems__(list(range(len(source))))
  images = np.stack([r["image"] for r in records]).astype(np.uint8)
  return images, np.asarray([r["label"] for r in records], dtype=np.int32)


def _decoded_once(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
  """The split's arrays, decoded from the prepared copy once and kept beside it
  (s9jax_{split}.npz). Why: TFDS parses and decodes each record in Python, ~5 s for
  CIFAR-10's 60,000 at the start of every run on the 2-core machine; the kept arrays load
  in a fraction of a second. Used only if newer than the prepared copy's
  dataset_info.json; where the folder cannot be written, decoded every time."""
  folder = pathlib.Path(builder.data_dir)
  kept = folder / f"s9jax_{split}.npz"
  try:
    if kept.stat().st_mtime_ns >= (folder / "dataset_info.json").stat().st_mtime_ns:
      with np.load(kept) as arrays:
        return arrays["images"], arrays["labels"]
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
    pass  # Not there yet, or unreadable: decode again.
  images, labels = _decode(builder.as_data_source(split=split))
  part = None
  try:  # A name of its own: hosts sharing the folder may write at the same time.
    handle, part = tempfile.mkstemp(prefix=f".s9jax_{split}.", suffix=".npz", dir=folder)
    os.fchmod(handle, 0o644)  # mkstemp's 0600 would hide it from others sharing the data.
    with os.fdopen(handle, "wb") as f:
      np.savez(f, images=images, labels=labels)
    os.replace(part, kept)  # Whole or not at all, for runs reading it at the same time.
  except OSError:
    pass
  finally:
    if part is not None:
      pathlib.Path(part).unlink(missing_ok=True)
  return images, labels


def split_validation(images: np.ndarray, labels: np.ndarray, held_out: int):
  """((train images, labels), (validation images, labels)): the last `held_out` images of
  the training split validate (`data.validation_size`; 0: none, all 50,000 train)."""
  split = len(images) - held_out
  return (images[:split], labels[:split]), (images[split:], labels[split:])


# ------------------------------------------------------------------------ augmentation

def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std of uint8 images, as fractions of 255: from each channel's
  histogram of the 256 values: ~0.5 s for CIFAR-10's training set, where a float64 copy
  of it took several seconds of every run's start."""
  channels = images.shape[-1]
  values = np.arange(256) / 255.0
  mean, std = np.empty(channels), np.empty(channels)
  for c in range(channels):
    counts = np.bincount(np.ascontiguousarray(images[..., c]).ravel(), minlength=256)
    mean[c] = counts @ values / counts.sum()
    std[c] = np.sqrt(counts @ (values - mean[c]) ** 2 / counts.sum())
  return mean, std


# cv2.warpAffine drops the channel axis of an HxWx1 image; Albumentations' own
# `warp_affine` wears this wrapper to put it back.
_warp_affine = fgeometric.preserve_channel_dim(fgeometric.warp_affine_with_value_extension)


class ImageAffine(A.Affine):
  """`A.Affine` for images alone, at less than half its cost: the same draws, the same
  matrix (by Albumentations' own functions) and the same `cv2.warpAffine` call, so the
  same pixels (tested), without the two things its ~80 us of Python a 32x32 image spends
  most on and images do not need: the bounding-box matrix, and an identity check whose
  only effect is to skip a warp that would change nothing. Refuses `fit_output` and
  every target but images."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    if self.fit_output:
      raise ValueError("ImageAffine keeps the image's shape: fit_output must be False")

  def get_params_dependent_on_data(self, params, data):
    shape = params["shape"][:2]
    if set(data) - {"image"}:
      raise ValueError(f"ImageAffine warps images alone, not {sorted(set(data) - {'image'})}")
    # In A.Affine's order, so a seed draws the same values.
    translate = self._get_translate_params(shape)
    shear = self._get_shear_params()
    scale = self._get_scale(self.scale, self.keep_ratio, self.balanced_scale, self.py_random)
    rotate = self.py_random.uniform(*self.rotate)
    matrix = fgeometric.create_affine_transformation_matrix(
        translate, shear, scale, rotate, fgeometric.center(shape))
    return {"rotate": rotate, "scale": scale, "matrix": matrix, "output_shape": shape}

  def apply(self, img, matrix, output_shape, **params):
    return _warp_affine(img, matrix[:2], (output_shape[1], output_shape[0]),
                        self.interpolation, self.border_mode, self.fill)


def train_transform(aug_config, mean: np.ndarray, std: np.ndarray) -> A.Compose:
  """The reference's augmentations with Albumentations 2.x names; strict=True makes a
  misspelt or renamed argument an error rather than a silently ignored default."""
  fill = tuple(float(m) * 255.0 for m in mean)  # uint8 units: the step normalises later.
  size = aug_config.image_size
  transforms = []
  if aug_config.hflip_p > 0 and not aug_config.alternate_flip:  # Else flipped before this.
    transforms.append(A.HorizontalFlip(p=aug_config.hflip_p))
  if aug_config.affine_p > 0:  # The reference's ShiftScaleRotate, as the Affine it now is.
    transforms.append(ImageAffine(
        translate_percent=(-aug_config.shift, aug_config.shift),
        scale=(1 - aug_config.scale, 1 + aug_config.scale),
        rotate=(-aug_config.rotate, aug_config.rotate),
        border_mode=cv2.BORDER_CONSTANT, fill=fill, p=aug_config.affine_p))
  if aug_config.cutout_p > 0:
    hole = aug_config.cutout_size
    transforms.append(A.CoarseDropout(
        num_holes_range=(1, 1), hole_height_range=(hole, hole),
        hole_width_range=(hole, hole), fill=fill, p=aug_config.cutout_p))
  # No Normalize here: it was ~1/4 of the per-image cost (Python overhead, not pixels) and
  # 4x the bytes to the device; the step applies `normalize_batch` to the uint8 batch.
  # Nor the reference's Resize(32, 32) on our 32x32 images: it changes nothing, draws no
  # random number, and cost ~5 us of the ~35 an image fast.py's transform takes.
  if (size, size) != IMAGE_SHAPE[:2]:
    transforms.append(A.Resize(size, size))
  return A.Compose(transforms, strict=True)


def augment_images(transform: A.Compose, images: np.ndarray, seed: int) -> np.ndarray:
  """`transform` on each of `images`, with Compose's distribution: each transform in turn
  takes each image with its probability p, independently. Calling the transforms on the
  images they take, not the Compose on every image, spares Compose's and each skipped
  transform's Python on the cores the train step uses: fast.py's augmentations take
  ~12 us a 32x32 image, ~16 through a Compose per image (~35 with `A.Affine`; measured
  one at a time on the dev VM). `seed` fixes it all: which images each transform takes,
  and each transform's own draws, from streams of their own (Compose's
  `set_random_seed` gives every transform the same one)."""
  streams = np.random.SeedSequence(seed).spawn(len(transform.transforms) + 1)
  take = np.random.default_rng(streams[0])
  out = list(images)
  for t, stream in zip(transform.transforms, streams[1:]):
    if not isinstance(t, A.BasicTransform):
      raise TypeError(f"augment_images applies single transforms, not {type(t).__name__}")
    t.set_random_seed(int(stream.generate_state(1)[0]))
    for i in np.flatnonzero(take.random(len(out)) < t.p):
      out[i] = t(image=out[i], force_apply=True)["image"]
  return np.stack(out)


def normalize_batch(images, mean, std):
  """Albumentations' Normalize (max_pixel_value 255) on a whole uint8 NHWC batch, NumPy
  on the host or jax inside a jitted function: (x / 255 - mean) / std per channel, the
  run's `channel_stats`, float32. The one definition every path uses: the train step,
  the device augmentation, evaluation and inference."""
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  return (images.astype(np.float32) - mean * 255) * (1 / (std * 255))


def device_augment(rng, images, aug_config, mean, std, flip=None):
  """The training augmentations as jitted JAX ops on uint8 NHWC images, for when the
  host cannot keep up (`augment.backend = 'jax'`): HorizontalFlip, the Affine standing
  in for ShiftScaleRotate (bilinear, dataset-mean border), CoarseDropout (one hole of the
  dataset mean), Resize, then `normalize_batch`; the same order and probabilities as
  `train_transform` and the host path's step. Same distributions, not the same draws.
  `flip` (bool per image), when given, replaces HorizontalFlip's draw
  (`augment.alternate_flip`)."""
  n, h, w, _ = images.shape
  fill = jnp.asarray(mean, jnp.float32) * 255.0
  x = images.astype(jnp.float32)
  k_flip, k_affine, k_cut = jax.random.split(rng, 3)

  if flip is None:
    flip = jax.random.uniform(k_flip, (n,)) < aug_config.hflip_p
  x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)

  if aug_config.affine_p > 0:
    ks, kr, kt, kp = jax.random.split(k_affine, 4)
    # Albumentations' Affine draws: a rotation, a scale per axis (keep_ratio=False), and a
    # shift per axis of int(fraction * size) whole pixels, truncated toward 0 (so with
    # shift 0.05 at 32 px: 0 with p 0.625, else +-1).
    angle = jnp.deg2rad(jax.random.uniform(kr, (n,), minval=-aug_config.rotate,
                                           maxval=aug_config.rotate))
    scale = jax.random.uniform(ks, (n, 2), minval=1 - aug_config.scale,
                               maxval=1 + aug_config.scale)
    shift = jnp.trunc(jax.random.uniform(kt, (n, 2), minval=-aug_config.shift,
                                         maxval=aug_config.shift) * jnp.asarray([h, w]))
    apply = jax.random.uniform(kp, (n,)) < aug_config.affine_p
    rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                              indexing="ij")
    centre = jnp.asarray([(h - 1) / 2, (w - 1) / 2])

    def source(angle, scale, shift):
      # Output pixel -> source pixel: undo the shift, then the rotation, then each axis's
      # scale, about the centre (Albumentations scales, rotates, then shifts).
      dy, dx = rows - centre[0] - shift[0], cols - centre[1] - shift[1]
      cos, sin = jnp.cos(angle), jnp.sin(angle)
      return ((cos * dy - sin * dx) / scale[0] + centre[0],
              (sin * dy + cos * dx) / scale[1] + centre[1])

    # The sampler's border is 0: warp (image - fill), so the border is the fill.
    warped = ops.bilinear_sample(x - fill, *jax.vmap(source)(angle, scale, shift)) + fill
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
  return normalize_batch(x, mean, std)


def resize_batch(images, size: int):
  """NHWC images resized to size x size, bilinear and antialiased (the device Resize,
  and progressive resizing). Linear in the pixels, so resizing normalised images equals
  normalising resized ones."""
  n, _, _, c = images.shape
  return jax.image.resize(images, (n, size, size, c), "linear", antialias=True)


def alternating_flips(seed: int, count: int) -> np.ndarray:
  """airbench's alternating flip: image i is mirrored in epochs e with (start[i] + e) odd,
  `start` a fair coin per image, so every image is seen both ways every two epochs
  instead of by chance. Returns `start` (uint8)."""
  return np.random.default_rng((seed, 0xF11B)).integers(0, 2, count, dtype=np.uint8)


def epoch_order(seed: int, epoch: int, count: int) -> np.ndarray:
  """The record indices of epoch `epoch` in training order: a permutation of
  range(count) from (seed, epoch) alone. Drawn whole, once an epoch: Grain's
  `MapDataset.shuffle` computes each index on its own in Python, ~1.1 ms a batch of 128
  (measured) on the cores the train step uses."""
  return np.random.default_rng((seed, epoch, 0x5EED)).permutation(count)


def _batch_seed(seed: int, epoch: int, step: int, host: int, hosts: int) -> int:
  """The augmentation seed of one batch (`augment_images`): a function of where it is,
  nothing else."""
  key = (seed, epoch, step) + ((host,) if hosts > 1 else ())
  return int(np.random.default_rng(key).integers(2**31))


class AugmentBatch:
  """Global batch number -> this host's share of that batch, augmented: the per-batch
  transform of `TrainBatches`, run in Grain's worker processes (or its background
  thread). Picklable: it holds the images, labels and `make_transform` (the
  augmentation config and mean/std), never a built Compose; each process builds its own
  on first use and seeds it for every batch from (seed, epoch, step[, host]), so no
  random state is pickled or carried from one batch to the next."""

  def __init__(self, images, labels, make_transform: Callable[[], A.Compose] | None,
               seed: int, batch_size: int, host: int = 0, hosts: int = 1,
               alternate_flip: bool = False):
    self.images, self.labels, self.make_transform = images, labels, make_transform
    self.seed, self.batch_size, self.host, self.hosts = seed, batch_size, host, hosts
    self.steps_per_epoch = len(images) // batch_size  # The last incomplete batch dropped.
    self.flip_start = alternating_flips(seed, len(images)) if alternate_flip else None
    self._transform = None
    self._order = (None, None)  # (epoch, its epoch_order), the last one asked for.

  def __getstate__(self):  # Built where it runs.
    return {**self.__dict__, "_transform": None, "_order": (None, None)}

  def fresh(self) -> AugmentBatch:
    """A copy with no Compose built yet: a Compose must not serve two threads at once."""
    return copy.copy(self)

  def __call__(self, batch_index: int, _) -> dict:
    """Grain's `map_with_index`: batch `batch_index` counts from step 0 of epoch 0."""
    epoch, step = divmod(batch_index, self.steps_per_epoch)
    if self._order[0] != epoch:
      self._order = (epoch, epoch_order(self.seed, epoch, len(self.images)))
    index = self._order[1][step * self.batch_size:(step + 1) * self.batch_size]
    return self.build(epoch, step, np.array_split(index, self.hosts)[self.host])

  def build(self, epoch: int, step: int, index: np.ndarray) -> dict:
    flip = None if self.flip_start is None else (self.flip_start[index] + epoch) % 2 == 1
    if self.make_transform is None:  # The images are on the devices: send where to look.
      return {"index": index.astype(np.int32)} | ({} if flip is None else {"flip": flip})
    if self._transform is None:
      self._transform = self.make_transform()
    images = self.images[index]
    if flip is not None:
      images[flip] = images[flip, :, ::-1]
    batch = augment_images(self._transform, images,
                           _batch_seed(self.seed, epoch, step, self.host, self.hosts))
    return {"image": batch, "label": self.labels[index]}  # uint8: the step normalises.


def _init_worker(worker_index: int, worker_count: int) -> None:
  """First thing in each Grain worker process: JAX there may only ever start a CPU client
  (the main process owns the accelerators; it also spawned this one with
  JAX_PLATFORMS=cpu), OpenCV runs on this process's one thread, Ctrl-C is the main
  process's to handle, and the worker exits when the main process dies without stopping
  it (kill -9): Grain's workers would otherwise live on as orphans."""
  del worker_index, worker_count
  os.environ["JAX_PLATFORMS"] = "cpu"
  jax.config.update("jax_platforms", "cpu")
  cv2.setNumThreads(1)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True,
                   name="s9jax-exit-with-parent").start()


def _exit_when_orphaned(parent: int) -> None:
  while os.getppid() == parent:
    time.sleep(1.0)
  os._exit(0)


def _let_grain_read_its_flags() -> None:
  """Grain 0.2.18's `mp_prefetch` reads one of its absl flags, which raises
  UnparsedFlagAccessError where absl never parsed the command line (tests, benchmarks,
  notebooks; google/grain#1355, fixed after 0.2.18). Marking that one flag given keeps its
  default and lets it be read, as Grain does for its own flags in its workers."""
  from absl import flags
  if not flags.FLAGS.is_parsed() and "grain_enable_multiprocess_worker_profiling" in flags.FLAGS:
    flags.FLAGS["grain_enable_multiprocess_worker_profiling"].present = True


@contextlib.contextmanager
def _children_on_cpu():
  """JAX_PLATFORMS=cpu in this process's environment while worker processes are spawned
  (they inherit it: the JAX they import can only start a CPU client), then as it was."""
  before = os.environ.get("JAX_PLATFORMS")
  os.environ["JAX_PLATFORMS"] = "cpu"
  try:
    yield
  finally:
    if before is None:
      os.environ.pop("JAX_PLATFORMS", None)
    else:
      os.environ["JAX_PLATFORMS"] = before


class TrainBatches:
  """Shuffled, augmented training batches from a Grain pipeline, built ahead while the
  train step runs:

      MapDataset.range(steps_per_epoch).repeat()  # epoch after epoch, step after step
        .map_with_index(AugmentBatch)             # global batch b -> its images, augmented
        [first batch:].to_iter_dataset(...)       # then, with `workers` > 0, .mp_prefetch

  `workers` augmentation processes (Grain's `mp_prefetch`; each computes every
  `workers`-th batch), or with 0 one background thread of this process (JAX releases the
  GIL during the step, so it overlaps with it). Either way the same batches:

  Deterministic: the order of epoch e is `epoch_order(seed, e)` (`order(e)`); the
  augmentation of batch b of epoch e is seeded from (seed, e, b), whichever process or
  thread builds it; `epoch(e, start_step=k)` is exactly the tail of `epoch(e)` (mid-epoch
  resume). Drops the last incomplete batch so every step has the same shape.

  `batch_size` is global: with several hosts, each builds only its own equal share of
  every batch (process `process_index` of `process_count`).

  One stream serves consecutive `epoch` calls, so worker processes start once per run
  (seconds: they import JAX, Albumentations and TFDS) and build the next epoch's first
  batches during evaluation; asking for any other position starts a new stream.
  `close()` (or the end of the process) stops the workers. `make_transform=None` gives
  batches of record indices alone, `{"index": int32}` (this host's share): the training
  set is on the devices and the train step gathers and augments it there.
  `alternate_flip`: images are mirrored by `alternating_flips` before the transform (or,
  with none, batches carry `"flip"` for the devices to apply).
  """

  def __init__(self, images, labels, make_transform: Callable[[], A.Compose] | None,
               batch_size: int, seed: int, workers: int = 0, prefetch: int = 4,
               process_index: int = 0, process_count: int = 1, alternate_flip: bool = False):
    if len(images) < batch_size:
      raise DataError(f"batch size {batch_size} is larger than the training set ({len(images)})")
    if workers < 0:
      raise ValueError(f"workers must be >= 0 (0: this process), not {workers}")
    self.images, self.labels, self.batch_size, self.seed = images, labels, batch_size, seed
    self._host, self._hosts = process_index, process_count
    self._augment = AugmentBatch(images, labels, make_transform, seed, batch_size,
                                 process_index, process_count, alternate_flip)
    self.steps_per_epoch = self._augment.steps_per_epoch
    # Nothing to spread over processes when there is nothing to augment.
    self._workers = workers if make_transform is not None else 0
    self._prefetch = max(1, prefetch)
    self._stream = None      # (Grain iterator, batches already taken from it).
    self._position = None    # Global index (epoch * steps_per_epoch + step) it yields next.

  def order(self, epoch: int, count: int | None = None) -> np.ndarray:
    """The first `count` (all) record indices of epoch `epoch`, in training order."""
    return epoch_order(self.seed, epoch, len(self.images))[:count]

  def preview(self, count: int) -> dict:
    """The first `count` images of epoch 0, augmented by the host's transform (raw with
    none: the caller augments them as its devices do), for a look at the augmentations."""
    index = self.order(0, count)
    batch = self._augment.fresh().build(0, 0, index)
    if self._augment.make_transform is None:
      batch |= {"image": self.images[index], "label": self.labels[index]}
    return batch

  def _dataset(self, position: int):
    import grain  # Here, not at the top: eval and inference import this module without it.
    return (grain.MapDataset.range(self.steps_per_epoch).repeat()
            .map_with_index(self._augment.fresh()))[position:]

  def _start(self, position: int):
    import grain
    self.close()
    dataset = self._dataset(position)
    if not self._workers:
      stream = iter(dataset.to_iter_dataset(
          grain.ReadOptions(num_threads=1, prefetch_buffer_size=self._prefetch)))
      self._stream, self._position = (stream, collections.deque()), position
      return
    dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    dataset = dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=self._workers,
                                     per_worker_buffer_size=-(-self._prefetch // self._workers)),
        worker_init_fn=_init_worker)
    _let_grain_read_its_flags()
    with _children_on_cpu():
      # Grain spawns the workers from background threads: hold the environment until
      # each has delivered its first batch (worker i builds batches i, i + workers, ...).
      stream = iter(dataset)
      taken = collections.deque()
      try:
        for _ in range(self._workers):
          taken.append(next(stream))
      except BaseException:
        stream.close()
        raise
    self._stream, self._position = (stream, taken), position

  def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
    """The batches of one epoch from `start_step` on (mid-epoch resume)."""
    position = epoch * self.steps_per_epoch + start_step
    for _ in range(start_step, self.steps_per_epoch):
      if self._stream is None or self._position != position:
        self._start(position)  # The first batch, or someone else moved the stream on.
      stream, taken = self._stream
      try:
        batch = taken.popleft() if taken else next(stream)
      except BaseException:
        self.close()
        raise
      if self._workers:  # Out of /dev/shm now: Grain unlinks a segment with its array.
        batch = {key: np.array(value) for key, value in batch.items()}
      position += 1
      self._position = position
      yield batch

  def close(self) -> None:
    """Stops the stream and its worker processes; a later `epoch` starts a new one."""
    stream, self._stream, self._position = self._stream, None, None
    if stream is not None:
      stream[0].close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to stop.
      pass


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
