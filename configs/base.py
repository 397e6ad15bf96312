"""The default s9jax recipe: the `s9net` network (190,738 params) trained to >= 85% on
CIFAR-10 on a 2-core CPU.

Run:   python -m s9jax.train --config configs/base.py --workdir runs/base
Smoke: python -m s9jax.train --config configs/base.py:smoke --workdir /tmp/smoke
Measured (CIFAR-10 JPEG copy, 2-core AMD EPYC VM, idle, seed 0, commit ca8d5aa): 85.31%
test accuracy after 30 epochs, 33.4 min of epochs (~65 s an epoch, eval included).
"""

import ml_collections


def get_config(variant: str = ""):
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.source = "image_folder"          # 'tfds' (official, needs internet+TF) or 'image_folder'.
  c.data.source_path = "../shared/data/cifar10-jpeg.tar.xz"
  c.data.data_dir = "~/tensorflow_datasets"
  c.data.train_limit = 0                  # >0: first N images only (smoke runs, tests).
  c.data.test_limit = 0
  # Augmentation threads, overlapped with the step. One: Albumentations holds the GIL for
  # most of each image, so two threads contend for it and deliver less (fast.py, random
  # images: 16,300 img/s with one, 9,500 with two); 24-px training epochs took the same
  # time with either (18.3/19.4 s vs 18.2/18.3 s).
  c.data.workers = 1

  # Every training trick, named once, with its units.
  c.augment = ml_collections.ConfigDict()
  c.augment.backend = "albumentations"    # 'jax': the same augmentations jitted on device.
  c.augment.image_size = 32               # Resize(32, 32), as the reference.
  c.augment.hflip_p = 0.5                 # HorizontalFlip.
  c.augment.affine_p = 0.5                # ShiftScaleRotate (as Affine): p, then its ranges:
  c.augment.shift = 0.05                  #   fraction of the side,
  c.augment.scale = 0.05                  #   +- fraction,
  c.augment.rotate = 15.0                 #   degrees.
  c.augment.cutout_p = 0.25               # CoarseDropout: one hole of the dataset mean,
  c.augment.cutout_size = 16              #   pixels a side.

  c.model = ml_collections.ConfigDict()
  c.model.name = "s9net"
  c.model.conv_impl = "auto"              # 'auto': CPU-fast convs, BatchNorm, dropout on CPU; lax on GPU/TPU.
  c.model.dtype = "float32"               # 'bfloat16': mixed precision (params stay float32).
  c.model.stem_width = 24
  c.model.stem_stride = 1                 # 2: the stem downsamples (see configs/fast.py).
  c.model.widths = (48, 96, 160)          # Channels at 16x16, 8x8, 4x4.
  c.model.depths = (1, 2, 2)              # Residual separable blocks per stage.
  c.model.separable_down = (False, True, True)  # Dense or separable dilated strided conv.
  c.model.down_strides = (2, 2, 2)        # Each stage's first conv: stride,
  c.model.down_dilations = (2, 2, 2)      #   dilation (and padding, 'same').
  c.model.block_dilations = (1, 1, 1)
  c.model.dropout = 0.0                   # Before the classifier.

  c.num_devices = 0                       # Data parallel over this many devices; 0: all.
  c.num_epochs = 30
  c.batch_size = 256                      # Global, over all devices and hosts.
  c.eval_batch_size = 500
  c.optimizer = "sgd"                     # SGD, Nesterov momentum.
  c.learning_rate = 0.2                   # Peak; used as given (not rescaled with batch_size).
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 5e-4                   # L2 on conv kernels only (not BatchNorm).
  c.schedule = "onecycle"                 # Linear warm-up, then linear decay to zero.
  c.warmup_epochs = 2.0
  c.label_smoothing = 0.1
  c.eval_flip = True                      # Test-time augmentation: average with the mirror,
  c.eval_translate = 0                    #   and with 2 shifts by this many pixels (0: off).
  c.eval_every = 1                        # Test-set evaluation after every Nth epoch and the last.
  c.progressive_size = 0                  # Progressive resizing: the first
  c.progressive_epochs = 0                #   progressive_epochs train on batches resized to
                                          #   progressive_size pixels (after augmentation, on
                                          #   device); 0: off. Evaluation stays at full size.

  c.checkpoint_keep = 3                   # Latest N kept, plus the best by test accuracy.
  c.allow_constraint_violation = False    # Refuse to train a network that breaks S9's rules.
  c.plots = True

  if variant == "smoke":                  # Seconds, not minutes: the CLI end to end.
    c.data.train_limit = 512
    c.data.test_limit = 256
    c.num_epochs = 1
    c.batch_size = 128
    c.eval_batch_size = 128
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of configs/base.py (known: 'smoke')")
  return c
