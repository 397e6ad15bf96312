"""JAX's persistent compilation cache for the command-line tools, on by default.

Why: every run compiles the same programs again: the initialiser, the train step at each
image size, the evaluation. For fast.py on the 2-core machine those four took 9-12 s of
each 7-8 minute run (the initialiser alone ~4 s: XLA compiles a random-number kernel per
parameter). JAX can keep compiled programs on disk, keyed by the program, the compiler
options, the jaxlib version and the device, so a later run of a config with the same
shapes (another seed, a resume, `s9jax.eval`) loads them in well under a second. A new
kernel build needs no new entry: the programs name the C++ kernels, which are looked up
when a program is loaded.

Where: `--compilation_cache_dir` when given ('' turns the cache off); else JAX's own
JAX_COMPILATION_CACHE_DIR when set (the tests give each run its own); else jax/ in the
C++ kernels' cache, ~/.cache/s9jax (S9JAX_CACHE moves both). Entries are a few hundred
KB; the directory is capped at MAX_BYTES, least recently used first out (JAX's own
eviction, which takes a file lock, so runs sharing it never read a half-written entry).
"""

from __future__ import annotations

import os
import pathlib
import sys

import jax
from absl import flags

from s9jax import native

MAX_BYTES = 1 << 30
# JAX's default writes only programs that took over 1 s to compile; the evaluation's
# (~1 s here) falls either side of that. Below 0.2 s a program is cheaper to recompile
# than to keep.
MIN_COMPILE_SECONDS = 0.2


def resolve(flag_value: str | None) -> str | None:
  """The directory to use, or None for no cache (see the module docstring)."""
  if flag_value is not None:
    return str(pathlib.Path(flag_value).expanduser()) if flag_value else None
  return os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(native.cache_dir() / "jax")


def enable(flag_value: str | None) -> str | None:
  """Turns the cache on at `resolve(flag_value)` before the first compilation; returns
  the directory, or None when off or when it cannot be made (a warning, not an error: a
  run without the cache only compiles again)."""
  path = resolve(flag_value)
  if path is not None:
    try:
      pathlib.Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
      print(f"warning: no compilation cache, cannot create {path}: {e.strerror or e}",
            file=sys.stderr)
      path = None
  if path is None:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  # The environment's settings win, as JAX's own do.
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  return path


def define_flag():
  """--compilation_cache_dir, for the CLIs that call `enable` with its value."""
  flags.DEFINE_string("compilation_cache_dir", None, "Where compiled programs are kept for "
                      "later runs ('' for nowhere; default: $JAX_COMPILATION_CACHE_DIR, else "
                      "jax/ in ~/.cache/s9jax). See s9jax/compilation_cache.py.")
