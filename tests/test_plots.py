"""The figures a run writes, read back as pixels."""

import numpy as np
from PIL import Image

from s9jax import plots


def test_image_grid_lays_the_images_out_in_rows_in_order(tmp_path):
  # Ten flat images of distinct colours in rows of four: each colour must sit where the
  # grid puts its index (row k // 4, column k % 4), at the same size, none lost.
  colours = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1],
                      [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5], [0.5, 0.5, 0]], np.float32)
  images = np.broadcast_to(colours[:, None, None, :], (10, 32, 32, 3))
  mean, std = 0.5, 0.25  # The images arrive normalised, as a run holds them.
  path = tmp_path / "grid.png"
  plots.image_grid(path, (images - mean) / std, [f"image {k}" for k in range(10)], mean, std,
                   columns=4, suptitle="ten colours")
  pixels = np.asarray(Image.open(path).convert("RGB")).astype(np.int32)
  centres, areas = [], []
  for colour in np.round(colours * 255).astype(np.int32):
    ys, xs = np.nonzero(np.all(np.abs(pixels - colour) <= 2, axis=-1))
    assert len(ys), colour
    centres.append((ys.mean(), xs.mean()))
    areas.append(len(ys))
  centres = np.array(centres)
  rows, columns = np.arange(10) // 4, np.arange(10) % 4
  for r in range(3):  # Each row level, below the one before.
    assert np.ptp(centres[rows == r, 0]) < 2
    if r:
      assert centres[rows == r, 0].min() > centres[rows == r - 1, 0].max() + 10
  for c in range(4):  # Each column aligned, left to right.
    assert np.ptp(centres[columns == c, 1]) < 2
    if c:
      assert centres[columns == c, 1].min() > centres[columns == c - 1, 1].max() + 10
  assert max(areas) < 1.1 * min(areas)  # The same size each, none hidden under a title.
