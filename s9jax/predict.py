"""The top classes, with probabilities, of image files, from a trained workdir.

    python -m s9jax.predict --workdir runs/base [--top 3] [--checkpoint final] IMAGE...

Any file Pillow reads, of any size or mode: turned upright (EXIF), transparent pixels
onto white, converted to RGB, resized to 32x32 (bicubic, antialiased; not cropped, so a
non-square image is squeezed), then normalised with the run's statistics and classified
with the run's test-time augmentations (`--notta`: one pass). One line per image:

    cat.jpg: cat 71.3%, dog 12.0%, frog 5.1%

A missing or unreadable image, or a workdir without a checkpoint: one `error:` line on
stderr and exit 2, before anything is printed.
"""

from __future__ import annotations

import sys

import numpy as np
from absl import flags, logging
from PIL import Image, ImageOps

from s9jax import inference


class ImageError(Exception):
  """An image file that cannot be read."""


def define_flags(values: flags.FlagValues):
  flags.DEFINE_string("workdir", None, "Training workdir holding config.json and checkpoints/.",
                      flag_values=values)
  flags.DEFINE_integer("top", 3, "How many classes to print per image.", lower_bound=1,
                       flag_values=values)
  flags.DEFINE_string("checkpoint", "final", f"Which checkpoint: {inference.CHECKPOINTS}.",
                      flag_values=values)
  flags.DEFINE_bool("tta", True, "Average over the run's test-time augmentations, as its "
                    "test accuracy was measured.", flag_values=values)
  flags.mark_flag_as_required("workdir", flag_values=values)


def read_image(path: str, size: int) -> np.ndarray:
  """uint8 (size, size, 3) RGB from an image file of any size and mode."""
  try:
    with Image.open(path) as image:
      image = ImageOps.exif_transpose(image)
      if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        # Transparent pixels onto white, as a viewer shows them (not their hidden colour).
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
      image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
  except FileNotFoundError:
    raise ImageError(f"no such image file: {path}") from None
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    # Pillow: UnidentifiedImageError (an OSError) for a non-image, OSError for a
    # truncated one, ValueError for modes it cannot convert.
    raise ImageError(f"cannot read image {path}: {e}") from e
  return np.asarray(image, np.uint8)


def format_line(path: str, probabilities: np.ndarray, class_names, top: int) -> str:
  """`path: class 97.1%, class 1.2%, ...`, the `top` most probable first."""
  order = np.argsort(-probabilities, kind="stable")[:top]
  return f"{path}: " + ", ".join(f"{class_names[i]} {100 * probabilities[i]:.1f}%"
                                 for i in order)


def _main(argv: list[str]) -> int:
  parsed = inference.parse_cli(argv, define_flags, __doc__)
  if parsed is None:
    return 0
  values, paths = parsed
  if not paths:
    raise inference.UsageError("no IMAGE given: python -m s9jax.predict --workdir DIR IMAGE...")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it reads at INFO.
  size = inference.load_config(values.workdir).augment.image_size  # A bad workdir first.
  images = np.stack([read_image(path, size) for path in paths])  # Before the restore.
  model = inference.load(values.workdir, values.checkpoint, tta=values.tta)
  for path, probabilities in zip(paths, model(images)):
    print(format_line(path, probabilities, model.class_names, values.top))
  return 0


def main(argv: list[str]) -> int:
  """The CLI: `argv` as sys.argv (program name first); returns the exit status."""
  return inference.run_cli(_main, argv, ImageError)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
