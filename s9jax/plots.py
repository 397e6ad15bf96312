"""Matplotlib figures written into the workdir. No training logic here."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # Files only: training runs headless.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _to_display(images: np.ndarray, mean, std) -> np.ndarray:
  """Normalised float images back to [0, 1] for display."""
  return np.clip(images * np.asarray(std) + np.asarray(mean), 0.0, 1.0)


def image_grid(path, images, titles, mean, std, columns: int = 8, suptitle: str = ""):
  images = _to_display(np.asarray(images), mean, std)
  rows = max(1, int(np.ceil(len(images) / columns)))
  fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.4, rows * 1.8))
  for ax in np.ravel(axes):
    ax.axis("off")
  for ax, image, title in zip(np.ravel(axes), images, titles):
    ax.imshow(image, interpolation="nearest")
    ax.set_title(title, fontsize=7)
  if suptitle:
    fig.suptitle(suptitle, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def learning_curves(path, records: list[dict]):
  epochs = [r["epoch"] for r in records]
  tested = [r for r in records if "test_accuracy" in r]  # See config.eval_every.
  test_epochs = [r["epoch"] for r in tested]
  fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
  loss_ax.plot(epochs, [r["train_loss"] for r in records], label="train")
  loss_ax.plot(test_epochs, [r["test_loss"] for r in tested], marker=".", label="test")
  loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
  acc_ax.plot(epochs, [100 * r["train_accuracy"] for r in records], label="train")
  acc_ax.plot(test_epochs, [100 * r["test_accuracy"] for r in tested], marker=".", label="test")
  acc_ax.axhline(85.0, color="grey", linestyle=":", linewidth=1, label="85% goal")
  acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
  for ax in (loss_ax, acc_ax):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def confusion_matrix(path, matrix: np.ndarray, class_names):
  fig, ax = plt.subplots(figsize=(7, 6))
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
  plt.close(fig)
