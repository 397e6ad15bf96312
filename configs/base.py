"""The development recipe: the `s9net` network (190,738 params, receptive field 135),
30 epochs of one-cycle SGD, with 5,000 training images held out for validation.

Run:   python -m s9jax.train --config configs/base.py --workdir runs/base
Smoke: python -m s9jax.train --config configs/base.py:smoke --workdir /tmp/smoke
Expected: ~85% test accuracy after 30 epochs, ~35 min on a 2-core laptop-class CPU
(figures with their commands: docs/benchmarks.md). Other configs import this one and
override what they change; every training trick is a key here, named once, with units.
"""

import ml_collections


def get_config(variant: str = ""):
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  # 'cifar10': the official binary archive, downloaded from url (checked against md5) once
  # when source_path is empty; else source_path is a local file: that archive fetched by
  # hand, or an image-folder archive or directory ({train,test}/<class>/<image>).
  # 'image_folder': source_path must be an image folder. 'tfds': TFDS's own cifar10
  # builder (needs TensorFlow). Whichever, it is prepared once into data_dir.
  c.data.source = "cifar10"
  c.data.source_path = ""
  c.data.url = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
  c.data.md5 = "c32a1d4ab5d03f1284b67883e8d87530"  # Of the file at url (170,052,171 bytes).
  c.data.data_dir = "~/tensorflow_datasets"
  c.data.train_limit = 0                  # >0: first N images only (smoke runs, tests).
  c.data.test_limit = 0
  # The last N training images validate: per-epoch curves, best-checkpoint choice and
  # every recipe decision read them, never the test set. 0 trains on all 50,000.
  c.data.validation_size = 5000
  # Augmentation worker processes (Grain's mp_prefetch), each building whole batches;
  # 0: one background thread of this process, overlapped with the step (JAX releases the
  # GIL during it). Any count gives the same batches. 0 on 2 cores: end to end it kept
  # pace with 1 process and beat 2 (they share the step's two cores), with no start-up
  # and no copy of the images per process (benchmarks/input_pipeline.py).
  c.data.workers = 0

  # Every training trick, named once, with its units.
  c.augment = ml_collections.ConfigDict()
  c.augment.backend = "albumentations"    # 'jax': training set on the devices, augmented in the step.
  c.augment.image_size = 32               # Resize(32, 32), as the reference.
  c.augment.hflip_p = 0.5                 # HorizontalFlip,
  c.augment.alternate_flip = False        #   or each image mirrored every other epoch (airbench).
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
  # The separable convs' 1x1s, and the dense 3x3s after the stem, on bfloat16 operands
  # with float32 sums: False, True, or 'auto', bfloat16 where its products run faster
  # (GPU, TPU, AMD CPUs with AVX512-BF16, and the 1x1s on Intel's AMX tiles;
  # models.resolve_bf16).
  c.model.pointwise_bf16 = ml_collections.FieldReference(False, field_type=object)
  c.model.dense_bf16 = ml_collections.FieldReference(False, field_type=object)
  c.model.stem_width = 24
  c.model.stem_stride = 1                 # 2: the stem downsamples (see configs/fast.py).
  c.model.stem_depth = 0                  # Residual separable blocks at the stem's resolution.
  c.model.widths = (48, 96, 160)          # Channels at 16x16, 8x8, 4x4.
  c.model.depths = (1, 2, 2)              # Residual separable blocks per stage.
  c.model.separable_down = (False, True, True)  # Dense or separable dilated strided conv.
  c.model.down_strides = (2, 2, 2)        # Each stage's first conv: stride,
  c.model.down_dilations = (2, 2, 2)      #   dilation (and padding, 'same').
  c.model.block_dilations = (1, 1, 1)
  c.model.activation = "relu"             # After every BatchNorm: 'relu', 'silu', 'hardswish'.
  c.model.residual_activation = "branch"  # A block's last activation: before its sum or
                                          #   after it ('sum', ResNet's form).
  c.model.eca_kernel = 0                  # Each block's branch scaled per channel by ECA
                                          #   (models.ChannelAttention), a 1-D conv of this
                                          #   many taps over its pooled channels; 0: off.
  c.model.zero_init_residual = False      # Each block's last BatchNorm scale starts at 0:
                                          #   the block starts as the identity (Goyal et
                                          #   al. 2017's "zero gamma").
  c.model.dropout = 0.0                   # Before the classifier.

  c.num_devices = 0                       # Data parallel over this many devices; 0: all.
  c.num_epochs = 30
  c.batch_size = 256                      # Global, over all devices and hosts.
  c.eval_batch_size = 500                 # Evaluation only: any value gives the same figures.
  c.optimizer = "sgd"                     # SGD, Nesterov momentum; "muon": the hidden
  c.muon_learning_rate = 0.08             #   conv kernels by Muon at this peak rate (the
  c.muon_momentum = 0.6                   #   schedule's shape) and momentum, their norms
                                          #   held fixed instead of decayed (airbench94_muon,
                                          #   whose rate is 0.24 at batch 1,024; 0.08 measured
                                          #   best at batch 128: docs/benchmarks.md).
  c.learning_rate = 0.2                   # Peak; used as given (not rescaled with batch_size).
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 5e-4                   # L2 on conv kernels only (not BatchNorm).
  c.bn_bias_lr_scale = 1.0                # BatchNorm biases learn at this x the rate,
  c.bn_scale_frozen = False               #   and its scales stay at 1 (airbench: 64, True).
  c.whiten_stem = False                   # The stem's 3x3 kernel set to whiten the training
                                          #   images' patches, and frozen (airbench).
  c.schedule = "onecycle"                 # Linear warm-up, then linear decay to zero.
  c.warmup_epochs = 2.0                   # Linear warm-up from warmup_start x the peak rate:
  c.warmup_start = 0.1                    #   SGD at the peak rate from step 0 diverges early.
  c.label_smoothing = 0.1
  c.mixup_alpha = 0.0                     # Mixup: each image and its target mixed with its
                                          #   batch neighbour's, the larger share its own,
                                          #   drawn from Beta(alpha, alpha); 0: off.
                                          #   (best.py, 0.2: -1.18 points on validation.)
  c.lookahead_every = 0                   # Lookahead: every N steps the fast weights restart from
                                          #   slow ones pulled towards them (airbench: 5); 0: off.
  # Test-time augmentation of the final test evaluation (validation runs without it):
  c.eval_flip = True                      # average the logits with the mirror's,
  c.eval_translate = 0                    # and with 2 shifts by this many pixels (0: off),
  c.eval_translate_weight = 0.5           # which weigh this much together (airbench's 0.5).
  c.bn_recalibrate = False                # After the last epoch, BatchNorm's running statistics
                                          #   recomputed over the un-augmented training images
                                          #   (whole batches in training mode, pooled), for
                                          #   the last validation, the test and the checkpoint.
  c.progressive_size = 0                  # Progressive resizing: the first
  c.progressive_epochs = 0                #   progressive_epochs train on batches resized to
                                          #   progressive_size pixels (after augmentation, on
                                          #   device); 0: off. Evaluation stays at full size.

  c.checkpoint_keep = 3                   # Latest N kept, plus the best by validation accuracy.
  c.allow_constraint_violation = False    # Refuse to train a network that breaks S9's rules.
  c.plots = True
  c.plot_goal = 0.0                       # Accuracy (%) drawn as a line on the curves; 0: none.

  if variant == "smoke":                  # Seconds, not minutes: the CLI end to end.
    c.data.train_limit = 512
    c.data.test_limit = 256
    c.data.validation_size = 128
    c.num_epochs = 1
    c.batch_size = 128
    c.eval_batch_size = 128
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of configs/base.py (known: 'smoke')")
  return c
