"""Multi-host, proven on one machine: two JAX processes on 127.0.0.1 (CPU collectives
over gloo), each with one CPU device, train as one process with two devices does with
the same global batch; checkpoints move between one and two processes both ways; a
finished run resumed on two processes finishes. Nothing listens or connects outside 127.0.0.1: each launch
watches its processes' sockets.

Three launches (each process costs ~10 s of imports and compiles on a 2-core machine),
shared by the tests through module fixtures, in this order:
  1. two processes train `two` (2 epochs) on a data_dir nobody prepared yet;
  2. one process (two devices) trains `one` the same way, evaluates `two`'s final
     checkpoint on one device, and copies `one` to `one_then_two`;
  3. two processes resume the finished `two` (the hang), then train `one_then_two` on
     to a third epoch.
"""

import ipaddress
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from absl import flags

from s9jax import train
from tests.conftest import ROOT

LAUNCH_TIMEOUT = 300  # Seconds per launch: a hang fails the test, never the suite.

PRELUDE = """
import json, shutil, sys
port, num_processes, process_id = map(int, sys.argv[1:4])
archive, base = sys.argv[4:6]
import jax
# One device per process; a lone process holds the two that two processes hold together.
jax.config.update("jax_num_cpu_devices", 1 if num_processes > 1 else 2)
if num_processes > 1:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  address = f"127.0.0.1:{port}"
  # Bound to loopback: by default the coordinator listens on every interface ([::]).
  jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                             process_id=process_id, coordinator_bind_address=address,
                             initialization_timeout=120)
  # gloo listens on the address the hostname resolves to; JAX has no public option for
  # it, so the CPU client is built with gloo on loopback (before any backend starts).
  import functools
  from jax._src import distributed, xla_bridge
  from jax._src.lib import _jax
  xla_bridge.register_backend_factory("cpu", functools.partial(
      xla_bridge.make_cpu_client, _jax.make_gloo_tcp_collectives(
          distributed.global_state.client, hostname="127.0.0.1")),
      priority=0, fail_quietly=False)
from s9jax import train
from s9jax import eval as evaluation
from tests.conftest import tiny_config
assert (jax.process_count(), jax.process_index()) == (num_processes, process_id)
assert jax.device_count() == 2

def config(**overrides):
  # Augmented on device: the draws are global, so any host split gets the same ones
  # (host-side Albumentations seeds each host's share apart, by design). One conv
  # implementation for both process counts ('auto' picks the C++ kernels on one device).
  values = dict(batch_size=10, eval_batch_size=8, num_epochs=2, plots=True,
                **{"data.validation_size": 10, "augment.backend": "jax",
                   "model.conv_impl": "fast"})
  values.update(overrides)
  return tiny_config(archive, base + "/tfds", **values)

def stable(records):
  return [{k: v for k, v in r.items() if not k.endswith(("_seconds", "_per_second"))}
          for r in records]
"""


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _address(text: str) -> str:
  """'0100007F:1F90' (/proc/net/tcp, little-endian words) -> '127.0.0.1'."""
  raw = bytes.fromhex(text.split(":")[0])
  raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
  ip = ipaddress.ip_address(raw)
  return str(getattr(ip, "ipv4_mapped", None) or ip)


def tcp_sockets(pid: int) -> set[tuple[str, str, str]]:
  """(local, remote, state) of the TCP sockets process `pid` holds, from /proc."""
  try:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
      try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
      except OSError:
        continue
      if target.startswith("socket:["):
        inodes.add(target[8:-1])
    found = set()
    for table in ("tcp", "tcp6"):
      with open(f"/proc/{pid}/net/{table}") as f:
        for line in f.read().splitlines()[1:]:
          fields = line.split()
          if fields[9] in inodes:
            found.add((_address(fields[1]), _address(fields[2]),
                       "LISTEN" if fields[3] == "0A" else fields[3]))
    return found
  except OSError:  # Exited meanwhile, or no /proc here.
    return set()


def outside_loopback(sockets) -> list:
  def loopback(address, remote):
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (remote and ip.is_unspecified)  # A listener's remote is 0.0.0.0.
  return sorted(s for s in sockets if not (loopback(s[0], False) and loopback(s[1], True)))


def launch(script: str, num_processes: int, tmp_path, *args) -> list[dict]:
  """Runs `script` (after PRELUDE) in `num_processes` processes joined on 127.0.0.1;
  returns each one's last stdout line as JSON. Fails, killing every process, when one
  fails or the launch outlasts LAUNCH_TIMEOUT."""
  name = f"launch{len(list(tmp_path.glob('launch*.py')))}"
  path = tmp_path / f"{name}.py"
  path.write_text(PRELUDE + textwrap.dedent(script))
  port = free_port()
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # One device per process, whatever the caller forces.
  procs, logs = [], []
  for i in range(num_processes):
    out, err = (open(tmp_path / f"{name}.{i}.{s}", "w+") for s in ("out", "err"))
    logs.append((out, err))
    procs.append(subprocess.Popen(
        [sys.executable, str(path), str(port), str(num_processes), str(i), *map(str, args)],
        cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True))
  started, sockets, failed_at = time.monotonic(), set(), None
  try:
    while any(p.poll() is None for p in procs):
      for p in procs:
        sockets |= tcp_sockets(p.pid)
      if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
        failed_at = time.monotonic()  # The others wait on it: give them a moment to say so.
      if time.monotonic() - started > LAUNCH_TIMEOUT or (
          failed_at and time.monotonic() - failed_at > 10):
        break
      time.sleep(0.3)
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  report = []
  for i, (p, (out, err)) in enumerate(zip(procs, logs)):
    out.seek(0), err.seek(0)
    report.append((p.returncode, out.read(), err.read()))
    out.close(), err.close()
  seconds = time.monotonic() - started
  details = "\n".join(f"--- process {i}: exit {rc}\n{o[-2000:]}\n{e[-3000:]}"
                      for i, (rc, o, e) in enumerate(report))
  assert seconds <= LAUNCH_TIMEOUT, f"killed after {seconds:.0f} s (a hang?)\n{details}"
  assert all(rc == 0 for rc, _, _ in report), details
  assert not outside_loopback(sockets), outside_loopback(sockets)
  if num_processes > 1:  # The watch saw the coordinator and gloo at work.
    assert any(state == "LISTEN" for _, _, state in sockets), sockets
  print(f"{name}: {num_processes} process(es), {seconds:.1f} s, sockets {sorted(sockets)}")
  return [json.loads(o.strip().splitlines()[-1]) for _, o, _ in report]


# ------------------------------------------------------------------ the three launches

@pytest.fixture(scope="module")
def base(tmp_path_factory):
  return tmp_path_factory.mktemp("multihost")


@pytest.fixture(scope="module")
def two_trained(tiny_archive, base):
  """Launch 1: two processes train `two` from scratch; the data_dir is prepared here, by
  the two at once (the chief first)."""
  outs = launch("""
    records = train.train_and_evaluate(config(), base + "/two")
    print(json.dumps({"records": stable(records)}))
  """, 2, base, tiny_archive, base)
  return outs


@pytest.fixture(scope="module")
def one_trained(two_trained, tiny_archive, base):
  """Launch 2: one process trains `one` alike on two devices, and restores `two`'s final
  checkpoint onto one."""
  (out,) = launch("""
    records = train.train_and_evaluate(config(), base + "/one")
    restored = evaluation.evaluate_checkpoint(config(num_devices=1), base + "/two", "final")
    shutil.copytree(base + "/one", base + "/one_then_two")
    print(json.dumps({"records": stable(records), "restored_two": {
        k: restored[k] for k in ("step", "epoch", "test_loss", "test_accuracy",
                                 "recorded_test_accuracy")}}))
  """, 1, base, tiny_archive, base)
  return out


@pytest.fixture(scope="module")
def two_resumed(one_trained, tiny_archive, base):
  """Launch 3: two processes resume the finished `two` (same num_epochs, plots on), then
  train the one-process `one_then_two` on to epoch 3."""
  (base / "two" / "misclassified.png").unlink()  # Drawn again at the end of the resume.
  started = time.monotonic()
  outs = launch("""
    finished = train.train_and_evaluate(config(), base + "/two")
    resumed = train.train_and_evaluate(config(num_epochs=3), base + "/one_then_two")
    print(json.dumps({"finished": stable(finished), "resumed": stable(resumed)}))
  """, 2, base, tiny_archive, base)
  return outs, time.monotonic() - started


# ------------------------------------------------------------------ tests

def test_two_processes_train_as_one_with_the_same_global_batch(two_trained, one_trained):
  one = one_trained["records"]
  first, second = (out["records"] for out in two_trained)
  assert first == second  # Every process returns the same, global, records.
  assert [r["epoch"] for r in first] == [1, 2]
  # The same two devices, in one process or in two: the same sums in the same order
  # (measured: identical). Against ONE device the float32 summation order differs, and
  # this run's high learning rate on flat images amplifies it: 2e-6 in epoch 1's train
  # loss, 1% in epoch 2's (measured alike with one process on 1 and 2 devices), which
  # tests/test_sharding.py covers.
  for a, b in zip(one, first):
    assert b["step"] == a["step"]
    assert b["learning_rate"] == pytest.approx(a["learning_rate"], rel=1e-6)
    for key in ("train_loss", "val_loss"):
      assert b[key] == pytest.approx(a[key], rel=1e-5), key
    assert (b["train_accuracy"], b["val_accuracy"]) == (a["train_accuracy"], a["val_accuracy"])
  assert first[-1]["test_loss"] == pytest.approx(one[-1]["test_loss"], rel=1e-5)
  assert first[-1]["test_accuracy"] == one[-1]["test_accuracy"]


def test_checkpoints_move_between_one_and_two_processes(two_trained, one_trained, two_resumed,
                                                        base):
  two = two_trained[0]["records"]
  restored = one_trained["restored_two"]  # `two`'s checkpoint, evaluated by one process.
  assert (restored["epoch"], restored["step"]) == (2, two[-1]["step"])
  assert restored["test_accuracy"] == restored["recorded_test_accuracy"] == two[-1]["test_accuracy"]
  assert restored["test_loss"] == pytest.approx(two[-1]["test_loss"], rel=1e-4)
  # One process's checkpoint, trained on by two: epochs 1-2 kept, epoch 3 added.
  one = one_trained["records"]
  for out in two_resumed[0]:
    resumed = out["resumed"]
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    assert resumed[:2] == one
    assert resumed[2]["step"] == 3 * one[0]["step"]
    assert "test_accuracy" in resumed[2]
  assert [r["epoch"] for r in train.read_metrics(base / "one_then_two")] == [1, 2, 3]


def test_a_finished_run_resumed_on_two_processes_finishes(two_trained, two_resumed, base):
  outs, seconds = two_resumed
  for out in outs:  # Nothing trained: the records as written, from both processes.
    assert out["finished"] == two_trained[0]["records"]
  assert (base / "two" / "misclassified.png").exists()  # The end-of-run evaluation ran.
  assert seconds < LAUNCH_TIMEOUT


# ------------------------------------------------------------------ the CLI's flags

@pytest.fixture
def cli(monkeypatch):
  """main(argv) in-process, with jax.distributed.initialize, config updates and training
  recorded instead of run."""
  if "config" not in flags.FLAGS:
    train.define_flags()
  calls = []
  monkeypatch.setattr(train.host_memory, "reuse_freed_memory", lambda: False)
  monkeypatch.setattr(train.compilation_cache, "enable", lambda flag_value: None)
  monkeypatch.setattr(train.jax.distributed, "initialize",
                      lambda **kwargs: calls.append(("initialize", kwargs)))
  monkeypatch.setattr(train.jax.config, "update", lambda *a: calls.append(("update", a)))
  monkeypatch.setattr(train, "train_and_evaluate", lambda config, workdir: [])

  def run(*args):
    calls.clear()
    argv = ["s9jax.train", "--config", f"{ROOT}/configs/base.py:smoke", "--workdir", "w",
            *args]
    monkeypatch.setattr(sys, "argv", argv)  # Where ml_collections finds --config.key flags.
    try:
      train.main(train.parse_flags(argv))
    finally:
      for name in [name for name in flags.FLAGS if name.startswith("config.")]:
        delattr(flags.FLAGS, name)  # Defined by that parse, for that config only.
      flags.FLAGS.unparse_flags()
    return list(calls)

  return run


@pytest.mark.skipif(train.jax.config.jax_platforms != "cpu", reason="JAX_PLATFORMS=cpu only")
def test_distributed_flags_reach_jax_distributed_initialize(cli):
  assert cli() == []
  assert cli("--distributed") == [("initialize", {})]  # Detected: Cloud TPU and the like.
  assert cli("--distributed", "--coordinator_address=127.0.0.1:4321", "--num_processes=2",
             "--process_id=1") == [
      ("update", ("jax_cpu_collectives_implementation", "gloo")),
      ("initialize", {"coordinator_address": "127.0.0.1:4321", "num_processes": 2,
                      "process_id": 1, "coordinator_bind_address": "127.0.0.1:4321"})]
  # Another machine's coordinator: bound as JAX binds it by default.
  assert cli("--distributed", "--coordinator_address=10.0.0.2:4321", "--num_processes=2",
             "--process_id=0")[-1] == ("initialize", {
                 "coordinator_address": "10.0.0.2:4321", "num_processes": 2, "process_id": 0})
  with pytest.raises(train.app.UsageError, match="need --distributed"):
    cli("--num_processes=2")
