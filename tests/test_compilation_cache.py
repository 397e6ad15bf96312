"""Where the command-line tools keep compiled programs (s9jax/compilation_cache.py); that
they do keep them there is checked through the CLI, in test_train.py."""

from s9jax import compilation_cache


def test_the_directory_is_the_flag_then_jax_s_variable_then_the_kernels_cache(
    monkeypatch, tmp_path):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  monkeypatch.delenv("S9JAX_CACHE", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compilation_cache.resolve(None) == str(tmp_path / "xdg" / "s9jax" / "jax")
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert compilation_cache.resolve(None) == str(tmp_path / "home" / ".cache" / "s9jax" / "jax")
  monkeypatch.setenv("S9JAX_CACHE", str(tmp_path / "moved"))  # With the C++ kernels.
  assert compilation_cache.resolve(None) == str(tmp_path / "moved" / "jax")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax's"))
  assert compilation_cache.resolve(None) == str(tmp_path / "jax's")
  assert compilation_cache.resolve(str(tmp_path / "given")) == str(tmp_path / "given")
  assert compilation_cache.resolve("~/given") == str(tmp_path / "home" / "given")
  assert compilation_cache.resolve("") is None  # Off, whatever the environment says.
