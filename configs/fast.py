"""The 15-minute budget: `configs/base.py`'s network and optimiser, with the schedule cut
to the 13 epochs (plus data loading and compilation) that fit in 15 minutes on the 2-core
dev machine, and lighter augmentation for the short run.

Run: python -m s9jax.train --config configs/fast.py --workdir runs/fast
Measured: see README, "Benchmarks" (benchmark 3).
"""

from configs import base


def get_config(variant: str = ""):
  c = base.get_config(variant)
  if not variant:
    c.num_epochs = 13
  c.warmup_epochs = 1.0
  # A short run underfits more than it overfits (16 epochs of this recipe: 88% train vs
  # 83% test accuracy): half the Affine rate, no CoarseDropout.
  c.augment.affine_p = 0.25
  c.augment.cutout_p = 0.0
  return c
