"""--mode=export: a workdir's checkpoint as files that run without seg_jax, each checked.

  python main.py --workdir=runs/unet --mode=export [--config.export.step=N]

Writes WORKDIR/export/ (replacing an older export only once every check passed):

  saved_model/        TF SavedModel, signature `serving_default`: image uint8 [N, H, W, C]
                      (dynamic N, H, W) -> classes int32 [N, H, W], probabilities float32
                      [N, H, W, K]
  model.onnx          the same signature for onnxruntime (dynamic N, H, W); export.onnx=False
                      leaves it out
  model.tflite        the same at a fixed [1, S, S, C] input (S = export.image_size), float32;
  model_fp16.tflite   float16 weights; model_int8.tflite: int8 weights (dynamic range)
  model.stablehlo     `jax.export` serialisation (dynamic N, H, W) for serving from JAX
  export.json         class names, input rules, normalisation, step, every artefact's checks,
                      the int8 model's validation Dice beside the JAX model's, and what was
                      not exported and why

Any H and W: inside the graph the image is mirrored (numpy's 'reflect') up to at least
export.min_size (default predict.tile_size) and a multiple of the model's input multiple, and
the outputs are cropped back. That is how predict pads an image smaller than a tile, so for
such images the class ids equal predict's label PNG; larger images are segmented whole where
predict blends tiles (the README measures the difference).

Volumetric models (the 3D U-Net) take float32 volumes [N, D, H, W, C] as --mode=predict
prepares NIfTI scans (resampled and normalised outside the graph, as model.json's
volume_preprocessing says), zero-padded in the graph up to the model's input multiples (0 is
the normalised mean; the sliding windows pad so) and cropped back; outputs [N, D, H, W] and
[N, D, H, W, K]. SavedModel and StableHLO are required; TF 2.21's TFLite converter cannot
legalise their 8-D depth-to-space transposes (TFLite: at most 6-D) nor, past those, the 3-D
convolutions, so TFLite and ONNX (made from TFLite) are left out with that one-line reason.

The traced functions (`serving_probabilities`, `serving_outputs`) are pure; they normalise as
training did (`image_io.NORMALIZATION`) and map logits to probabilities with predict's own
`logits_to_probabilities`. Class ids are the first maximum of the probabilities, as predict
writes them. Convolutions are traced with the "xla" backend: a oneDNN custom call cannot be
serialised.

Converters (all kept projects): jax2tf (native StableHLO serialisation) for the SavedModel;
TF's TFLiteConverter for TFLite; tf2onnx from a dynamic-shape TFLite model for ONNX (tf2onnx
cannot read the SavedModel's XlaCallModule op; jax2onnx would downgrade orbax-checkpoint).

Each artefact is loaded by its own runtime (TF, the TFLite interpreter, onnxruntime,
`jax.export.deserialize`) on probe inputs of two sizes and compared with the JAX model:
class ids must agree on >= 99.9% of the decided pixels (the int8 model's agreement is reported
only, with its Dice on up to export.dice_images validation images of the TFLite size).
Detectors are refused in one line.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
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
from seg_jax import metrics
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
                          normalization: str | None = image_io.DEFAULT_NORMALIZATION
                          ) -> jax.Array:
  """uint8 [N, H, W, C] images -> float32 [N, H, W, K] per-class probabilities; the model's
  input is `normalization`'s (model.input_normalization), computed as image_io.normalize does.
  normalization=None: the inputs are model inputs already (volumes, float32 [N, D, H, W, C])."""
  if normalization is None:
    x = images.astype(jnp.float32)
  else:
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


def serving_outputs(variables: dict, images: jax.Array, *, model: nn.Module,
                    multiples: tuple[int, ...], min_size: int,
                    normalization: str | None = image_io.DEFAULT_NORMALIZATION
                    ) -> tuple[jax.Array, jax.Array]:
  """(class ids int32 [N, *S], probabilities float32 [N, *S, K]) of inputs [N, *S, C] of any
  size S: images mirrored up to `padded_size` as predict pads an image smaller than a tile,
  volumes (normalization=None) zero-padded as the sliding windows pad them; cropped back."""
  spatial = images.shape[1:-1]
  padded = images
  for axis, (size, multiple) in enumerate(zip(spatial, multiples), start=1):
    target = padded_size(size, multiple=multiple, min_size=min_size)
    if normalization is None:
      pads = [(0, 0)] * images.ndim
      pads[axis] = (0, target - size)
      padded = jnp.pad(padded, pads)
    else:
      padded = jnp.take(padded, reflect_indices(size, target, xp=_JNP), axis=axis)
  probabilities = serving_probabilities(variables, padded, model=model,
                                        normalization=normalization)
  probabilities = probabilities[(slice(None), *(slice(0, n) for n in spatial))]
  return jnp.argmax(probabilities, axis=-1).astype(jnp.int32), probabilities


# ---------------------------------------------------------------------------- host: probes, checks

def probe_sizes(fixed_size: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Two spatial probe sizes: the fixed export size, and one of odd sizes beside it (padded in
  the graph)."""
  return tuple(fixed_size), (max(1, fixed_size[0] - 3), *(n + 5 for n in fixed_size[1:]))


def reference_outputs(probabilities_fn, images: np.ndarray, *, multiples: tuple[int, ...],
                      min_size: int, volumes: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """What the artefacts must compute, the padding done by numpy: mirrored (volumes: zeros) up
  to `padded_size`, the model, cropped back; (class ids, probabilities)."""
  spatial = images.shape[1:-1]
  pads = [(0, padded_size(n, multiple=m, min_size=min_size) - n)
          for n, m in zip(spatial, multiples)]
  padded = np.pad(images, [(0, 0), *pads, (0, 0)], mode="constant" if volumes else "reflect")
  probabilities = np.asarray(probabilities_fn(padded))[(slice(None),
                                                        *(slice(0, n) for n in spatial))]
  return probabilities.argmax(-1), probabilities


def probe_images(count: int, *size_and_channels: int, seed: int) -> np.ndarray:
  """uint8 [count, *S, C] (size_and_channels = *S, C): smooth random fields (blocks of 4 px)
  plus pixel noise."""
  *spatial, channels = size_and_channels
  rng = np.random.default_rng(seed)
  smooth = rng.integers(0, 256, (count, *(-(-n // 4) for n in spatial), channels))
  for axis, n in enumerate(spatial, start=1):
    smooth = np.repeat(smooth, 4, axis=axis)[(slice(None),) * axis + (slice(0, n),)]
  noise = rng.integers(-20, 21, smooth.shape)
  return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def probe_volumes(count: int, *size_and_channels: int, seed: int) -> np.ndarray:
  """float32 [count, D, H, W, C]: `probe_images` z-scored, as normalised volumes are."""
  fields = probe_images(count, *size_and_channels, seed=seed).astype(np.float32)
  return (fields - fields.mean()) / fields.std()


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
    record = {"size": list(ref_classes.shape[1:]), "batch": int(ref_classes.shape[0]),
              "agreement": agreement(classes, ref_classes),
              "decided_agreement": decided_agreement(classes, ref_classes, ref_probabilities),
              "undecided_fraction": float(1.0 - np.mean(decided(ref_probabilities))),
              "max_probability_error": float(np.max(np.abs(probabilities - ref_probabilities)))}
    records.append(record)
    if required and record["decided_agreement"] < MIN_AGREEMENT:
      size = "x".join(map(str, record["size"]))
      raise ExportError(f"{name}: class ids agree with the JAX model on "
                        f"{record['decided_agreement']:.4%} of the decided pixels of a {size} "
                        f"probe (needs {MIN_AGREEMENT:.1%}; all pixels: "
                        f"{record['agreement']:.4%}); nothing was written")
  return records


# ---------------------------------------------------------------------------- host: converters

def tf_functions(probabilities_fn, serving: "ServingInput"):
  """A tf.Module whose `serve` maps inputs of any size to {classes, probabilities} (as
  `serving_outputs`), and the same tf.function at the fixed TFLite size (kept out of the module,
  so that the SavedModel holds the model once)."""
  import tensorflow as tf
  from jax.experimental import jax2tf

  dims = ", ".join(f"{m}*s{i}" for i, m in enumerate(serving.multiples))
  converted = jax2tf.convert(probabilities_fn, with_gradient=False,
                             polymorphic_shapes=[f"(b, {dims}, {serving.channels})"])
  tf_ops = _tf_namespace()

  def outputs(inputs):
    sizes = [tf.shape(inputs)[axis] for axis in range(1, 1 + len(serving.multiples))]
    padded = inputs
    for axis, (size, multiple) in enumerate(zip(sizes, serving.multiples), start=1):
      target = padded_size(size, multiple=multiple, min_size=serving.min_size,
                           maximum=tf.maximum)
      if serving.volumes:
        pads = [[0, 0]] * len(inputs.shape)
        pads[axis] = [0, target - size]
        padded = tf.pad(padded, pads)
      else:
        padded = tf.gather(padded, reflect_indices(size, target, xp=tf_ops), axis=axis)
    probabilities = converted(padded)[(slice(None), *(slice(None, n) for n in sizes))]
    # First maximum, as numpy's argmax in predict; a TF op so that TFLite and ONNX keep it.
    return {OUTPUT_NAMES[0]: tf.argmax(probabilities, axis=-1, output_type=tf.int32),
            OUTPUT_NAMES[1]: probabilities}

  rank = len(serving.multiples)
  module = tf.Module()
  module.serve = tf.function(outputs, autograph=False, input_signature=[
      tf.TensorSpec([None] * (1 + rank) + [serving.channels], serving.dtype, name=INPUT_NAME)])
  fixed = tf.function(outputs, autograph=False, input_signature=[
      tf.TensorSpec(serving.tflite_shape, serving.dtype, name=INPUT_NAME)])
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


def _onnx_from_tflite(tflite_path: str, path: str) -> None:
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


def write_onnx(module, path: str) -> None:
  """model.onnx of `tf_functions`' module: through a dynamic-shape TFLite model (tf2onnx cannot
  read the SavedModel's XlaCallModule op)."""
  with tempfile.TemporaryDirectory() as scratch:
    dynamic_tflite = os.path.join(scratch, "dynamic.tflite")
    with open(dynamic_tflite, "wb") as f:
      f.write(_tflite_bytes(module, module.serve, "float32"))
    _onnx_from_tflite(dynamic_tflite, path)


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


@dataclasses.dataclass(frozen=True)
class ServingInput:
  """What the exported graphs take. Images (`normalization` a name of image_io.NORMALIZATIONS):
  uint8 [N, H, W, C], normalised inside, mirrored up to at least `min_size` and the multiples.
  Volumes (normalization=None): float32 [N, D, H, W, C], resampled and normalised as the
  training cases were (outside the graph), zero-padded up to the multiples."""
  channels: int
  multiples: tuple[int, ...]      # per spatial axis: the model's input multiples
  fixed_size: tuple[int, ...]     # TFLite's spatial input size
  min_size: int = 0
  normalization: str | None = image_io.DEFAULT_NORMALIZATION

  @property
  def volumes(self) -> bool:
    return self.normalization is None

  @property
  def dtype(self) -> str:
    return "float32" if self.volumes else "uint8"

  @property
  def tflite_shape(self) -> list[int]:
    return [1, *self.fixed_size, self.channels]

  def probes(self, count: int, size: tuple[int, ...], seed: int) -> np.ndarray:
    make = probe_volumes if self.volumes else probe_images
    return make(count, *size, self.channels, seed=seed)


def _write_checked(name: str, write, *, optional: bool, skipped: dict) -> bool:
  """Runs `write` (which writes and checks one artefact). An optional artefact that cannot be
  converted, run or checked is left out: False, its one-line reason in `skipped`."""
  if not optional:
    write()
    return True
  try:
    write()
    return True
  except Exception as e:  # the converters' and runtimes' own error types, or ExportError
    message = str(e)
    # MLIR converter errors come wrapped in pages of source locations; the diagnosis follows
    # the first "error: ".
    found = re.search(r"error: ([^\n]+)", message)
    reason = found.group(1) if found else " ".join(message.split())
    skipped[name] = f"{type(e).__name__}: {reason[:240]}"
    return False


def validation_dice(classes: np.ndarray, labels: np.ndarray, *, num_classes: int,
                    ignore_label: int) -> dict:
  """Dice of class ids against labels over all the images together (the eval's `eval/dice`:
  the mean over classes present in truth or prediction, and over the foreground ones)."""
  matrix = metrics.confusion_matrix(classes, labels, num_classes=num_classes,
                                    ignore_label=ignore_label)
  scores = metrics.scores_from_confusion(np.asarray(matrix))
  return {"dice": scores["mean_dice"], "dice_foreground": scores["mean_dice_foreground"]}


def export_variables(model: nn.Module, variables: dict, out_dir: str, serving: ServingInput, *,
                     info: dict, with_onnx: bool = True, validation: dict | None = None) -> dict:
  """Writes every artefact of `model` with `variables` into `out_dir` (which must exist) and
  checks each; returns the export.json record (also written). Images: every artefact is
  required. Volumes: SavedModel and StableHLO are; TFLite and ONNX are written where the
  converters carry rank-5 convolutions, else export.json gives the reason.

  `validation` ({images [M, *fixed_size, C], labels [M, *fixed_size], ignore_label, source}):
  the int8 TFLite model's Dice on them beside the JAX model's."""
  import tensorflow as tf

  multiples, min_size = serving.multiples, serving.min_size
  probabilities_fn = functools.partial(serving_probabilities, variables, model=model,
                                       normalization=serving.normalization)
  outputs_fn = jax.jit(functools.partial(serving_outputs, variables, model=model,
                                         multiples=multiples, min_size=min_size,
                                         normalization=serving.normalization))
  sizes = probe_sizes(serving.fixed_size)
  # Dynamic runtimes see a batch of 2 at the first size and 1 at the second; TFLite's fixed
  # input, 2 inputs of the first size one by one.
  probes = [serving.probes(2, sizes[0], seed=0), serving.probes(1, sizes[1], seed=1)]
  with conv_ops.backend("xla"):
    jitted = jax.jit(probabilities_fn)
    reference = functools.partial(reference_outputs, jitted, multiples=multiples,
                                  min_size=min_size, volumes=serving.volumes)
    references = [reference(p) for p in probes]
  artefacts, skipped = {}, {}

  def record(name, filename, checks, seconds, **extra):
    path = os.path.join(out_dir, filename)
    size = (sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
            if os.path.isdir(path) else os.path.getsize(path))
    artefacts[name] = {"file": filename, "bytes": size, "checks": checks,
                       "write_seconds": round(seconds, 2), **extra}

  def remove(filename):
    path = os.path.join(out_dir, filename)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)

  with conv_ops.backend("xla"):
    t0 = time.perf_counter()
    dims = ", ".join(f"s{i}" for i in range(len(multiples)))
    spec = jax.ShapeDtypeStruct(
        jax.export.symbolic_shape(f"b, {dims}, {serving.channels}"), jnp.dtype(serving.dtype))
    exported = jax.export.export(outputs_fn)(spec)
    with open(os.path.join(out_dir, "model.stablehlo"), "wb") as f:
      f.write(exported.serialize())
    outputs = [_run_stablehlo(os.path.join(out_dir, "model.stablehlo"), p) for p in probes]
    record("stablehlo", "model.stablehlo",
           _check("model.stablehlo", outputs, references, required=True), time.perf_counter() - t0)

    t0 = time.perf_counter()
    module, fixed = tf_functions(probabilities_fn, serving)
    saved = os.path.join(out_dir, "saved_model")
    tf.saved_model.save(module, saved, signatures={"serving_default": module.serve})
    outputs = [_run_saved_model(saved, p) for p in probes]
    record("saved_model", "saved_model",
           _check("saved_model", outputs, references, required=True), time.perf_counter() - t0)

    for variant, filename in (("float32", "model.tflite"), ("fp16", "model_fp16.tflite"),
                              ("int8", "model_int8.tflite")):
      def write_tflite(variant=variant, filename=filename):
        t0 = time.perf_counter()
        path = os.path.join(out_dir, filename)
        with open(path, "wb") as f:
          f.write(_tflite_bytes(module, fixed, variant))
        outputs = [_run_tflite(path, probes[0])]
        checks = _check(filename, outputs, references[:1], required=variant != "int8")
        extra = {}
        if variant == "int8" and validation is not None:
          extra["validation"] = _int8_validation(path, reference, validation,
                                                 num_classes=info["num_classes"])
        record(f"tflite_{variant}", filename, checks, time.perf_counter() - t0, **extra)
      if "model.tflite" in skipped:  # the weight types do not change which ops convert
        skipped[filename] = f"as model.tflite: {skipped['model.tflite']}"
      elif not _write_checked(filename, write_tflite, optional=serving.volumes, skipped=skipped):
        remove(filename)

    if with_onnx:
      def write_checked_onnx():
        t0 = time.perf_counter()
        onnx_path = os.path.join(out_dir, "model.onnx")
        write_onnx(module, onnx_path)
        try:
          outputs = [_run_onnx(onnx_path, p) for p in probes]
        except Exception as e:  # onnxruntime's own error types
          reason = " ".join(str(e).split())[:240]
          raise ExportError(f"model.onnx: onnxruntime cannot run tf2onnx's conversion "
                            f"({reason}); --config.export.onnx=False exports the other "
                            "artefacts") from None
        record("onnx", "model.onnx", _check("model.onnx", outputs, references, required=True),
               time.perf_counter() - t0)
      if not _write_checked("model.onnx", write_checked_onnx, optional=serving.volumes,
                            skipped=skipped):
        remove("model.onnx")

  spatial = "NDHWC" if serving.volumes else "NHWC"
  if serving.volumes:
    rules = (f"any D, H, W; zero-padded (0 is the normalised mean) up to multiples of "
             f"{list(multiples)} in the graph, outputs cropped back")
    normalization = {"inside_the_graph": False, "expects": "float32 volumes resampled to "
                     "the training spacing and normalised as model.json's volume_preprocessing "
                     "says (CT: clipped, then the training mean and std; otherwise z-scored per "
                     "scan and channel), as --mode=predict prepares NIfTI scans"}
  else:
    rules = (f"any; mirrored (numpy's 'reflect') up to at least {min_size} and a multiple of "
             f"{multiples[0]} in the graph, outputs cropped back")
    normalization = {"inside_the_graph": True, **image_io.NORMALIZATIONS[serving.normalization]}
  description = {
      **info,
      "input": {"name": INPUT_NAME, "dtype": serving.dtype, "layout": spatial,
                "channels": serving.channels, "spatial_size": rules,
                "model_multiple": multiples[0] if len(set(multiples)) == 1 else list(multiples),
                "min_size": min_size, "tflite_shape": serving.tflite_shape},
      "outputs": {OUTPUT_NAMES[0]: f"int32 [{', '.join(spatial[:-1])}] class ids (first maximum "
                                   "of probabilities)",
                  OUTPUT_NAMES[1]: f"float32 [{', '.join(spatial[:-1])}, K] per-class "
                                   "probabilities"},
      "normalization": normalization,
      "required_agreement": MIN_AGREEMENT,
      "artefacts": artefacts,
      "not_exported": skipped,
  }
  with open(os.path.join(out_dir, "export.json"), "w") as f:
    json.dump(description, f, indent=2)
    f.write("\n")
  return description


def _int8_validation(path: str, reference, validation: dict, *, num_classes: int) -> dict:
  """The int8 TFLite model's Dice on the validation images beside the JAX model's (same images,
  same in-graph padding), and their class-id agreement."""
  images, labels = validation["images"], validation["labels"]
  int8_classes = _run_tflite(path, images)[0]
  jax_classes = reference(images)[0]
  dice = functools.partial(validation_dice, labels=labels, num_classes=max(num_classes, 2),
                           ignore_label=validation["ignore_label"])
  return {"images": int(len(images)), "source": validation["source"],
          "int8": dice(int8_classes), "jax": dice(jax_classes),
          "agreement": agreement(int8_classes, jax_classes)}


def validation_examples(config: ml_collections.ConfigDict, fixed_size: tuple[int, ...]
                        ) -> dict | None:
  """The first export.dice_images uint8 images of the dataset's eval split whose size is the
  TFLite input's, with their labels, as stored (no resize); None if there are none."""
  from seg_jax.data import pipeline
  if not config.export.dice_images:
    return None
  pipeline.configure(config)
  builder, _ = pipeline.prepare_dataset(config)
  split = config.dataset.eval_split
  images, labels = [], []
  for example in pipeline.stored_examples(config, builder, split):
    if example["image"].shape[:2] == tuple(fixed_size) and example["image"].dtype == np.uint8:
      images.append(example["image"])
      labels.append(example["mask"])
      if len(images) == config.export.dice_images:
        break
  if not images:
    return None
  return {"images": np.stack(images), "labels": np.stack(labels),
          "ignore_label": config.dataset.ignore_label,
          "source": f"the first {len(images)} {fixed_size[0]}x{fixed_size[1]} images of "
                    f"{config.dataset.name}'s {split} split"}


def serving_input(config: ml_collections.ConfigDict, channels: int, normalization: str
                  ) -> ServingInput:
  """The exported graphs' input for `config`'s model (images or volumes)."""
  if config_lib.task(config) == "volumetric":
    from seg_jax.models import unet3d
    multiples = unet3d.input_multiples(config.model.depth, models.as_tuples(config.model.strides),
                                       tuple(config.model.first_strides))
    return ServingInput(channels=channels, multiples=multiples,
                        fixed_size=tuple(config.dataset.patch_size), normalization=None)
  multiple = models.input_multiple(config)
  image_size = config.export.image_size or config.dataset.image_size
  return ServingInput(channels=channels, multiples=(multiple, multiple),
                      fixed_size=(image_size, image_size),
                      min_size=config.export.min_size or config.predict.tile_size,
                      normalization=normalization)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Exports WORKDIR's newest checkpoint (or export.step) into WORKDIR/export; returns the
  export.json record. ExportError or ConfigError (one line) if it cannot."""
  from seg_jax import train  # imports TensorFlow (datasets); keep this module light without it
  if config_lib.task(config) not in ("semantic", "volumetric"):
    raise config_lib.ConfigError(
        f"--mode=export writes semantic models only; model.name={config.model.name!r} is a "
        "detector (its fixed top-k, NMS and RoI ops have no TFLite/ONNX converters here)")
  if jax.process_count() > 1:
    raise config_lib.ConfigError("--mode=export runs in a single process")
  trainer, variables, step = train.restore_for_inference(with_export_step(config), workdir)
  variables = jax.device_get(variables)
  info = workdir_lib.read_model_info(workdir)
  serving = serving_input(config, trainer.channels,
                          image_io.normalization_name(info.get("input_normalization")))
  validation = None if serving.volumes else validation_examples(config, serving.fixed_size)
  described = {"model": info["model"], "class_names": info["class_names"],
               "num_classes": info["num_classes"], "step": step,
               "workdir": os.path.abspath(workdir)}
  if "volume_preprocessing" in info:
    described["volume_preprocessing"] = info["volume_preprocessing"]
  info = described

  final = os.path.join(workdir, EXPORT_DIR)
  partial = tempfile.mkdtemp(prefix=f"{EXPORT_DIR}.partial-", dir=workdir)
  try:
    t0 = time.perf_counter()
    description = export_variables(trainer.model, variables, partial, serving, info=info,
                                   with_onnx=config.export.onnx, validation=validation)
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
    if "validation" in a:
      v = a["validation"]
      lines.append(f"  {'':<20}{'':>11}   Dice {v['int8']['dice']:.4f} (JAX: "
                   f"{v['jax']['dice']:.4f}) on {v['source']}")
  for filename, reason in description["not_exported"].items():
    lines.append(f"  {filename:<20}not exported: {reason}")
  print("\n".join(lines))
  return description
