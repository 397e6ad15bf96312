"""The reference S9 network and recipe, ported faithfully: 198,776 params, SGD lr 0.01
momentum 0.9, constant rate, 120 epochs (the reference reached 85.24% after 120 epochs,
first >= 85% at epoch 99, ~22 s an epoch on a Colab GPU).

Run: python -m s9jax.train --config configs/seed.py --workdir runs/seed
"""

from configs import base


def get_config(variant: str = ""):
  c = base.get_config(variant)
  c.model = c.model.copy_and_resolve_references()
  c.model.name = "seed"
  c.model.dropout = 0.01
  if not variant:
    c.num_epochs = 120
    c.batch_size = 128
  c.augment.affine_p = 0.5
  c.augment.cutout_p = 0.5
  c.learning_rate = 0.01
  c.momentum = 0.9
  c.nesterov = False
  c.weight_decay = 0.0
  c.schedule = "constant"
  c.warmup_epochs = 0.0
  c.label_smoothing = 0.0
  c.eval_flip = False
  return c
