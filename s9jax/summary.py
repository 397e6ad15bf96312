"""The S9 constraint report of a config's network, analysed in its canonical lax form.

    python -m s9jax.summary --config configs/base.py

Exits 1 when a constraint fails.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from s9jax import receptive_field, train

FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  report = receptive_field.analyse_config(config)
  print(f"model '{config.model.name}' on {config.augment.image_size}x{config.augment.image_size}x3")
  print(report.format())
  sys.exit(0 if report.passed else 1)


def define_flags():
  """Defined only when run as a program, so modules can import each other."""
  config_flags.DEFINE_config_file("config", None, "Config to analyse.", lock_config=True)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=train.parse_flags)
