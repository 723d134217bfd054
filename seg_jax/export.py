"""--mode=export: a workdir's checkpoint as files that run without seg_jax, each checked.

  python main.py --workdir=runs/unet --mode=export [--config.export.step=N]

Writes WORKDIR/export/ (replacing an older export only once every check passed):

  saved_model/        TF SavedModel, signature `serving_default`: image uint8 [N, H, W, C]
                      (dynamic N, H, W) -> classes int32 [N, H, W], probabilities float32
                      [N, H, W, K]
  model.onnx          the same signature for onnxruntime (dynamic N, H, W); export.onnx=False
                      leaves it out (DeepLabv3+: tf2onnx mistranslates its bilinear resizes)
  model.tflite        the same at a fixed [1, S, S, C] input (S = export.image_size), float32;
  model_fp16.tflite   float16 weights; model_int8.tflite: int8 weights (dynamic range)
  model.stablehlo     `jax.export` serialisation (dynamic N, H, W) for serving from JAX
  export.json         class names, input rules, normalisation, step, every artefact's checks

Any H and W: inside the graph the image is mirrored (numpy's 'reflect') up to at least
export.min_size (default predict.tile_size) and a multiple of the model's input multiple, and
the outputs are cropped back. That is how predict pads an image smaller than a tile, so for
such images the class ids equal predict's label PNG; larger images are segmented whole where
predict blends tiles (the README measures the difference).

The traced functions (`serving_probabilities`, `serving_outputs`) are pure; it normalises as training did
(`image_io.NORMALIZATION`) and maps logits to probabilities with predict's own
`logits_to_probabilities`. Class ids are the first maximum of the probabilities, as predict
writes them. Convolutions are traced with the "xla" backend: a oneDNN custom call cannot be
serialised.

Converters (all kept projects): jax2tf (native StableHLO serialisation) for the SavedModel;
TF's TFLiteConverter for TFLite; tf2onnx from a dynamic-shape TFLite model for ONNX (tf2onnx
cannot read the SavedModel's XlaCallModule op; jax2onnx would downgrade orbax-checkpoint).

Each artefact is loaded by its own runtime (TF, the TFLite interpreter, onnxruntime,
`jax.export.deserialize`) on probe images of two sizes and compared with the JAX model:
class ids must agree on >= 99.9% of pixels (the int8 model's agreement is reported only).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from seg_jax import config as config_lib
from seg_jax import models
from seg_jax import predict
from seg_jax import workdir as workdir_lib
from seg_jax.data import image_io
from seg_jax.ops import conv as conv_ops

EXPORT_DIR = "export"
MIN_AGREEMENT = 0.999  # fraction of decided pixels whose class id must equal the JAX model's
# A pixel whose two most probable classes are closer than this is undecided: rounding (fp16
# weights move probabilities by up to ~4e-4 on a tiny U-Net) may flip it either way, which is
# not a conversion error. The bar counts decided pixels; the raw agreement is recorded beside it.
DECIDED_MARGIN = 1e-3
ONNX_OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAMES = ("classes", "probabilities")  # the order of the ONNX and TFLite outputs
DTYPE_MAX = image_io.NORMALIZATION["dtype_max"]["uint8"]
# The array functions `reflect_indices` needs, from JAX (StableHLO) or TF (around jax2tf: the
# TFLite converter cannot take the dynamic gathers that JAX would emit for dynamic sizes).
_JNP = types.SimpleNamespace(arange=jnp.arange, where=jnp.where, floormod=jnp.mod,
                             maximum=jnp.maximum)


def _tf_namespace():
  import tensorflow as tf
  return types.SimpleNamespace(arange=tf.range, where=tf.where, floormod=tf.math.floormod,
                               maximum=tf.maximum)


class ExportError(Exception):
  """An artefact failed its check, or the model cannot be exported; the message names which."""


# ---------------------------------------------------------------------------- traced (pure)

def serving_probabilities(variables: dict, images: jax.Array, *, model: nn.Module,
                          normalization: str = image_io.DEFAULT_NORMALIZATION) -> jax.Array:
  """uint8 [N, H, W, C] images -> float32 [N, H, W, K] per-class probabilities; the model's
  input is `normalization`'s (model.input_normalization), computed as image_io.normalize does."""
  x = image_io.unit_to_model_input(images.astype(jnp.float32) / DTYPE_MAX, normalization)
  return predict.logits_to_probabilities(model.apply(variables, x, train=False))


def padded_size(size, *, multiple: int, min_size: int, maximum=jax.core.max_dim):
  """The height (width) the model sees for an input of `size`: at least `min_size` (predict's
  tile), rounded up to `multiple`. `size` is an int, a symbolic dimension (jax.export) or a TF
  scalar (then `maximum` is tf.maximum)."""
  return (maximum(size, min_size) + multiple - 1) // multiple * multiple


def reflect_indices(size, padded, *, xp):
  """Row (column) indices 0..padded-1 into an axis of `size`, mirrored past its end as
  numpy's pad(mode='reflect') mirrors (repeatedly, without repeating the edge); xp is
  _JNP or _tf_namespace()."""
  period = xp.maximum(2 * (size - 1), 1)
  index = xp.floormod(xp.arange(padded), period)
  return xp.where(index < size, index, period - index)


def serving_outputs(variables: dict, images: jax.Array, *, model: nn.Module, multiple: int,
                    min_size: int, normalization: str = image_io.DEFAULT_NORMALIZATION
                    ) -> tuple[jax.Array, jax.Array]:
  """(class ids int32 [N, H, W], probabilities float32 [N, H, W, K]) of uint8 images of any
  size: mirrored up to `padded_size` as predict pads an image smaller than a tile, cropped back."""
  height, width = images.shape[1:3]
  rows = reflect_indices(height, padded_size(height, multiple=multiple, min_size=min_size),
                         xp=_JNP)
  cols = reflect_indices(width, padded_size(width, multiple=multiple, min_size=min_size),
                         xp=_JNP)
  padded = jnp.take(jnp.take(images, rows, axis=1), cols, axis=2)
  probabilities = serving_probabilities(variables, padded, model=model,
                                        normalization=normalization)[:, :height, :width]
  return jnp.argmax(probabilities, axis=-1).astype(jnp.int32), probabilities


# ---------------------------------------------------------------------------- host: probes, checks

def probe_sizes(image_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """Two (H, W) probe sizes: the fixed export size, and a non-square one of odd sizes beside it
  (padded in the graph)."""
  return (image_size, image_size), (max(1, image_size - 3), image_size + 5)


def reference_outputs(probabilities_fn, images: np.ndarray, *, multiple: int, min_size: int
                      ) -> tuple[np.ndarray, np.ndarray]:
  """What the artefacts must compute, the padding done by numpy: mirrored up to `padded_size`,
  the model, cropped back; (class ids, probabilities)."""
  height, width = images.shape[1:3]
  pads = [(0, padded_size(n, multiple=multiple, min_size=min_size) - n) for n in (height, width)]
  padded = np.pad(images, [(0, 0), *pads, (0, 0)], mode="reflect")
  probabilities = np.asarray(probabilities_fn(padded))[:, :height, :width]
  return probabilities.argmax(-1), probabilities


def probe_images(count: int, height: int, width: int, channels: int, seed: int) -> np.ndarray:
  """uint8 [count, H, W, C]: smooth random fields (blocks of 4 px) plus pixel noise."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (count, -(-height // 4), -(-width // 4), channels))
  smooth = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)[:, :height, :width]
  noise = rng.integers(-20, 21, smooth.shape)
  return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def agreement(classes: np.ndarray, reference: np.ndarray) -> float:
  return float(np.mean(np.asarray(classes) == reference))


def decided(probabilities: np.ndarray) -> np.ndarray:
  """bool [..., H, W]: pixels whose top class leads the runner-up by at least DECIDED_MARGIN."""
  top_two = np.sort(probabilities, axis=-1)[..., -2:]
  return top_two[..., 1] - top_two[..., 0] >= DECIDED_MARGIN


def decided_agreement(classes: np.ndarray, reference: np.ndarray,
                      reference_probabilities: np.ndarray) -> float:
  """`agreement` over the pixels the JAX model decides (`decided`); 1.0 if it decides none."""
  mask = decided(reference_probabilities)
  if not mask.any():
    return 1.0
  return float(np.mean(np.asarray(classes)[mask] == reference[mask]))


def _check(name: str, outputs: list[tuple[np.ndarray, np.ndarray]], references, *,
           required: bool) -> list[dict]:
  """Per-probe records {size, agreement, max_probability_error}; ExportError below the bar."""
  records = []
  for (classes, probabilities), (ref_classes, ref_probabilities) in zip(outputs, references):
    record = {"size": list(ref_classes.shape[1:3]), "batch": int(ref_classes.shape[0]),
              "agreement": agreement(classes, ref_classes),
              "decided_agreement": decided_agreement(classes, ref_classes, ref_probabilities),
              "undecided_fraction": float(1.0 - np.mean(decided(ref_probabilities))),
              "max_probability_error": float(np.max(np.abs(probabilities - ref_probabilities)))}
    records.append(record)
    if required and record["decided_agreement"] < MIN_AGREEMENT:
      h, w = record["size"]
      raise ExportError(f"{name}: class ids agree with the JAX model on "
                        f"{record['decided_agreement']:.4%} of the decided pixels of a {h}x{w} "
                        f"probe (needs {MIN_AGREEMENT:.1%}; all pixels: "
                        f"{record['agreement']:.4%}); nothing was written")
  return records


# ---------------------------------------------------------------------------- host: converters

def _tf_functions(probabilities_fn, *, channels: int, multiple: int, min_size: int,
                  image_size: int):
  """A tf.Module whose `serve` maps images of any size to {classes, probabilities} (as
  `serving_outputs`), and the same tf.function at the fixed TFLite size (kept out of the module,
  so that the SavedModel holds the model once)."""
  import tensorflow as tf
  from jax.experimental import jax2tf

  converted = jax2tf.convert(
      probabilities_fn, with_gradient=False,
      polymorphic_shapes=[f"(b, {multiple}*h, {multiple}*w, {channels})"])

  tf_ops = _tf_namespace()
  size = functools.partial(padded_size, multiple=multiple, min_size=min_size,
                           maximum=tf.maximum)

  def outputs(image):
    height, width = tf.shape(image)[1], tf.shape(image)[2]
    rows = reflect_indices(height, size(height), xp=tf_ops)
    cols = reflect_indices(width, size(width), xp=tf_ops)
    padded = tf.gather(tf.gather(image, rows, axis=1), cols, axis=2)
    probabilities = converted(padded)[:, :height, :width]
    # First maximum, as numpy's argmax in predict; a TF op so that TFLite and ONNX keep it.
    return {OUTPUT_NAMES[0]: tf.argmax(probabilities, axis=-1, output_type=tf.int32),
            OUTPUT_NAMES[1]: probabilities}

  module = tf.Module()
  module.serve = tf.function(outputs, autograph=False, input_signature=[
      tf.TensorSpec([None, None, None, channels], tf.uint8, name=INPUT_NAME)])
  fixed = tf.function(outputs, autograph=False, input_signature=[
      tf.TensorSpec([1, image_size, image_size, channels], tf.uint8, name=INPUT_NAME)])
  return module, fixed


def _tflite_bytes(module, function, variant: str) -> bytes:
  import tensorflow as tf
  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [function.get_concrete_function()], module)
  if variant in ("fp16", "int8"):
    converter.optimizations = [tf.lite.Optimize.DEFAULT]  # int8 weights, float activations
  if variant == "fp16":
    converter.target_spec.supported_types = [tf.float16]
  return converter.convert()


def _run_tflite(path: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  import tensorflow as tf
  interpreter = tf.lite.Interpreter(model_path=path)
  runner = interpreter.get_signature_runner()
  results = [runner(**{INPUT_NAME: image[None]}) for image in images]
  return tuple(np.concatenate([r[name] for r in results]) for name in OUTPUT_NAMES)


def _write_onnx(tflite_path: str, path: str) -> None:
  """ONNX from a TFLite model (tf2onnx), its input and outputs renamed to the signature's."""
  import onnx
  import tf2onnx
  proto, _ = tf2onnx.convert.from_tflite(tflite_path, opset=ONNX_OPSET)
  graph = proto.graph
  renames = {graph.input[0].name: INPUT_NAME}
  renames.update({o.name: name for o, name in zip(graph.output, OUTPUT_NAMES)})
  for value in [*graph.input, *graph.output]:
    value.name = renames.get(value.name, value.name)
  for node in graph.node:
    node.input[:] = [renames.get(n, n) for n in node.input]
    node.output[:] = [renames.get(n, n) for n in node.output]
  onnx.checker.check_model(proto)
  onnx.save(proto, path)


def _run_onnx(path: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  import onnxruntime
  session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
  return tuple(session.run(list(OUTPUT_NAMES), {INPUT_NAME: images}))


def _run_saved_model(path: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  import tensorflow as tf
  serve = tf.saved_model.load(path).signatures["serving_default"]
  out = serve(**{INPUT_NAME: tf.constant(images)})
  return tuple(out[name].numpy() for name in OUTPUT_NAMES)


def _run_stablehlo(path: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  with open(path, "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  return tuple(np.asarray(a) for a in exported.call(images))


# ---------------------------------------------------------------------------- host: the command

def with_export_step(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` whose checkpoint.use names export.step when that is set (otherwise checkpoint.use
  decides: latest by default, or best), as eval and predict choose theirs."""
  if not config.export.step:
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  config.checkpoint.use = str(config.export.step)
  return config


def export_variables(model: nn.Module, variables: dict, out_dir: str, *, channels: int,
                     multiple: int, min_size: int, image_size: int, info: dict,
                     with_onnx: bool = True,
                     normalization: str = image_io.DEFAULT_NORMALIZATION) -> dict:
  """Writes every artefact of `model` with `variables` into `out_dir` (which must exist) and
  checks each; returns the export.json record (also written)."""
  import tensorflow as tf

  probabilities_fn = functools.partial(serving_probabilities, variables, model=model,
                                       normalization=normalization)
  outputs_fn = jax.jit(functools.partial(serving_outputs, variables, model=model,
                                         multiple=multiple, min_size=min_size,
                                         normalization=normalization))
  sizes = probe_sizes(image_size)
  # Dynamic runtimes see a batch of 2 at the first size and 1 at the second; TFLite's fixed
  # input, 2 images of the first size one by one.
  probes = [probe_images(2, *sizes[0], channels, seed=0), probe_images(1, *sizes[1], channels,
                                                                       seed=1)]
  with conv_ops.backend("xla"):
    jitted = jax.jit(probabilities_fn)
    references = [reference_outputs(jitted, p, multiple=multiple, min_size=min_size)
                  for p in probes]
  artefacts = {}

  def record(name, filename, checks, seconds):
    path = os.path.join(out_dir, filename)
    size = (sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
            if os.path.isdir(path) else os.path.getsize(path))
    artefacts[name] = {"file": filename, "bytes": size, "checks": checks,
                       "write_seconds": round(seconds, 2)}

  with conv_ops.backend("xla"):
    t0 = time.perf_counter()
    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"b, h, w, {channels}"), jnp.uint8)
    exported = jax.export.export(outputs_fn)(spec)
    with open(os.path.join(out_dir, "model.stablehlo"), "wb") as f:
      f.write(exported.serialize())
    outputs = [_run_stablehlo(os.path.join(out_dir, "model.stablehlo"), p) for p in probes]
    record("stablehlo", "model.stablehlo",
           _check("model.stablehlo", outputs, references, required=True), time.perf_counter() - t0)

    t0 = time.perf_counter()
    module, fixed = _tf_functions(probabilities_fn, channels=channels, multiple=multiple,
                                  min_size=min_size, image_size=image_size)
    saved = os.path.join(out_dir, "saved_model")
    tf.saved_model.save(module, saved, signatures={"serving_default": module.serve})
    outputs = [_run_saved_model(saved, p) for p in probes]
    record("saved_model", "saved_model",
           _check("saved_model", outputs, references, required=True), time.perf_counter() - t0)

    for variant, filename in (("float32", "model.tflite"), ("fp16", "model_fp16.tflite"),
                              ("int8", "model_int8.tflite")):
      t0 = time.perf_counter()
      path = os.path.join(out_dir, filename)
      with open(path, "wb") as f:
        f.write(_tflite_bytes(module, fixed, variant))
      outputs = [_run_tflite(path, probes[0])]
      record(f"tflite_{variant}", filename,
             _check(filename, outputs, references[:1], required=variant != "int8"),
             time.perf_counter() - t0)

    if with_onnx:
      t0 = time.perf_counter()
      onnx_path = os.path.join(out_dir, "model.onnx")
      with tempfile.TemporaryDirectory() as scratch:
        dynamic_tflite = os.path.join(scratch, "dynamic.tflite")
        with open(dynamic_tflite, "wb") as f:
          f.write(_tflite_bytes(module, module.serve, "float32"))
        _write_onnx(dynamic_tflite, onnx_path)
      try:
        outputs = [_run_onnx(onnx_path, p) for p in probes]
      except Exception as e:  # onnxruntime's own error types
        # DeepLabv3+'s bilinear resizes reach ONNX as MatMuls with shapes tf2onnx gets wrong.
        reason = " ".join(str(e).split())[:240]
        raise ExportError(f"model.onnx: onnxruntime cannot run tf2onnx's conversion ({reason}); "
                          "--config.export.onnx=False exports the other artefacts") from None
      record("onnx", "model.onnx", _check("model.onnx", outputs, references, required=True),
             time.perf_counter() - t0)

  description = {
      **info,
      "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC", "channels": channels,
                "height_width": f"any; mirrored (numpy's 'reflect') up to at least {min_size} and "
                                f"a multiple of {multiple} in the graph, outputs cropped back",
                "model_multiple": multiple, "min_size": min_size,
                "tflite_shape": [1, image_size, image_size, channels],
},
      "outputs": {OUTPUT_NAMES[0]: "int32 [N, H, W] class ids (first maximum of probabilities)",
                  OUTPUT_NAMES[1]: "float32 [N, H, W, K] per-class probabilities"},
      "normalization": {"inside_the_graph": True, **image_io.NORMALIZATIONS[normalization]},
      "required_agreement": MIN_AGREEMENT,
      "artefacts": artefacts,
  }
  with open(os.path.join(out_dir, "export.json"), "w") as f:
    json.dump(description, f, indent=2)
    f.write("\n")
  return description


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Exports WORKDIR's newest checkpoint (or export.step) into WORKDIR/export; returns the
  export.json record. ExportError or ConfigError (one line) if it cannot."""
  from seg_jax import train  # imports TensorFlow (datasets); keep this module light without it
  if config_lib.task(config) == "volumetric":
    raise config_lib.ConfigError(
        f"--mode=export writes 2D semantic models only; model.name={config.model.name!r} "
        "segments volumes (its NIfTI resampling and sliding windows are not in a graph yet)")
  if config_lib.task(config) != "semantic":
    raise config_lib.ConfigError(
        f"--mode=export writes semantic models only; model.name={config.model.name!r} is a "
        "detector (its fixed top-k, NMS and RoI ops have no TFLite/ONNX converters here)")
  if jax.process_count() > 1:
    raise config_lib.ConfigError("--mode=export runs in a single process")
  multiple = models.input_multiple(config)
  image_size = config.export.image_size or config.dataset.image_size
  min_size = config.export.min_size or config.predict.tile_size
  trainer, variables, step = train.restore_for_inference(with_export_step(config), workdir)
  variables = jax.device_get(variables)
  info = workdir_lib.read_model_info(workdir)
  normalization = image_io.normalization_name(info.get("input_normalization"))
  info = {"model": info["model"], "class_names": info["class_names"],
          "num_classes": info["num_classes"], "step": step, "workdir": os.path.abspath(workdir)}

  final = os.path.join(workdir, EXPORT_DIR)
  partial = tempfile.mkdtemp(prefix=f"{EXPORT_DIR}.partial-", dir=workdir)
  try:
    t0 = time.perf_counter()
    description = export_variables(trainer.model, variables, partial, channels=trainer.channels,
                                   multiple=multiple, min_size=min_size, image_size=image_size,
                                   info=info, with_onnx=config.export.onnx,
                                   normalization=normalization)
    seconds = time.perf_counter() - t0
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  old = None
  if os.path.exists(final):
    old = final + f".old-{os.getpid()}"
    os.replace(final, old)
  os.replace(partial, final)
  if old:
    shutil.rmtree(old, ignore_errors=True)

  lines = [f"exported the step-{step} checkpoint of {workdir} to {final} in {seconds:.0f} s"]
  for name, a in description["artefacts"].items():
    worst = min(c["agreement"] for c in a["checks"])
    lines.append(f"  {a['file']:<20}{a['bytes'] / 1e6:8.2f} MB   class ids agree with JAX on "
                 f"{worst:.4%} of probe pixels")
  print("\n".join(lines))
  return description
