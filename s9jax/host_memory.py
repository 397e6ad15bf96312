"""glibc malloc settings that let XLA:CPU reuse its buffers from step to step.

Why: XLA:CPU allocates a step's temporaries as one block (153 MB for fast.py's train step
at batch 128) with malloc, on one of its worker threads. glibc serves a block that big on
a worker thread with a fresh mmap and unmaps it on free, so every step the kernel
zero-fills ~37,000 new 4 KiB pages. On the 2-core dev machine that was ~30 ms of a
~115 ms step: fast.py's network trained at ~1,100 images/s, ~1,550 with these settings
(~800 page faults a step).

The settings: one malloc arena (worker threads allocate from the main heap), no mmap
(big blocks come from that heap too) and no trimming (freed blocks stay mapped for the
next step; with a 2 GB threshold the seed network's step still took ~170,000 faults a
step, at ~150 images/s against ~255 without trimming). They apply to threads that have
not allocated yet, so call `reuse_freed_memory()` before JAX starts its CPU client (before
the first computation); train.py and eval.py do it first thing. The cost: freed memory
goes back to the heap, not to the OS, so the process keeps its peak size.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))  # -1: never trim.


def reuse_freed_memory() -> bool:
  """Applies SETTINGS with glibc's mallopt; True if it did. A no-op (False) off glibc
  (macOS, musl) or with S9JAX_MALLOC=system in the environment."""
  if os.environ.get("S9JAX_MALLOC", "") == "system" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):
    return False
  return all([mallopt(option, value) == 1 for option, value in SETTINGS])
