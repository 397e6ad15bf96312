"""host_memory.reuse_freed_memory: a big block comes from the heap and stays mapped after
it is freed, so XLA:CPU's per-step temporaries stop costing fresh pages.

What is asserted is glibc's own accounting (mallinfo2), not page-fault counts, which also
depend on the kernel's transparent-huge-page policy. Each case runs in a fresh
interpreter without JAX: the settings only reach threads that have not allocated yet."""

import ctypes
import os
import pathlib
import platform
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Mallocs a 64 MB block (XLA's temporaries are of that order) and prints whether the
# settings were applied, then glibc's mmapped bytes while it is held, and the heap's size
# (arena) while held and after it was freed.
PROGRAM = """
import ctypes
from s9jax import host_memory
applied = host_memory.reuse_freed_memory()
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
  _fields_ = [(name, ctypes.c_size_t) for name in (
      "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
      "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(64 << 20)
held = libc.mallinfo2()
libc.free(ctypes.c_void_p(block))
freed = libc.mallinfo2()
print(applied, held.hblkhd, held.arena, freed.arena)
"""
BLOCK = 64 << 20


def has_mallinfo2() -> bool:
  try:
    return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")  # glibc >= 2.33.
  except OSError:
    return False


def run(env_extra):
  env = {**os.environ, **env_extra}
  result = subprocess.run([sys.executable, "-c", PROGRAM], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  applied, mmapped, heap_held, heap_freed = result.stdout.split()
  return applied == "True", int(mmapped), int(heap_held), int(heap_freed)


needs_glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not has_mallinfo2(),
                                 reason="mallopt and mallinfo2 are glibc's (>= 2.33)")


@needs_glibc
def test_big_blocks_come_from_the_heap_and_stay_mapped_when_freed():
  applied, mmapped, heap_held, heap_freed = run({})
  assert applied
  # Not a mapping of its own (the interpreter mapped a few blocks before the settings)...
  assert mmapped < BLOCK and heap_held >= BLOCK
  assert heap_freed >= BLOCK                  # ...and not given back to the kernel on free.


@needs_glibc
def test_opt_out_leaves_malloc_alone():
  # Also shows the case above measures something: with glibc's defaults the block is a
  # mapping of its own, unmapped again on free.
  applied, mmapped, heap_held, heap_freed = run({"S9JAX_MALLOC": "system"})
  assert not applied
  assert mmapped >= BLOCK and heap_freed < BLOCK
