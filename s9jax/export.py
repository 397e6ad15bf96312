"""A trained network as a `jax.export` artifact: serialized StableHLO that runs with plain
JAX, without s9jax, TensorFlow or the training code.

    python -m s9jax.export --workdir runs/base [--output FILE] [--platforms cpu,cuda,tpu]
                           [--checkpoint final] [--notta]

Writes FILE (default WORKDIR/model.jaxexport) and beside it FILE's name with .json
(model.json): class names, the input and output spec, the checkpoint and its recorded
accuracy. The artifact is one function: uint8 (b, 32, 32, 3) RGB images, any batch size
b -> float32 (b, 10) logits. Normalisation with the run's statistics and the run's
test-time augmentations (`--notta`: none) are inside it; the parameters are constants in
it. It is exported with the canonical 'lax' convolutions, pure XLA operations: the C++
kernels of conv_impl 'native' are registered only inside an s9jax process. Lowered for
`--platforms` (default cpu); a consumer calls it on one of them:

    exported = jax.export.deserialize(open("model.jaxexport", "rb").read())
    logits = exported.call(images)
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
from absl import flags, logging

from s9jax import inference, input_pipeline, models, train

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # What jax.export lowers for.

CONSUMER = '''\
import json, jax, numpy as np
from PIL import Image

exported = jax.export.deserialize(open("{artifact}", "rb").read())
classes = json.load(open("{spec}"))["class_names"]
image = Image.open("cat.jpg").convert("RGB").resize((32, 32), Image.BICUBIC)
images = np.asarray(image, np.uint8)[None]  # (batch, 32, 32, 3) uint8 RGB, any batch
probabilities = jax.nn.softmax(exported.call(images), axis=-1)
best = int(probabilities[0].argmax())
print(classes[best], f"{{100 * float(probabilities[0, best]):.1f}}%")
'''


def define_flags(values: flags.FlagValues):
  flags.DEFINE_string("workdir", None, "Training workdir holding config.json and checkpoints/.",
                      flag_values=values)
  flags.DEFINE_string("output", None, "Artifact path (default: WORKDIR/model.jaxexport); "
                      "its spec goes beside it, with the suffix .json.", flag_values=values)
  flags.DEFINE_string("checkpoint", "final", f"Which checkpoint: {inference.CHECKPOINTS}.",
                      flag_values=values)
  flags.DEFINE_list("platforms", ["cpu"], f"Platforms to lower for, of {', '.join(PLATFORMS)}.",
                    flag_values=values)
  flags.DEFINE_bool("tta", True, "Include the run's test-time augmentations (as its test "
                    "accuracy was measured).", flag_values=values)
  flags.mark_flag_as_required("workdir", flag_values=values)


def export_model(workdir, checkpoint: str = "final", platforms=("cpu",), tta: bool = True):
  """(exported, spec): the jax.export.Exported of a workdir's network as a function of
  uint8 images with a symbolic batch, and the dict written beside it as its .json."""
  try:
    import flatbuffers  # noqa: F401 - what jax.export's (de)serialization needs.
  except ImportError:
    raise inference.UsageError("jax.export serializes with the 'flatbuffers' package, which "
                               "is not installed: pip install flatbuffers") from None
  unknown = [p for p in platforms if p not in PLATFORMS]
  if unknown or not platforms:
    raise inference.UsageError(f"platforms must be some of {', '.join(PLATFORMS)}, "
                               f"got {','.join(platforms)!r}")
  config, state, mean, std, meta = inference.restore(workdir, checkpoint)
  # Host copies: closed over, they become constants of the exported module.
  variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  augmentations = inference.tta_options(config) if tta else {}
  logits = inference.logits_function(models.create_model(config.model, conv_impl="lax").apply,
                                     mean, std, **augmentations)
  size = config.augment.image_size
  images = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"b, {size}, {size}, 3"), jnp.uint8)
  exported = jax.export.export(jax.jit(lambda x: logits(variables, x)),
                               platforms=tuple(platforms))(images)
  record = meta.get("record", {})
  spec = {
      "format": "jax.export (serialized StableHLO): "
                "jax.export.deserialize(bytes).call(images) -> logits",
      "exported_with_jax": jax.__version__,
      "platforms": list(exported.platforms),
      "input": {"shape": ["b", size, size, 3], "dtype": "uint8", "layout": "NHWC",
                "channels": "RGB", "range": [0, 255],
                "preprocessing": f"resize to {size}x{size}; normalisation is in the artifact"},
      "output": {"shape": ["b", len(input_pipeline.CLASS_NAMES)], "dtype": "float32",
                 "meaning": "logits: softmax for class probabilities"},
      "class_names": list(input_pipeline.CLASS_NAMES),
      "normalisation": {"mean": mean.tolist(), "std": std.tolist(),
                        "formula": "(x / 255 - mean) / std"},
      "test_time_augmentation": augmentations or None,
      "model": config.model.name,
      "checkpoint": {"workdir": str(workdir), "step": int(state.step),
                     "epoch": meta.get("epoch"),
                     **{key: record[key] for key in ("val_accuracy", "test_accuracy")
                        if key in record}},
  }
  return exported, spec


def write(exported, spec: dict, output: pathlib.Path) -> pathlib.Path:
  """Writes the artifact and its spec (each atomically); returns the spec's path."""
  spec_path = output.with_suffix(".json")
  output.parent.mkdir(parents=True, exist_ok=True)
  tmp = output.with_name(output.name + ".tmp")
  tmp.write_bytes(exported.serialize())
  tmp.replace(output)
  train.write_atomically(spec_path, json.dumps({"artifact": output.name, **spec}, indent=2) + "\n")
  return spec_path


def _main(argv: list[str]) -> int:
  parsed = inference.parse_cli(argv, define_flags, __doc__)
  if parsed is None:
    return 0
  values, rest = parsed
  if rest:
    raise inference.UsageError(f"unexpected arguments: {' '.join(rest)}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it reads at INFO.
  output = pathlib.Path(values.output or pathlib.Path(values.workdir) / "model.jaxexport")
  if output.suffix == ".json":
    raise inference.UsageError(f"--output {output}: its spec is written beside it as "
                               "NAME.json; give the artifact another suffix (.jaxexport)")
  exported, spec = export_model(values.workdir, values.checkpoint, values.platforms, values.tta)
  spec_path = write(exported, spec, output)
  shape = ", ".join(map(str, spec["input"]["shape"]))
  print(f"wrote {output} ({output.stat().st_size:,} bytes; checkpoint "
        f"{spec['checkpoint']['step']}; {', '.join(spec['platforms'])}; uint8 ({shape}) -> "
        f"float32 logits) and {spec_path}")
  print("\nUse it with JAX alone (no s9jax):\n")
  print(CONSUMER.format(artifact=output, spec=spec_path), end="")
  return 0


def main(argv: list[str]) -> int:
  """The CLI: `argv` as sys.argv (program name first); returns the exit status."""
  return inference.run_cli(_main, argv, OSError)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
