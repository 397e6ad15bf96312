"""Offline TFDS source, augmentation and batching, on tiny archives made here (and the
shared JPEG copy when it is beside the checkout)."""

import io
import os
import pathlib
import tarfile
import zipfile
from collections import Counter

import albumentations as A
import cv2
import jax
import numpy as np
import pytest
from PIL import Image

from s9jax import input_pipeline
from tests import conftest
from tests.conftest import SHARED_ARCHIVE, label_of, load_config, tiny_config, write_tiny_tree


def assert_labels_follow_cifar_order(images, labels):
  assert [label_of(im) for im in images] == labels.tolist()


def test_offline_source_reads_a_tar_archive_with_cifar_labels(tiny_archive, tmp_path):
  config = tiny_config(tiny_archive, tmp_path / "tfds")
  images, labels = input_pipeline.load_split(config.data, "train")
  assert images.shape == (30, 32, 32, 3) and images.dtype == np.uint8
  assert Counter(labels.tolist()) == {c: 3 for c in range(10)}
  assert_labels_follow_cifar_order(images, labels)
  test_images, test_labels = input_pipeline.load_split(config.data, "test")
  assert len(test_images) == 20
  assert_labels_follow_cifar_order(test_images, test_labels)


def test_a_split_is_decoded_once_then_read_back_until_the_copy_is_prepared_again(
    tiny_archive, tmp_path, monkeypatch):
  config = tiny_config(tiny_archive, tmp_path / "tfds")
  first = input_pipeline.load_split(config.data, "train")
  decoded = []
  real = input_pipeline._decode
  monkeypatch.setattr(input_pipeline, "_decode", lambda source: decoded.append(1) or real(source))
  again = input_pipeline.load_split(config.data, "train")
  assert decoded == []  # Read back, not decoded.
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype
  # Readable by whoever shares the data folder, not only by its writer.
  folder = pathlib.Path(input_pipeline.prepare(config.data).data_dir)
  assert (folder / "s9jax_train.npz").stat().st_mode & 0o777 == 0o644
  # A prepared copy newer than the kept arrays: decoded anew, and kept again.
  prepared = (folder / "dataset_info.json").stat().st_mtime_ns
  os.utime(folder / "s9jax_train.npz", ns=(prepared - 1, prepared - 1))
  input_pipeline.load_split(config.data, "train")
  input_pipeline.load_split(config.data, "train")
  assert decoded == [1]


@pytest.mark.parametrize("kind", ["zip", "directory"])
def test_offline_source_reads_zip_and_plain_directories(kind, tmp_path):
  tree = tmp_path / "tree"
  write_tiny_tree(tree, {"train": 1, "test": 1})
  if kind == "zip":
    source = tmp_path / "tiny.zip"
    with zipfile.ZipFile(source, "w") as zf:
      for path in sorted(tree.rglob("*.png")):
        zf.write(path, "cifar/" + str(path.relative_to(tree)))
  else:
    source = tree
  config = tiny_config(source, tmp_path / "tfds")
  images, labels = input_pipeline.load_split(config.data, "test")
  assert sorted(labels.tolist()) == list(range(10))
  assert_labels_follow_cifar_order(images, labels)


def test_missing_source_says_how_to_point_at_the_data(tmp_path):
  config = tiny_config(tmp_path / "nowhere.tar.xz", tmp_path / "tfds")
  with pytest.raises(input_pipeline.DataError, match="does not exist.*source_path"):
    input_pipeline.load_split(config.data, "train")


def test_a_class_folder_that_is_not_cifar10_is_rejected(tmp_path):
  write_tiny_tree(tmp_path / "tree", {"train": 1, "test": 1})
  (tmp_path / "tree" / "train" / "cat").rename(tmp_path / "tree" / "train" / "kitten")
  config = tiny_config(tmp_path / "tree", tmp_path / "tfds")
  with pytest.raises(input_pipeline.DataError, match="'kitten' is not a CIFAR-10 class"):
    input_pipeline.load_split(config.data, "train")


def test_tfds_source_failure_points_to_the_offline_source(tmp_path, monkeypatch):
  def no_network(*args, **kwargs):
    raise ConnectionError("no internet")
  monkeypatch.setattr(input_pipeline.tfds, "data_source", no_network)
  config = tiny_config(tmp_path / "x", tmp_path / "tfds", **{"data.source": "tfds"})
  with pytest.raises(input_pipeline.DataError, match="source=cifar10 .*source_path="):
    input_pipeline.load_split(config.data, "train")


@pytest.mark.skipif(not SHARED_ARCHIVE.exists(), reason="shared JPEG copy not beside the checkout")
def test_shared_jpeg_copy_has_cifar10_layout_and_decodes():
  counts = Counter()
  for split in ("test",):
    for name, data, cls in input_pipeline.iter_image_folder(SHARED_ARCHIVE, split):
      if counts[cls] < 2:
        assert input_pipeline._decode_image(data, name).shape == (32, 32, 3)
      counts[cls] += 1
  assert counts == {name: 1000 for name in input_pipeline.CLASS_NAMES}
  with tarfile.open(SHARED_ARCHIVE) as tf:
    train = Counter(m.name.split("/")[-2] for m in tf if m.isfile() and "/train/" in m.name)
  assert train == {name: 5000 for name in input_pipeline.CLASS_NAMES}


# ------------------------------------------------------------------------ augmentation

MEAN = np.array([0.49, 0.48, 0.45])
STD = np.array([0.25, 0.24, 0.26])


def only(**probabilities):
  aug = load_config("base").augment.copy_and_resolve_references()
  aug.hflip_p = aug.affine_p = aug.cutout_p = 0.0
  aug.update(probabilities)
  return aug


def test_train_transform_keeps_shape_and_uint8_and_changes_nothing_undrawn():
  transform = input_pipeline.train_transform(load_config("base").augment, MEAN, STD)
  image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  out = transform(image=image)["image"]
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8  # The step normalises.
  # With nothing random drawn, the image itself; resized only to another size.
  plain = input_pipeline.train_transform(only(), MEAN, STD)(image=image)["image"]
  np.testing.assert_array_equal(plain, image)
  out = input_pipeline.train_transform(only(image_size=24), MEAN, STD)(image=image)["image"]
  np.testing.assert_array_equal(out, A.Resize(24, 24)(image=image)["image"])


def test_normalize_batch_is_albumentations_normalize_on_host_and_in_jit():
  images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  normalise = A.Normalize(mean=tuple(MEAN), std=tuple(STD))
  expected = np.stack([normalise(image=im)["image"] for im in images])
  host = input_pipeline.normalize_batch(images, MEAN, STD)
  jitted = jax.jit(lambda x: input_pipeline.normalize_batch(x, MEAN, STD))(images)
  assert host.dtype == np.float32 and jitted.dtype == np.float32
  np.testing.assert_allclose(host, expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(jitted), expected, rtol=1e-6, atol=1e-6)


def test_coarse_dropout_is_one_16x16_hole_of_the_dataset_mean():
  transform = input_pipeline.train_transform(only(cutout_p=1.0), MEAN, STD)
  image = np.zeros((32, 32, 3), np.uint8)  # Black: the hole is the only non-black area.
  for seed in range(5):
    transform.set_random_seed(seed)
    out = transform(image=image)["image"]
    hole = out.max(axis=-1) > 0
    rows, cols = np.flatnonzero(hole.any(1)), np.flatnonzero(hole.any(0))
    assert hole.sum() == 16 * 16 and len(rows) == 16 and len(cols) == 16
    # Filled with the dataset mean in uint8 units (truncated to an integer): ~0 once
    # normalised.
    np.testing.assert_allclose(out[hole], np.broadcast_to(MEAN * 255, (256, 3)), atol=1)


def test_reference_coarse_dropout_arguments_are_refused_not_ignored():
  # Albumentations 2.x only warns about these names and runs its defaults; strict
  # Compose (as the pipeline builds it) turns that into an error.
  with pytest.raises(ValueError):
    A.Compose([A.CoarseDropout(max_holes=1, max_height=16, max_width=16, fill_value=0)],
              strict=True)


def test_horizontal_flip_mirrors():
  transform = input_pipeline.train_transform(only(hflip_p=1.0), MEAN, STD)
  image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  np.testing.assert_array_equal(transform(image=image)["image"], image[:, ::-1])


def test_image_affine_warps_to_the_pixels_of_albumentations_affine():
  aug = load_config("base").augment
  arguments = dict(translate_percent=(-aug.shift, aug.shift), scale=(1 - aug.scale, 1 + aug.scale),
                   rotate=(-aug.rotate, aug.rotate), border_mode=cv2.BORDER_CONSTANT,
                   fill=(124.9, 122.4, 114.8), p=1.0)
  reference, ours = A.Affine(**arguments), input_pipeline.ImageAffine(**arguments)
  images = np.random.default_rng(4).integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)
  reference.set_random_seed(7)
  ours.set_random_seed(7)
  moved = 0
  for image in images:
    expected = reference(image=image)["image"]
    np.testing.assert_array_equal(ours(image=image)["image"], expected)
    assert ours.params["rotate"] == reference.params["rotate"]
    moved += not np.array_equal(expected, image)
  assert moved == len(images)  # Each one warped: the comparison is not of copies.
  with pytest.raises(ValueError, match="images alone"):
    ours(image=images[0], mask=images[0, ..., 0])
  with pytest.raises(ValueError, match="fit_output"):
    input_pipeline.ImageAffine(**arguments, fit_output=True)
  grey = images[:20, ..., :1]  # One channel: kept, as A.Affine keeps it.
  reference.set_random_seed(8)
  ours.set_random_seed(8)
  for image in grey:
    np.testing.assert_array_equal(ours(image=image)["image"], reference(image=image)["image"])


def test_augment_images_takes_each_image_with_each_transform_independently():
  transform = input_pipeline.train_transform(only(hflip_p=0.5, affine_p=0.25), MEAN, STD)
  # Ramps, dark on the left, with noise: a warp keeps which side is bright, and no two
  # images are alike.
  rng = np.random.default_rng(5)
  ramp = np.linspace(30, 225, 32)[None, :, None]
  images = (ramp + rng.integers(-20, 21, (4000, 32, 32, 3))).astype(np.uint8)
  out = input_pipeline.augment_images(transform, images.copy(), seed=3)
  assert out.shape == images.shape and out.dtype == np.uint8
  np.testing.assert_array_equal(input_pipeline.augment_images(transform, images.copy(), seed=3),
                                out)
  assert not np.array_equal(input_pipeline.augment_images(transform, images.copy(), seed=4),
                            out)
  same = np.array([np.array_equal(o, i) for o, i in zip(out, images)])
  mirrored = np.array([np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images)])
  warped = ~same & ~mirrored
  flipped = out[:, :, :16].mean((1, 2, 3)) > out[:, :, 16:].mean((1, 2, 3))
  assert not (flipped & same).any() and flipped[mirrored].all()
  n = len(images)
  for rate, p in ((flipped.mean(), 0.5), (warped.mean(), 0.25),
                  ((flipped & warped).mean(), 0.125)):  # Independent: p(both) = 0.5 * 0.25.
    assert abs(rate - p) < 4 * np.sqrt(p * (1 - p) / n), (rate, p)
  with pytest.raises(TypeError, match="single transforms"):
    input_pipeline.augment_images(A.Compose([A.OneOf([A.HorizontalFlip()])]), images[:2], 0)


def test_test_images_are_normalised_with_training_statistics():
  train = np.random.default_rng(2).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
  mean, std = input_pipeline.channel_stats(train)
  out = input_pipeline.normalize_batch(train, mean, std)
  np.testing.assert_allclose(out.reshape(-1, 3).mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(out.reshape(-1, 3).std(0), 1, atol=1e-4)


# ------------------------------------------------------------------------ batching

def make_batches(seed, batch_size=8, workers=0, make_transform=None):
  images = np.random.default_rng(3).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
  labels = np.arange(40, dtype=np.int32) % 10
  aug = load_config("base").augment
  return input_pipeline.TrainBatches(
      images, labels, make_transform or (lambda: input_pipeline.train_transform(aug, MEAN, STD)),
      batch_size, seed, workers=workers)


def assert_same_batches(expected, actual):
  assert len(actual) == len(expected)
  for a, b in zip(expected, actual):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_batches_are_deterministic_per_seed_and_epoch():
  batches = make_batches(seed=0)
  first = list(batches.epoch(1))
  again = list(make_batches(seed=0).epoch(1))
  other_epoch = list(make_batches(seed=0).epoch(2))
  assert len(first) == 5
  assert_same_batches(first, again)
  assert not np.array_equal(first[0]["label"], other_epoch[0]["label"])
  assert first[0]["image"].dtype == np.uint8 and first[0]["image"].shape == (8, 32, 32, 3)
  # Epoch 1 is order(1) in batches, the 40 % 8 == 0 images each once.
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in first]),
                                batches.labels[batches.order(1)])
  assert sorted(batches.order(1)) == list(range(40))


def test_without_a_host_transform_batches_are_indices_in_training_order():
  """Data on the devices: each batch is the record indices to gather there, nothing else."""
  batches = make_batches(seed=0)
  on_device = input_pipeline.TrainBatches(batches.images, batches.labels, None, 8, seed=0,
                                          workers=2)
  first = list(on_device.epoch(1))
  assert [set(b) for b in first] == [{"index"}] * 5 and first[0]["index"].dtype == np.int32
  np.testing.assert_array_equal(np.concatenate([b["index"] for b in first]), batches.order(1))
  np.testing.assert_array_equal(list(on_device.epoch(1, start_step=3))[0]["index"],
                                first[3]["index"])
  preview = on_device.preview(4)  # Raw: the caller augments it as its devices would.
  np.testing.assert_array_equal(preview["image"], batches.images[batches.order(0, 4)])


def test_alternating_flip_mirrors_each_image_in_every_other_epoch():
  images = np.random.default_rng(3).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
  aug = load_config("base").augment
  aug.update(alternate_flip=True, affine_p=0.0, cutout_p=0.0)  # The flip alone.
  batches = input_pipeline.TrainBatches(
      images, np.arange(40) % 10, lambda: input_pipeline.train_transform(aug, MEAN, STD), 8,
      seed=0, alternate_flip=True)

  def mirrored(epoch):  # Record index -> was it mirrored in that epoch.
    seen = np.concatenate([b["image"] for b in batches.epoch(epoch)])
    flips = {}
    for image, i in zip(seen, batches.order(epoch)):
      flips[i] = np.array_equal(image, images[i][:, ::-1])
      assert flips[i] or np.array_equal(image, images[i])
    return np.array([flips[i] for i in range(40)])

  first, second, third = mirrored(1), mirrored(2), mirrored(3)
  assert 8 <= first.sum() <= 32  # A coin per image to start with,
  np.testing.assert_array_equal(second, ~first)  # then each the other way every epoch.
  np.testing.assert_array_equal(third, first)
  # Data on the devices: the batches carry the same flips for the step to apply.
  on_device = input_pipeline.TrainBatches(images, np.arange(40) % 10, None, 8, seed=0,
                                          alternate_flip=True)
  carried = np.concatenate([b["flip"] for b in on_device.epoch(2)])
  np.testing.assert_array_equal(carried, second[on_device.order(2)])


def test_mid_epoch_start_gives_the_remaining_batches():
  batches = make_batches(seed=4)
  full = list(batches.epoch(3))
  rest = list(batches.epoch(3, start_step=2))
  assert len(rest) == 3
  assert_same_batches(full[2:], rest)
  assert_same_batches(full[2:], list(make_batches(seed=4).epoch(3, start_step=2)))


def test_batches_do_not_depend_on_the_worker_count():
  """0 workers (a thread of this process), 1 and 2 worker processes: bit-identical
  batches, across an epoch boundary, and from a mid-epoch start (a resumed run)."""
  def two_epochs(workers, start_step=0):
    with make_batches(seed=5, workers=workers) as batches:
      return list(batches.epoch(1, start_step)) + list(batches.epoch(2))[:2]
  reference = two_epochs(0)
  assert len(reference) == 7
  assert_same_batches(reference, two_epochs(1))
  assert_same_batches(reference[2:], two_epochs(2, start_step=2))


class WorkerProbe(A.ImageOnlyTransform):
  """Stands in for the augmentations: each image it 'augments' reports the process that
  built it: pid, JAX backends started there, OpenCV threads, and whether JAX there is
  pinned to the CPU."""

  def __init__(self):
    super().__init__(p=1.0)

  def apply(self, img, **params):
    import cv2
    from jax._src import xla_bridge
    out = np.zeros(img.shape, np.float32)
    out.flat[:4] = [os.getpid(), len(xla_bridge._backends), cv2.getNumThreads(),
                    jax.config.jax_platforms == "cpu"]
    return out


def worker_probe():
  return A.Compose([WorkerProbe()])


def test_workers_never_start_a_jax_backend_and_run_opencv_on_one_thread(monkeypatch):
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)  # Set for the tests by conftest: the workers must set it.
  with make_batches(seed=0, workers=1, make_transform=worker_probe) as batches:
    batch = next(batches.epoch(1))
    assert "JAX_PLATFORMS" not in os.environ  # Only while the workers started.
  pids, backends, threads, cpu_only = batch["image"].reshape(8, -1)[:, :4].T
  assert set(pids) != {os.getpid()} and len(set(pids)) == 1
  assert set(backends) == {0} and set(threads) == {1} and set(cpu_only) == {1}


def test_eval_batches_pad_and_mask_the_last_batch():
  images = np.zeros((10, 32, 32, 3), np.float32)
  batches = list(input_pipeline.eval_batches(images, np.arange(10), 4))
  assert [b["mask"].sum() for b in batches] == [4, 4, 2]
  assert all(b["image"].shape[0] == 4 for b in batches)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_or_truncated_archive_is_a_clear_error(damage, tiny_archive, tmp_path):
  data = tiny_archive.read_bytes()
  broken = tmp_path / "broken.tar.gz"
  broken.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not an archive" * 100)
  config = tiny_config(broken, tmp_path / "tfds")
  with pytest.raises(input_pipeline.DataError, match="corrupt or truncated"):
    input_pipeline.load_split(config.data, "train")


def test_a_missing_class_folder_is_rejected(tmp_path):
  write_tiny_tree(tmp_path / "tree", {"train": 1, "test": 1})
  for image in (tmp_path / "tree" / "test" / "ship").iterdir():
    image.unlink()
  config = tiny_config(tmp_path / "tree", tmp_path / "tfds")
  with pytest.raises(input_pipeline.DataError, match="no test images of ship"):
    input_pipeline.load_split(config.data, "test")


def test_a_data_dir_prepared_from_another_source_is_not_reused(tiny_archive, tmp_path):
  input_pipeline.load_split(tiny_config(tiny_archive, tmp_path / "tfds").data, "test")
  write_tiny_tree(tmp_path / "other", {"train": 1, "test": 1})
  with pytest.raises(input_pipeline.DataError, match="was prepared from .*tiny-cifar.tar.gz"):
    input_pipeline.load_split(tiny_config(tmp_path / "other", tmp_path / "tfds").data, "test")


def tar_with_extra_member(tmp_path, add_member):
  """A valid tiny tar plus one hostile member added by `add_member(tarfile, tree)`."""
  tree = tmp_path / "tree"
  write_tiny_tree(tree, {"train": 1, "test": 1})
  path = tmp_path / "hostile.tar"
  with tarfile.open(path, "w") as tf:
    tf.add(tree, arcname="cifar")
    add_member(tf, tree)
  return path


def add_file(name):
  def add(tf, tree):  # TarInfo by hand: tf.add would strip a leading '/'.
    data = (tree / "train" / "cat" / "0000.png").read_bytes()
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))
  return add


def add_link(kind):
  def add(tf, tree):
    info = tarfile.TarInfo("cifar/train/cat/link.png")
    info.type, info.linkname = kind, "/etc/passwd"
    tf.addfile(info)
  return add


@pytest.mark.parametrize("add_member,what", [
    (add_file("cifar/../../evil/train/cat/x.png"), "a path outside the archive's folder"),
    (add_file("/tmp/evil/train/cat/x.png"), "a path outside the archive's folder"),
    (add_link(tarfile.SYMTYPE), "a link"),
    (add_link(tarfile.LNKTYPE), "a link"),
])
def test_archive_members_escaping_their_folder_are_refused(add_member, what, tmp_path):
  config = tiny_config(tar_with_extra_member(tmp_path, add_member), tmp_path / "tfds")
  with pytest.raises(input_pipeline.DataError, match=f"is {what}; refusing the archive"):
    input_pipeline.load_split(config.data, "train")
  assert not (tmp_path / "evil").exists() and not (tmp_path / "tfds" / "cifar10_image_folder"
                                                   / "1.0.0" / "dataset_info.json").exists()


def test_zip_symlink_member_is_refused(tmp_path):
  tree = tmp_path / "tree"
  write_tiny_tree(tree, {"train": 1, "test": 1})
  source = tmp_path / "tiny.zip"
  with zipfile.ZipFile(source, "w") as zf:
    for path in sorted(tree.rglob("*.png")):
      zf.write(path, "cifar/" + str(path.relative_to(tree)))
    link = zipfile.ZipInfo("cifar/train/cat/link.png")
    link.external_attr = (0o120777 << 16)  # S_IFLNK: how zip stores a symlink.
    zf.writestr(link, "/etc/passwd")
  with pytest.raises(input_pipeline.DataError, match="is a link; refusing the archive"):
    input_pipeline.load_split(tiny_config(source, tmp_path / "tfds").data, "train")


def replace_one_image(tmp_path, data: bytes):
  write_tiny_tree(tmp_path / "tree", {"train": 1, "test": 1})
  (tmp_path / "tree" / "train" / "cat" / "0000.png").write_bytes(data)
  return tiny_config(tmp_path / "tree", tmp_path / "tfds")


def encoded(image: Image.Image, fmt="PNG") -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=fmt)
  return buffer.getvalue()


@pytest.mark.parametrize("data,message", [
    (b"\x89PNG\r\n\x1a\n but not really", "cannot decode image .*cat/0000.png"),
    (encoded(Image.new("RGB", (64, 64))), "cat/0000.png is 64x64, expected 32x32"),
])
def test_undecodable_or_wrongly_sized_images_are_rejected(data, message, tmp_path):
  config = replace_one_image(tmp_path, data)
  with pytest.raises(input_pipeline.DataError, match=message):
    input_pipeline.load_split(config.data, "train")


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_images_in_other_colour_modes_are_converted_to_rgb(mode, tmp_path):
  grey = conftest.class_colour(input_pipeline.CLASS_NAMES.index("cat"))
  image = Image.new("RGB", (32, 32), (grey, grey, grey))
  image = image.convert(mode, **({"palette": Image.Palette.ADAPTIVE} if mode == "P" else {}))
  config = replace_one_image(tmp_path, encoded(image, "JPEG" if mode == "CMYK" else "PNG"))
  images, labels = input_pipeline.load_split(config.data, "train")
  cat = images[labels == input_pipeline.CLASS_NAMES.index("cat")][0]
  assert cat.shape == (32, 32, 3)
  np.testing.assert_allclose(cat.astype(int), grey, atol=2)


def augment_both_ways(aug_overrides, copies=400):
  """`copies` augmentations of one horizontal-gradient image (dark left, bright right,
  a different ramp per channel) by the Albumentations path and by the JAX path."""
  config = load_config("base")
  for key, value in aug_overrides.items():
    config.augment[key] = value
  ramp = np.linspace(20, 235, 32)
  image = np.stack([np.tile(ramp, (32, 1)), np.tile(ramp[::-1] * 0.5 + 60, (32, 1)),
                    np.tile(ramp[:, None], (1, 32))], -1).astype(np.uint8)
  images = np.repeat(image[None], copies, 0)
  mean, std = input_pipeline.channel_stats(images)
  transform = input_pipeline.train_transform(config.augment, mean, std)
  transform.set_random_seed(0)
  host = input_pipeline.normalize_batch(
      np.stack([transform(image=im)["image"] for im in images]), mean, std)
  device = np.asarray(jax.jit(lambda r, x: input_pipeline.device_augment(
      r, x, config.augment, mean, std))(jax.random.PRNGKey(0), images))
  return host, device


def filled_with_mean(batch):
  """Pixels equal to the dataset mean in every channel (normalised to 0, give or take
  Albumentations rounding the fill to uint8): holes and affine borders."""
  return np.all(np.abs(batch) < 0.03, axis=-1)


def test_device_augmentation_flip_and_cutout_rates_match_albumentations():
  host, device = augment_both_ways({"hflip_p": 0.5, "affine_p": 0.0, "cutout_p": 0.5})
  for batch in (host, device):
    flipped = batch[:, :, :16, 0].mean((1, 2)) > batch[:, :, 16:, 0].mean((1, 2))
    assert flipped.mean() == pytest.approx(0.5, abs=0.08)
    holes = filled_with_mean(batch).sum((1, 2))
    assert set(np.unique(holes)) <= {0, 256}  # None, or exactly one 16x16 hole.
    assert (holes == 256).mean() == pytest.approx(0.5, abs=0.08)
  # Holes land anywhere the whole hole fits, alike: compare the per-pixel hole frequency.
  host_map, device_map = (filled_with_mean(b).mean(0) for b in (host, device))
  assert np.abs(host_map - device_map).mean() < 0.05


def test_device_affine_matches_albumentations_statistics():
  host, device = augment_both_ways({"hflip_p": 0.0, "affine_p": 1.0, "cutout_p": 0.0,
                                    "rotate": 15.0, "shift": 0.05, "scale": 0.05})
  assert host.shape == device.shape == (400, 32, 32, 3) and device.dtype == np.float32
  # Per-pixel mean and spread of the warped images agree closely (mean |difference|, in
  # units of the dataset std: 0.0075 and 0.0052 with 1,000 copies, 0.0067 and 0.0075 with
  # these 400), and the filled border covers the same share (4.04% and 4.05%). Before the
  # device warp drew Albumentations' whole-pixel shifts and per-axis scales: 0.016, 0.029,
  # and 5.0% against 4.0%.
  assert np.abs(device.mean(0) - host.mean(0)).mean() < 0.015
  assert np.abs(device.std(0) - host.std(0)).mean() < 0.015
  assert filled_with_mean(device).mean() == pytest.approx(filled_with_mean(host).mean(), abs=0.004)
  assert filled_with_mean(device).mean() > 0.01  # The warp really moved the image.


def test_device_affine_shifts_by_whole_pixels_as_albumentations_does():
  """Albumentations' Affine shifts by int(fraction * size) pixels, truncated toward 0: at
  shift 0.05 on 32 px by -1, 0 or 1 pixel an axis, 0 with p 0.625. The device warp draws
  the same, not sub-pixel shifts (which blur every shifted image)."""
  aug = {"hflip_p": 0.0, "cutout_p": 0.0, "rotate": 0.0, "shift": 0.05, "scale": 0.0}
  host, device = augment_both_ways({**aug, "affine_p": 1.0})
  original = augment_both_ways({**aug, "affine_p": 0.0}, copies=1)[0][0]

  def shifted(dy, dx):  # The original moved by (dy, dx); the uncovered edge the mean (0).
    out = np.zeros_like(original)
    out[max(dy, 0):32 + min(dy, 0), max(dx, 0):32 + min(dx, 0)] = \
        original[max(-dy, 0):32 + min(-dy, 0), max(-dx, 0):32 + min(-dx, 0)]
    return out

  shifts = {(dy, dx): shifted(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
  for batch in (host, device):
    found = [next((k for k, image in shifts.items() if np.abs(warped - image).max() < 0.05),
                  None) for warped in batch]
    assert None not in found  # Every warp is a whole-pixel shift of at most 1.
    assert np.mean([k == (0, 0) for k in found]) == pytest.approx(0.625 ** 2, abs=0.08)
    assert np.mean([k[0] == 0 for k in found]) == pytest.approx(0.625, abs=0.08)


def test_a_missing_split_is_rejected(tmp_path):
  write_tiny_tree(tmp_path / "tree", {"train": 1})
  config = tiny_config(tmp_path / "tree", tmp_path / "tfds")
  with pytest.raises(input_pipeline.DataError, match="has no images under test/<class>/"):
    input_pipeline.load_split(config.data, "test")
