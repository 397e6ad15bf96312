"""s9jax: the S9 CIFAR-10 classifier in JAX/Flax.

`s9jax.load(workdir)` -> a trained run as a function from uint8 NHWC images to class
probabilities (see s9jax/inference.py). Imported on first use, so `import s9jax` (and
every `from s9jax import module`) stays cheap: no JAX, Orbax or TFDS until then.
"""


def __getattr__(name):
  if name == "load":
    from s9jax.inference import load
    return load
  raise AttributeError(f"module 's9jax' has no attribute {name!r}")
