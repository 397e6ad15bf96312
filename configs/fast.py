"""The time-budget recipe for a 2-core CPU: `configs/base.py`'s network computed at a
quarter of the stem's cost, its separable convs' 1x1s and its first stage's dense 3x3 on
bfloat16 operands where that is faster ('auto'), 24 epochs of which the first 14 at 24
pixels, lighter augmentation, flip-and-translate test-time augmentation.

Run:      python -m s9jax.train --config configs/fast.py --workdir runs/fast
Expected: ~85.2% test accuracy (CIFAR-10 JPEG copy, over 5 report seeds: 85.16 +- 0.26%,
min 84.88%, on a 2-core AMD EPYC, in bfloat16, 5.4-5.9 min wall in that VM's fast hours,
up to 7.9 in its slow ones; 85.34 +- 0.29%, min 85.05%, on a 2-core Intel Xeon, in
bfloat16 on AMX tiles, 4.9-5.6 min in its fast hours, 6.0-6.5 in slower ones), dataset
already prepared and compiled programs cached by an earlier run (figures with their
commands: docs/benchmarks.md).
A fixed recipe, so it trains on all 50,000 images; to change it, tune on the validation
split: --config.data.validation_size=5000.
"""

from configs import base


def get_config(variant: str = ""):
  c = base.get_config(variant)
  if not variant:
    c.data.validation_size = 0
  # base.py's stem runs at 32x32, but its only reader, the stride-2 dilation-2 conv, reads
  # its even pixels alone: a stride-2 stem and an undilated stride-1 conv compute the same
  # network (BatchNorm statistics over those pixels only) at 1.23x the step speed.
  c.model.stem_stride = 2
  c.model.down_strides = (1, 2, 2)
  c.model.down_dilations = (1, 2, 2)
  if not variant:
    c.num_epochs = 24
    # Progressive resizing: 24-px batches cost ~0.6x a 32-px batch, so the early epochs,
    # which learn coarse features, buy more epochs in the budget. Evaluation stays at 32.
    c.progressive_size = 24
    c.progressive_epochs = 14
    # Twice the updates per epoch of batch 256 at the same images/s on 2 cores; batch 64
    # is no faster per image and learns less per epoch.
    c.batch_size = 128
    c.learning_rate = 0.2
    # airbench's flip-and-translate averaging, once, on the final network.
    c.eval_translate = 1
    # The separable convs' 1x1s on bfloat16 operands, float32 sums, where that is the
    # faster: on an AMD EPYC with AVX512-BF16 they ran 1.6-1.9x, the step ~1.1x; on an
    # Intel Xeon, on AMX tiles, the step 1.10-1.21x (its AVX512-BF16 alone: 0.87-0.94x).
    # 82.85 against float32's 82.97% on validation over three seeds (docs/benchmarks.md).
    c.model.pointwise_bf16 = "auto"
    # And its dense 3x3 after the stem (Conv_1, 29% of its multiply-accumulates): 82.97
    # against 82.85% on validation over three seeds; on that AMD its kernels ran 1.1-1.6x
    # faster alone, the whole step ~1.04x; on that Xeon, on AMX tiles, 1.1-5x alone, the
    # step 1.06-1.17x over the 1x1s' alone.
    c.model.dense_bf16 = "auto"
  c.warmup_epochs = 1.0
  # A short run underfits more than it overfits: half the Affine rate, no CoarseDropout.
  c.augment.affine_p = 0.25
  c.augment.cutout_p = 0.0
  return c
