"""host_memory.reuse_freed_memory: XLA:CPU's per-call temporaries stop costing fresh pages.

Each case runs in a fresh interpreter, because the settings only reach threads that have
not allocated yet (JAX's CPU client must start after them)."""

import os
import pathlib
import platform
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A jitted call with a 64 MB XLA temporary (the first matmul's output); prints whether the
# settings were applied and the page faults of its 4th to 8th calls.
PROGRAM = """
import resource
from s9jax import host_memory
applied = host_memory.reuse_freed_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda x, w: ((x @ w) @ w.T).sum())
x, w = jnp.ones((4096, 256)), jnp.ones((256, 4096))
for _ in range(3):
  f(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  f(x, w).block_until_ready()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""
TEMP_PAGES = 4096 * 4096 * 4 // 4096


def run(env_extra):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **env_extra}
  result = subprocess.run([sys.executable, "-c", PROGRAM], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  applied, faults = result.stdout.split()
  return applied == "True", float(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_temporaries_reuse_pages():
  applied, faults = run({})
  assert applied
  assert faults < TEMP_PAGES / 10, f"{faults:.0f} page faults a call for a {TEMP_PAGES}-page temp"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_opt_out_leaves_malloc_alone():
  # Also shows the case above measures something: with glibc's defaults the temporary is
  # a fresh mapping on every call.
  applied, faults = run({"S9JAX_MALLOC": "system"})
  assert not applied
  assert faults > TEMP_PAGES / 2, f"{faults:.0f} page faults a call for a {TEMP_PAGES}-page temp"
