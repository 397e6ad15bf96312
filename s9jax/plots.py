"""Matplotlib figures written into the workdir. No training logic here."""

from __future__ import annotations

import numpy as np


def _figure(figsize):
  """A figure drawn to files only (matplotlib's object API: no pyplot, no GUI backend).
  Imported here, at the first figure: ~0.4 s that a process which draws none (a
  `--config.plots=False` run, a bad flag's error, `s9jax.summary`) does not pay."""
  from matplotlib.figure import Figure
  return Figure(figsize=figsize)


def to_display(images: np.ndarray, mean, std) -> np.ndarray:
  """Normalised float images back to [0, 1] for display."""
  return np.clip(images * np.asarray(std) + np.asarray(mean), 0.0, 1.0)


def image_grid(path, images, titles, mean, std, columns: int = 8, suptitle: str = ""):
  """The images in rows of `columns`, each under its title. One picture in one Axes, the
  titles as text: a subplot per image took ~1 s for 32 (their axes and tight_layout),
  paid twice by every training run; this takes ~0.2."""
  images = to_display(np.asarray(images), mean, std)
  count, height, width, channels = images.shape
  rows = max(1, -(-count // columns))
  cell_inches = (1.4, 1.8)  # Width, height: the image, and above it room for two lines.
  pad = max(1, width // 8)
  cell_width = width + pad
  cell_height = round(cell_width * cell_inches[1] / cell_inches[0])
  sheet = np.ones((rows * cell_height, columns * cell_width, channels), images.dtype)
  heading = 0.3 if suptitle else 0.0  # Inches above the grid for the suptitle.
  figure_size = (columns * cell_inches[0], rows * cell_inches[1] + heading)
  fig = _figure(figure_size)
  ax = fig.add_axes((0.0, 0.0, 1.0, 1.0 - heading / figure_size[1]))
  ax.set_axis_off()
  for k, (image, title) in enumerate(zip(images, titles)):
    row, column = divmod(k, columns)
    top, left = (row + 1) * cell_height - height - pad // 2, column * cell_width + pad // 2
    sheet[top:top + height, left:left + width] = image
    ax.text(left + width / 2, top - pad / 2, title, fontsize=7, ha="center", va="bottom")
  ax.imshow(sheet, interpolation="nearest", aspect="auto")
  if suptitle:
    fig.suptitle(suptitle, fontsize=9)
  fig.savefig(path, dpi=120)


def learning_curves(path, records: list[dict], goal: float = 0.0):
  """Train and validation curves by epoch, the test set's one point at the end; a
  horizontal line at `goal` percent if one is given."""
  epochs = [r["epoch"] for r in records]
  fig = _figure((10, 3.8))
  loss_ax, acc_ax = fig.subplots(1, 2)
  for split, style in (("train", {}), ("val", {"marker": "."}), ("test", {"marker": "*",
                                                                         "markersize": 10})):
    kept = [r for r in records if f"{split}_loss" in r]
    if not kept:
      continue
    x = [r["epoch"] for r in kept]
    loss_ax.plot(x, [r[f"{split}_loss"] for r in kept], label=split, **style)
    acc_ax.plot(x, [100 * r[f"{split}_accuracy"] for r in kept], label=split, **style)
  if goal:
    acc_ax.axhline(goal, color="grey", linestyle=":", linewidth=1, label=f"{goal:g}% goal")
  loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
  acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
  for ax in (loss_ax, acc_ax):
    ax.set_xlim(0.5, max(epochs) + 0.5)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def confusion_matrix(path, matrix: np.ndarray, class_names):
  fig = _figure((7, 6))
  ax = fig.subplots()
  shown = ax.imshow(matrix, cmap="Blues")
  ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
  ax.set_yticks(range(len(class_names)), class_names)
  ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (test)")
  threshold = matrix.max() / 2
  for i in range(matrix.shape[0]):
    for j in range(matrix.shape[1]):
      ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
              color="white" if matrix[i, j] > threshold else "black")
  fig.colorbar(shown)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
