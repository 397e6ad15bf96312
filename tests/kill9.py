"""`python -m s9jax.train`, killed with SIGKILL (kill -9) at a chosen point: the fault
drill behind the kill -9 tests, also runnable on real data.

    python -m tests.kill9 POINT N -- <the same flags as python -m s9jax.train>

POINT, each at its N-th occurrence:
  step        before the N-th train step (mid-epoch);
  checkpoint  inside the N-th checkpoint save, after its files are written into Orbax's
              temporary folder and before the rename that commits it (mid-write);
  metrics     after the N-th checkpoint is committed, before metrics.jsonl is rewritten;
  eval        before the N-th end-of-epoch evaluation.

The process dies with no cleanup at all, as under kill -9 or a power cut. Rerunning the
plain `python -m s9jax.train` command with the same flags must then finish the run with
the same metrics as a run never interrupted.
"""

import functools
import os
import signal
import sys

from absl import app
from orbax.checkpoint._src.path import atomicity

from s9jax import train

POINTS = ("step", "checkpoint", "metrics", "eval")


def die():
  os.kill(os.getpid(), signal.SIGKILL)


def kill_on_call(fn, n: int, before=True):
  calls = []

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    calls.append(1)
    if before and len(calls) == n:
      die()
    result = fn(*args, **kwargs)
    if not before and len(calls) == n:
      die()
    return result
  return wrapped


def arm(point: str, n: int):
  if point == "step":
    train.train_step_on_host_batch = kill_on_call(train.train_step_on_host_batch, n)
  elif point == "eval":
    train.evaluate = kill_on_call(train.evaluate, n)
  elif point == "metrics":
    train.save_checkpoint = kill_on_call(train.save_checkpoint, n, before=False)
  elif point == "checkpoint":
    saves = []
    real_save, real_finalize = train.save_checkpoint, atomicity.AtomicRenameTemporaryPath.finalize

    def counting_save(*args, **kwargs):
      saves.append(1)
      return real_save(*args, **kwargs)

    async def finalize(self):  # Orbax's commit: write the success marker, then rename.
      if len(saves) == n:
        die()
      return await real_finalize(self)

    train.save_checkpoint = counting_save
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
  else:
    raise SystemExit(f"POINT must be one of {POINTS}, got {point!r}")


if __name__ == "__main__":
  if len(sys.argv) < 4 or sys.argv[3] != "--":
    raise SystemExit(__doc__)
  arm(sys.argv[1], int(sys.argv[2]))
  train.define_flags()
  app.run(train.main, argv=[sys.argv[0], *sys.argv[4:]], flags_parser=train.parse_flags)
