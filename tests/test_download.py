"""The default source: the official CIFAR-10 binary archive, downloaded, verified, prepared
and read back. Nothing here leaves the machine: the archive is a tiny one in the official
layout, built here, and served by an HTTP server on 127.0.0.1 that the tests start."""

import contextlib
import hashlib
import http.server
import io
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading

import numpy as np
import pytest
from absl import flags

from s9jax import input_pipeline, train
from tests.conftest import ROOT, load_config

RECORDS = {"data_batch_1.bin": 4, "data_batch_2.bin": 3, "data_batch_3.bin": 3,
           "data_batch_4.bin": 3, "data_batch_5.bin": 3, "test_batch.bin": 4}
NAME = "cifar-10-binary.tar.gz"
FLAT = (10, 100, 200)  # One image is flat planes R=10, G=100, B=200: any plane mix-up shows.


def make_records(count: int, rng, first_flat=False):
  images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
  if first_flat:
    images[0] = FLAT
  labels = rng.integers(0, 10, count).astype(np.uint8)
  # The official record: the label byte, then the R, G and B planes, each row by row.
  data = b"".join(bytes([label]) + image.transpose(2, 0, 1).tobytes()
                  for image, label in zip(images, labels))
  return images, labels, data


def tar_gz(members: dict) -> bytes:
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
    folder = tarfile.TarInfo("cifar-10-batches-bin")
    folder.type = tarfile.DIRTYPE
    tf.addfile(folder)
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tf.addfile(info, io.BytesIO(data))
  return buffer.getvalue()


def official_members(rng):
  """The archive's members (name -> bytes) and what the records hold, per split."""
  members = {"cifar-10-batches-bin/batches.meta.txt":
             "\n".join(input_pipeline.CLASS_NAMES).encode() + b"\n\n"}
  expected = {"train": ([], []), "test": ([], [])}
  for name, count in RECORDS.items():
    images, labels, data = make_records(count, rng, first_flat=name == "test_batch.bin")
    members[f"cifar-10-batches-bin/{name}"] = data
    split = "test" if name == "test_batch.bin" else "train"
    expected[split][0].extend(images)
    expected[split][1].extend(labels)
  return members, expected


@pytest.fixture(scope="module")
def official():
  """(archive bytes, its MD5, {split: (images, labels)}) for a tiny official archive."""
  members, expected = official_members(np.random.default_rng(0))
  data = tar_gz(members)
  return data, hashlib.md5(data).hexdigest(), expected


class Handler(http.server.BaseHTTPRequestHandler):
  """Serves the server's `body` at /cifar-10-binary.tar.gz, as `mode` says."""

  def do_GET(self):
    server = self.server
    server.requests.append(self.path)
    if server.mode == "silent":  # Accept, then say nothing until the test is over.
      server.release.wait(10)
      return
    if self.path != "/" + NAME:
      self.send_error(404)
      return
    self.send_response(200)
    self.send_header("Content-Type", "application/gzip")
    self.send_header("Content-Length", str(len(server.body)))
    self.end_headers()
    # "truncated": the promised length, half the bytes, then the connection closes.
    self.wfile.write(server.body[:len(server.body) // 2] if server.mode == "truncated"
                     else server.body)

  def log_message(self, *args):
    pass


@pytest.fixture
def serve(monkeypatch):
  """serve(body, mode) -> the server (its `url`, and `requests`: the paths asked for)."""
  for proxy in PROXY_VARIABLES:
    monkeypatch.delenv(proxy, raising=False)  # 127.0.0.1 directly, never through a proxy.
  servers = []

  def start(body: bytes, mode: str = "ok"):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.body, server.mode, server.requests = body, mode, []
    server.release = threading.Event()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/{NAME}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    servers.append(server)
    return server

  yield start
  for server in servers:
    server.release.set()
    server.shutdown()
    server.server_close()


PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                   "ALL_PROXY")


def refused_url() -> str:
  """A 127.0.0.1 port that was just free: connecting to it is refused."""
  with contextlib.closing(socket.socket()) as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return f"http://127.0.0.1:{port}/{NAME}"


def data_config(data_dir, url, md5, source_path=""):
  config = load_config("base", "smoke")
  config.data.source_path = str(source_path)
  config.data.url = url
  config.data.md5 = md5
  config.data.data_dir = str(data_dir)
  config.data.train_limit = 0
  config.data.test_limit = 0
  return config.data


def assert_same_records(loaded, expected):
  images, labels = loaded
  want_images, want_labels = expected
  assert images.shape == (len(want_images), 32, 32, 3) and images.dtype == np.uint8
  # TFDS shuffles records when it prepares them: compare (pixels, label) pairs as sets.
  got = sorted((im.tobytes(), int(l)) for im, l in zip(images, labels))
  want = sorted((im.tobytes(), int(l)) for im, l in zip(want_images, want_labels))
  assert got == want


def files_under(folder):
  return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_download_verify_prepare_and_read_back_the_exact_records(official, serve, tmp_path):
  body, md5, expected = official
  server = serve(body)
  config = data_config(tmp_path / "tfds", server.url, md5)
  assert_same_records(input_pipeline.load_split(config, "train"), expected["train"])
  test_images, test_labels = input_pipeline.load_split(config, "test")
  assert_same_records((test_images, test_labels), expected["test"])
  flat = [im for im in test_images if (im == FLAT).all()]
  assert len(flat) == 1  # R=10, G=100, B=200 came back as channels 0, 1, 2.
  assert server.requests == ["/" + NAME]
  assert (tmp_path / "tfds" / "downloads" / NAME).read_bytes() == body
  assert not list((tmp_path / "tfds").rglob("*.part"))

  # Later runs read the prepared copy: neither the server nor the download is needed.
  (tmp_path / "tfds" / "downloads" / NAME).rename(tmp_path / "kept.tar.gz")
  assert_same_records(input_pipeline.load_split(config, "train"), expected["train"])
  assert server.requests == ["/" + NAME]

  # No prepared copy but a verified download: prepared from it, nothing downloaded again.
  shutil.rmtree(tmp_path / "tfds" / "cifar10_binary")
  (tmp_path / "kept.tar.gz").rename(tmp_path / "tfds" / "downloads" / NAME)
  assert_same_records(input_pipeline.load_split(config, "test"), expected["test"])
  assert server.requests == ["/" + NAME]


def test_a_wrong_or_partial_earlier_download_is_fetched_again(official, serve, tmp_path):
  body, md5, expected = official
  server = serve(body)
  downloads = tmp_path / "tfds" / "downloads"
  downloads.mkdir(parents=True)
  (downloads / NAME).write_bytes(body[:100])  # Not what the MD5 says.
  (downloads / (NAME + ".part")).write_bytes(b"left by a killed run")
  config = data_config(tmp_path / "tfds", server.url, md5)
  assert_same_records(input_pipeline.load_split(config, "test"), expected["test"])
  assert len(server.requests) == 1 and (downloads / NAME).read_bytes() == body
  assert files_under(downloads) == [NAME]


@pytest.mark.parametrize("kind", ["archive", "directory"])
def test_a_local_binary_archive_needs_no_server(kind, official, tmp_path):
  body, _, expected = official
  source = tmp_path / "my-copy.tgz"  # Told apart from image folders by content, not name.
  source.write_bytes(body)
  if kind == "directory":
    with tarfile.open(source) as tf:
      tf.extractall(tmp_path / "unpacked", filter="data")
    source = tmp_path / "unpacked"
  # md5 unused: only a download is checked against it. The URL refuses: no download.
  config = data_config(tmp_path / "tfds", refused_url(), "0" * 32, source)
  assert_same_records(input_pipeline.load_split(config, "train"), expected["train"])
  assert_same_records(input_pipeline.load_split(config, "test"), expected["test"])
  assert files_under(tmp_path / "tfds" / "downloads") == []


@pytest.mark.parametrize("damage,message", [
    ({"cifar-10-batches-bin/data_batch_3.bin": b"\0" * (input_pipeline.RECORD_BYTES + 1)},
     "data_batch_3.bin is 3,074 bytes, not a whole number of 3,073-byte records"),
    ({"cifar-10-batches-bin/test_batch.bin": b"\x0a" + bytes(3072)},
     "record 0 of cifar-10-batches-bin/test_batch.bin has label 10, not 0..9"),
    ({"cifar-10-batches-bin/data_batch_5.bin": None},
     "has no cifar-10-batches-bin/data_batch_5.bin: it is not the complete"),
    ({"cifar-10-batches-bin/../../evil/data_batch_1.bin": bytes(3073)},
     "is a path outside the archive's folder; refusing the archive"),
])
def test_a_damaged_binary_archive_is_refused_and_nothing_is_prepared(damage, message, tmp_path):
  members, _ = official_members(np.random.default_rng(1))
  members.update(damage)
  members = {name: data for name, data in members.items() if data is not None}
  source = tmp_path / "damaged.tar.gz"
  source.write_bytes(tar_gz(members))
  config = data_config(tmp_path / "tfds", refused_url(), "0" * 32, source)
  with pytest.raises(input_pipeline.DataError, match=message):
    input_pipeline.load_split(config, "train")
  assert not (tmp_path / "tfds" / "cifar10_binary" / "1.0.0").exists()
  assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("mode,message", [
    ("silent", "the server sent no answer within 0.5 s"),
    ("missing", "the server answered HTTP 404 Not Found"),
])
def test_a_silent_server_or_a_missing_file_is_a_one_line_error(mode, message, official, serve,
                                                              tmp_path, monkeypatch):
  body, md5, _ = official
  server = serve(body, mode)
  monkeypatch.setattr(input_pipeline, "DOWNLOAD_TIMEOUT_S", 0.5)
  url = server.url + ("x" if mode == "missing" else "")
  config = data_config(tmp_path / "tfds", url, md5)
  with pytest.raises(input_pipeline.DataError, match=message) as error:
    input_pipeline.prepare(config)
  assert "\n" not in str(error.value)
  assert files_under(tmp_path / "tfds") == []


# ------------------------------------------------------------------------ the CLI

@pytest.fixture
def cli(monkeypatch, capsys):
  """cli(*flags) -> (exit status, captured output): `python -m s9jax.train` in-process
  (a fresh interpreter would cost ~10 s of imports per run)."""
  if "config" not in flags.FLAGS:
    train.define_flags()
  # main() tunes glibc malloc for the whole process: not for the test runner's process.
  monkeypatch.setattr(train.host_memory, "reuse_freed_memory", lambda: False)

  def run(*args):
    argv = ["s9jax.train", *map(str, args)]
    monkeypatch.setattr(sys, "argv", argv)  # Where ml_collections finds --config.key flags.
    with pytest.raises(SystemExit) as exit:
      train.main(train.parse_flags(argv))
    return exit.value.code, capsys.readouterr()

  yield run
  for name in [name for name in flags.FLAGS if name.startswith("config.")]:
    delattr(flags.FLAGS, name)  # Defined by that parse, for that config only.
  flags.FLAGS.unparse_flags()


@pytest.mark.parametrize("failure", ["wrong checksum", "truncated transfer", "refused"])
def test_a_failed_download_is_one_error_line_exit_2_and_nothing_kept(failure, official, serve,
                                                                     cli, tmp_path):
  body, md5, _ = official
  url = refused_url() if failure == "refused" else serve(
      body, "truncated" if failure == "truncated transfer" else "ok").url
  if failure == "wrong checksum":
    md5 = hashlib.md5(b"another file").hexdigest()
  data_dir = tmp_path / "tfds"
  status, out = cli("--config", f"{ROOT}/configs/base.py:smoke", "--workdir", tmp_path / "work",
                    f"--config.data.url={url}", f"--config.data.md5={md5}",
                    f"--config.data.data_dir={data_dir}")
  what = {
      "wrong checksum": (f"the file's MD5 is {hashlib.md5(body).hexdigest()}, not {md5} "
                         "(corrupt, or not the expected file)"),
      "truncated transfer": f"the transfer stopped after {len(body) // 2:,} of {len(body):,} bytes",
      "refused": "cannot connect (Connection refused)",
  }[failure]
  assert status == 2
  errors = [line for line in out.err.splitlines() if "error:" in line]
  assert errors == [download_error(url, what)]
  assert out.err.rstrip("\n").splitlines()[-1] == errors[0]  # The last word, no traceback.
  assert "Traceback" not in out.err
  assert files_under(data_dir) == []  # No .part file, no download, nothing prepared.


def download_error(url: str, what: str) -> str:
  return (f"error: could not download CIFAR-10 from {url}: {what}; nothing was kept. Rerun to "
          f"retry, or fetch that file by hand and pass --config.data.source_path=PATH/TO/{NAME} "
          "(an image-folder archive works too)")


def test_a_fresh_interpreter_prints_only_that_line(tmp_path):
  """As a user runs it (the one subprocess here): stderr holds the error line and nothing
  else, no warning or traceback from the libraries loaded on the way."""
  url = refused_url()
  env = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}
  result = subprocess.run(
      [sys.executable, "-m", "s9jax.train", "--config", "configs/base.py:smoke",
       "--workdir", str(tmp_path / "work"), f"--config.data.url={url}",
       f"--config.data.data_dir={tmp_path / 'tfds'}"],
      cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.splitlines() == [
      download_error(url, "cannot connect (Connection refused)")]
  assert files_under(tmp_path / "tfds") == []
