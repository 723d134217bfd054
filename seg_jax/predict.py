"""--mode=predict: segment image files of any size with the newest checkpoint.

  python main.py --workdir=runs/unet --mode=predict \\
      --config.predict.input='scans/*.png' [--config.predict.output=OUT]

The model, its classes and input channels come from the workdir (`seg_jax/workdir.py`): the
training data need not exist.

For every input image (sorted by path) the output directory (default
WORKDIR/predictions) receives:

  <stem>_label.png    class ids, the input's height and width (8-bit; 16-bit above 256 classes)
  <stem>_overlay.png  the image with class colours blended over it, a legend below
  <stem>_probs.npy    with predict.save_probabilities: float16 [H, W, K] per-class probabilities

The work is split in two:

- device side (pure, jitted, compiled once per tile shape): `tile_probabilities`
  maps a fixed-size batch of normalised tiles to per-class probabilities,
  averaged over flipped copies for test-time augmentation (TTA);
- host side: `predict_image` cuts an image into overlapping tiles
  (`seg_jax/tiling.py`), feeds them in fixed-size batches (the last one
  padded), and blends the results band by band; `run` finds and reads the
  files and writes the outputs as rows are finished, so host memory grows
  with tile_size x W x K, not H x W x K.

Detectors (Mask R-CNN, Faster R-CNN; `run_detector`) write instead <stem>_overlay.png (masks,
boxes, class names, scores), <stem>_instances.png (16-bit instance ids by score) and one
detections.json (COCO results with the training data's category ids) for all images.

Bad inputs: a file that cannot be read as an image, or whose channels the
model cannot take, is skipped with a warning naming it; the other files are
still segmented, and then `run` raises `DataError` naming the skipped files,
so the command ends with a non-zero exit status.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import sys
import time
from typing import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from seg_jax import config as config_lib
from seg_jax import parallel
from seg_jax import tiling
from seg_jax import visualize
from seg_jax import workdir as workdir_lib
from seg_jax.data import image_io
from seg_jax.data.errors import DataError
from seg_jax.ops import conv as conv_ops

# Flipped views averaged by each TTA mode: axes of an [N, H, W, C] batch (() = as is).
TTA_FLIPS = {"none": ((),), "hflip": ((), (2,)), "hvflip": ((), (2,), (1,), (1, 2))}


# ---------------------------------------------------------------------------- device side

def logits_to_probabilities(logits: jax.Array) -> jax.Array:
  """[..., K] logits -> [..., K] softmax; one binary (BCE) logit -> [1 - p, p]."""
  logits = logits.astype(jnp.float32)
  if logits.shape[-1] == 1:
    foreground = jax.nn.sigmoid(logits)
    return jnp.concatenate([1 - foreground, foreground], axis=-1)
  return jax.nn.softmax(logits, axis=-1)


def tile_probabilities(variables: dict, tiles: jax.Array, *, model: nn.Module,
                       tta: str) -> jax.Array:
  """Per-class probabilities float32 [N, T, T, K] of normalised tiles float32 [N, T, T, C].

  With TTA, the model sees every flipped view in one batch; each view's
  probabilities are flipped back and the views averaged.
  """
  flips = TTA_FLIPS[tta]
  views = jnp.concatenate([jnp.flip(tiles, axes) if axes else tiles for axes in flips], axis=0)
  probabilities = logits_to_probabilities(model.apply(variables, views, train=False))
  n = tiles.shape[0]
  total = sum(jnp.flip(probabilities[i * n:(i + 1) * n], axes) if axes else
              probabilities[i * n:(i + 1) * n] for i, axes in enumerate(flips))
  return total / len(flips)


def model_input_channels(model: nn.Module, variables: dict, tile_size: int) -> int:
  """The number of image channels the model's parameters take (3 tried first).

  Found by tracing (no computation), so any model works without knowing where
  its first convolution lives. ConfigError if no channel count fits (then the
  tile size is what the model cannot take).
  """
  errors = []
  for channels in (3, 1, 4, 2, *range(5, 17)):
    probe = jax.ShapeDtypeStruct((1, tile_size, tile_size, channels), jnp.float32)
    try:
      jax.eval_shape(functools.partial(model.apply, train=False), variables, probe)
      return channels
    except Exception as e:  # a shape mismatch, reported as various error types
      errors.append(e)
  first = " ".join(str(errors[0]).split())[:300]
  raise config_lib.ConfigError(
      f"config.predict.tile_size={tile_size}: the model takes no {tile_size}x{tile_size} input "
      f"with 1 to 16 channels (with 3: {first})")


def make_tile_function(model: nn.Module, variables: dict, *, tta: str, batch_size: int,
                       tile_size: int, channels: int, mesh, matmul_precision: str = "default",
                       conv_backend: str = "auto") -> Callable[[np.ndarray], jax.Array]:
  """tiles float32 [batch_size, T, T, C] (numpy) -> probabilities [batch_size, T, T, K] on device.

  Compiled here, once, at `matmul_precision` and on `conv_backend` (`seg_jax/ops/conv.py`):
  every image of every size reuses it. Calls return immediately (asynchronous dispatch), so
  the host can blend the previous batch while the device works on the next.
  """
  data = parallel.batch_sharding(mesh)
  jitted = jax.jit(functools.partial(tile_probabilities, model=model, tta=tta),
                   in_shardings=(parallel.replicated(mesh), data), out_shardings=data)
  tiles_shape = jax.ShapeDtypeStruct((batch_size, tile_size, tile_size, channels), jnp.float32,
                                     sharding=data)
  variables = jax.device_put(variables, parallel.replicated(mesh))
  with jax.default_matmul_precision(matmul_precision), conv_ops.backend(conv_backend):
    compiled = jitted.lower(variables, tiles_shape).compile()
  return lambda tiles: compiled(variables, jax.device_put(tiles, data))


# ---------------------------------------------------------------------------- host side: one image

def predict_image(image: np.ndarray, tile_fn: Callable[[np.ndarray], np.ndarray], *,
                  num_classes: int, tile_size: int, overlap: float, batch_size: int,
                  progress: Callable[[int, int], None] | None = None,
                  normalization: str | dict = image_io.DEFAULT_NORMALIZATION
                  ) -> Iterator[tuple[int, np.ndarray]]:
  """Blended per-class probabilities of a uint8/uint16 [H, W, C] image, band by band.

  Yields (first row, float32 [rows, W, K]) from top to bottom; together the
  bands cover every row once. Tiles are normalised as the workdir records (`normalization`: a
  name or model.json's record, `image_io.normalize`). `tile_fn` maps float32 [batch_size, T, T, C]
  to [batch_size, T, T, K]; padding tiles fill the last batch.
  """
  height, width, channels = image.shape
  plan = tiling.plan_tiles(height, width, tile_size, overlap)
  blender = tiling.RowBandBlender(plan, num_classes)
  positions = list(plan.positions())
  in_flight = None
  for start in range(0, len(positions), batch_size):
    chunk = positions[start:start + batch_size]
    # A fresh buffer per call: on CPU the device may use the numpy memory in place
    # while the host already fills the next batch.
    batch = np.zeros((batch_size, tile_size, tile_size, channels), np.float32)
    for i, (y, x) in enumerate(chunk):
      batch[i] = image_io.normalize(tiling.extract_tile(image, y, x, tile_size), normalization)
    result = tile_fn(batch)  # asynchronous: the device runs while the host blends below
    if in_flight is not None:
      yield from _blend(blender, *in_flight)
    in_flight = (result, len(chunk))
    if progress is not None:
      progress(start + len(chunk), len(positions))
  yield from _blend(blender, *in_flight)


def _blend(blender: tiling.RowBandBlender, result, count: int) -> Iterator[tuple[int, np.ndarray]]:
  probabilities = np.asarray(result)  # waits for the device
  for tile in probabilities[:count]:
    finished = blender.add(tile)
    if finished is not None:
      yield finished


def match_channels(image: np.ndarray, channels: int, path: str) -> np.ndarray:
  """The image with the model's channel count: grey is repeated for RGB models; else DataError."""
  if image.shape[-1] == channels:
    return image
  if image.shape[-1] == 1:
    return np.repeat(image, channels, axis=-1)
  raise DataError(f"{path}: the image has {image.shape[-1]} channels, the model takes {channels}")


def _display_range(image: np.ndarray) -> tuple[float, float]:
  """Intensity range mapped to 0..255 in overlays: 8-bit as is, 16-bit stretched.

  16-bit scans often use a few thousand levels of 65535; their 0.5th to
  99.5th percentiles (of at most ~1M sampled pixels) span the overlay instead.
  """
  if image.dtype == np.uint8:
    return 0.0, 255.0
  step = max(1, int(np.sqrt(image.shape[0] * image.shape[1] / 1e6)))
  lo, hi = np.percentile(image[::step, ::step], [0.5, 99.5])
  return float(lo), float(max(hi, lo + 1))


def _display_rows(rows: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
  if rows.dtype == np.uint8:
    return visualize.as_rgb(rows)
  lo, hi = value_range
  scaled = (rows.astype(np.float32) - lo) * (255.0 / (hi - lo))
  return visualize.as_rgb(np.clip(np.round(scaled), 0, 255).astype(np.uint8))


def write_outputs(image: np.ndarray, bands: Iterator[tuple[int, np.ndarray]], *, out_dir: str,
                  stem: str, num_classes: int, class_names: list[str] | None, ignore_label: int,
                  save_probabilities: bool) -> np.ndarray:
  """Consumes the probability bands of one image and writes its files; returns pixels per class.

  Label and overlay images are filled as rows finish (O(H x W), no class
  axis). The probabilities are appended to the .npy file band by band, so
  they are never held whole (a memory map would do the same, but its dirty
  pages count as the process's resident memory until written back). Files are
  written under temporary names and renamed when complete, so an
  interrupted run never leaves a truncated output behind a final name.
  """
  height, width = image.shape[:2]
  labels = np.empty((height, width), np.uint8 if num_classes <= 256 else np.uint16)
  overlay = np.empty((height, width, 3), np.uint8)
  value_range = _display_range(image)
  counts = np.zeros(num_classes, np.int64)
  paths = {kind: os.path.join(out_dir, f"{stem}_{kind}") for kind in ("label.png", "overlay.png",
                                                                        "probs.npy")}
  probs_path = paths["probs.npy"] + ".partial"
  with contextlib.ExitStack() as cleanup:
    probs_file = None
    if save_probabilities:
      probs_file = cleanup.enter_context(open(probs_path, "wb"))
      np.lib.format.write_array_header_1_0(probs_file, {
          "descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
          "shape": (height, width, num_classes)})
    rows_done = 0
    for first, band in bands:
      rows = slice(first, first + len(band))
      band_labels = band.argmax(axis=-1)
      labels[rows] = band_labels
      counts += np.bincount(band_labels.ravel(), minlength=num_classes)
      overlay[rows] = visualize.overlay(_display_rows(image[rows], value_range), band_labels,
                                        num_classes, ignore_label=ignore_label)
      if probs_file is not None:
        # Bands arrive top to bottom and rows are C-ordered: appending them fills the array.
        band.astype(np.float16).tofile(probs_file)
      rows_done += len(band)
    if rows_done != height:
      raise RuntimeError(f"{stem}: blending produced {rows_done} of {height} rows")

  if save_probabilities:
    os.replace(probs_path, paths["probs.npy"])
  _save_png(paths["label.png"], labels)
  present = [c for c in range(num_classes) if counts[c]]
  entries = visualize.legend_entries(present, class_names, num_classes, ignore_label)
  _save_png(paths["overlay.png"], visualize.with_legend(overlay, entries))
  return counts


def _save_png(path: str, array: np.ndarray) -> None:
  Image.fromarray(array).save(path + ".partial", format="PNG")
  os.replace(path + ".partial", path)


# ---------------------------------------------------------------------------- host side: files

def find_inputs(pattern: str) -> list[str]:
  """Image files named by a file, a directory (its images, not recursive) or a glob; sorted."""
  path = os.path.expanduser(pattern)
  if os.path.isfile(path):
    return [path]
  if os.path.isdir(path):
    matches = [os.path.join(path, name) for name in os.listdir(path)]
  else:
    matches = glob.glob(path, recursive=True)
  files = sorted(m for m in matches if os.path.isfile(m))
  images = [f for f in files if f.lower().endswith(image_io.IMAGE_EXTENSIONS)]
  if not images:
    found = f"{len(files)} files, none with an image extension" if files else "nothing"
    raise FileNotFoundError(f"config.predict.input={pattern!r} matches {found} "
                            f"({', '.join(image_io.IMAGE_EXTENSIONS)})")
  return images


def _check_unique_stems(files: list[str]) -> None:
  seen: dict[str, str] = {}
  for f in files:
    stem = os.path.splitext(os.path.basename(f))[0]
    if stem in seen:
      raise DataError(f"{seen[stem]} and {f} would both write {stem}_label.png; "
                      "predict them into different output directories")
    seen[stem] = f


def _progress_bar(files: list[str]):
  # tqdm draws only on a terminal (disable=None); logs and tests get the summary alone.
  import tqdm
  return tqdm.tqdm(files, desc="predict", unit="image", file=sys.stderr, disable=None,
                   dynamic_ncols=True)


def _fail_if_skipped(skipped: list[str], total: int) -> None:
  """Lists the skipped inputs and ends the run with a DataError (non-zero exit) if there were any."""
  if skipped:
    print(f"skipped {len(skipped)}:\n" + "\n".join(f"  {m}" for m in skipped))
    more = f" (and {len(skipped) - 1} more, listed above)" if len(skipped) > 1 else ""
    raise DataError(f"{len(skipped)} of {total} input images skipped: {skipped[0]}{more}")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Segments every file of config.predict.input with WORKDIR's newest checkpoint.

  Prints a short summary; returns {'predicted': [paths], 'skipped': [messages],
  'output': dir, 'seconds_per_image': float, 'step': int}.
  """
  from seg_jax import train  # imports TensorFlow (datasets); keep this module light without it
  p = config.predict
  if not p.input:
    raise config_lib.ConfigError("config.predict.input='': name the files to segment, e.g. "
                                 "--config.predict.input='images/*.png'")
  if jax.process_count() > 1:
    raise config_lib.ConfigError("--mode=predict runs in a single process (jax.process_count() "
                                 f"is {jax.process_count()})")
  if config_lib.task(config) == "volumetric":
    from seg_jax import nifti_predict  # NIfTI scans in, NIfTI labels out
    return nifti_predict.run(config, workdir)
  if config_lib.task(config) == "instance":
    return run_detector(config, workdir)
  if p.batch_size % jax.device_count():
    raise config_lib.ConfigError(f"config.predict.batch_size={p.batch_size}: must be a multiple "
                                 f"of the number of devices ({jax.device_count()})")
  files = find_inputs(p.input)
  _check_unique_stems(files)
  out_dir = os.path.expanduser(p.output) if p.output else os.path.join(workdir, "predictions")
  os.makedirs(out_dir, exist_ok=True)

  trainer, variables, step = train.restore_for_inference(config, workdir)
  num_classes = config.dataset.num_classes
  channels = model_input_channels(trainer.model, variables, p.tile_size)
  normalization = workdir_lib.read_model_info(workdir)["input_normalization"]
  t0 = time.perf_counter()
  tile_fn = make_tile_function(trainer.model, variables, tta=p.tta, batch_size=p.batch_size,
                               tile_size=p.tile_size, channels=channels, mesh=trainer.mesh,
                               matmul_precision=config.matmul_precision,
                               conv_backend=config.conv_backend)
  compile_s = time.perf_counter() - t0

  predicted, skipped = [], []
  t0 = time.perf_counter()
  bar = _progress_bar(files)
  for path in bar:
    stem = os.path.splitext(os.path.basename(path))[0]
    try:
      image = match_channels(image_io.read_image(path), channels, path)
    except DataError as e:
      message = " ".join(str(e).split())
      bar.write(f"warning: skipped {message}", file=sys.stderr)
      skipped.append(message)
      continue
    bands = predict_image(
        image, tile_fn, num_classes=num_classes, tile_size=p.tile_size, overlap=p.overlap,
        batch_size=p.batch_size, normalization=normalization,
        progress=lambda done, total: bar.set_postfix_str(f"{stem}: tile {done}/{total}"))
    write_outputs(image, bands, out_dir=out_dir, stem=stem, num_classes=num_classes,
                  class_names=trainer.class_names, ignore_label=config.dataset.ignore_label,
                  save_probabilities=p.save_probabilities)
    predicted.append(path)
  bar.close()
  seconds = time.perf_counter() - t0
  per_image = seconds / max(len(predicted), 1)

  print(f"predicted {len(predicted)} of {len(files)} images with the step-{step} checkpoint of "
        f"{workdir} in {seconds:.1f} s ({per_image:.2f} s/image; compile {compile_s:.1f} s)\n"
        f"tiles {p.tile_size} px, overlap {p.overlap:g}, tta {p.tta}; outputs in {out_dir}")
  _fail_if_skipped(skipped, len(files))
  return {"predicted": predicted, "skipped": skipped, "output": out_dir, "step": step,
          "seconds_per_image": per_image}


# ---------------------------------------------------------------------------- detectors

# Detector overlays of smaller images are enlarged by an integer factor to at least this side.
OVERLAY_MIN_SIDE = 512

def instance_id_map(boxes: np.ndarray, scores: np.ndarray, masks: np.ndarray | None,
                    size: tuple[int, int]) -> np.ndarray:
  """uint16 [H, W] instance ids of one image's kept detections: id k + 1 is the k-th best
  score, 0 is background; where detections overlap the better one wins. Without masks
  (Faster R-CNN) the boxes are filled."""
  height, width = size
  ids = np.zeros((height, width), np.uint16)
  order = np.argsort(-np.asarray(scores), kind="stable")
  for rank in range(len(order) - 1, -1, -1):   # worst first, so the best is painted last
    k = order[rank]
    if masks is not None:
      ids[np.asarray(masks[k]).astype(bool)] = rank + 1
    else:
      y0, x0, y1, x1 = np.round(boxes[k]).astype(int)
      ids[max(y0, 0):y1, max(x0, 0):x1] = rank + 1
  return ids


def run_detector(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """--mode=predict with a Mask R-CNN / Faster R-CNN workdir (from `run`, which checks the input).

  Every image is shown to the detector as evaluation shows it (dataset.resize and
  dataset.max_longer_side, padded to a
  multiple of dataset.eval_pad_multiple; one compiled step per canvas size) and the
  detections are mapped back to its own pixels. Writes per image <stem>_overlay.png
  (detections of score >= predict.score_threshold: masks, boxes, class names, scores) and
  <stem>_instances.png (uint16 ids by score, 0 = background), and for all images one
  detections.json in COCO results format (every detection the model keeps; category ids of the
  training data, e.g. the training JSON's; image_id = position in the sorted inputs, 1-based,
  with the file in 'file_name'). Bad files are skipped as in `run`.
  """
  import tensorflow as tf
  from seg_jax import coco_eval
  from seg_jax import train
  from seg_jax.data import pipeline
  from seg_jax.data import transforms
  p, d = config.predict, config.dataset
  files = find_inputs(p.input)
  _check_unique_stems(files)
  out_dir = os.path.expanduser(p.output) if p.output else os.path.join(workdir, "predictions")
  os.makedirs(out_dir, exist_ok=True)
  trainer, variables, step = train.restore_for_inference(config, workdir)
  normalization = workdir_lib.read_model_info(workdir)["input_normalization"]
  num_classes = d.num_classes
  category_ids = trainer.category_ids or list(range(1, num_classes))
  batch_rows = jax.device_count()
  detect = jax.jit(functools.partial(train.eval_step, model=trainer.model, config=config))
  fixed_canvas = tuple(d.eval_size) if tuple(d.eval_size) != (0, 0) else None

  results, predicted, skipped = [], [], []
  t0 = time.perf_counter()
  bar = _progress_bar(files)
  for number, path in enumerate(bar, start=1):
    stem = os.path.splitext(os.path.basename(path))[0]
    try:
      image = match_channels(image_io.read_image(path), trainer.channels, path)
    except DataError as e:
      message = " ".join(str(e).split())
      bar.write(f"warning: skipped {message}", file=sys.stderr)
      skipped.append(message)
      continue
    height, width = image.shape[:2]
    if fixed_canvas:
      canvas = fixed_canvas
    else:
      resized = transforms.resized_shape(height, width, transforms.eval_resize(d))
      canvas = tuple(-(-v // d.eval_pad_multiple) * d.eval_pad_multiple for v in resized)
    view, _ = transforms.eval_view(tf.constant(image), tf.zeros((height, width), tf.int32),
                                   canvas=canvas, ignore_label=d.ignore_label,
                                   resize=transforms.eval_resize(d),
                                   normalization=image_io.normalization_name(normalization))
    batch = np.zeros((batch_rows, *canvas, image.shape[-1]), np.float32)
    batch[0] = view.numpy()
    out = jax.tree.map(lambda x: np.asarray(x)[0], detect(variables, {"image": batch}))
    shown = pipeline.shown_shape(height, width, canvas, transforms.eval_resize(d))
    keep = out["valid"].astype(bool)
    boxes, masks = coco_eval.to_original_pixels(
        out["boxes"][keep], out["masks"][keep] if "masks" in out else None,
        original_size=(height, width), shown_size=shown)
    scores, classes = out["scores"][keep], out["classes"][keep]
    for result in coco_eval.results_in_original_terms(
        out["boxes"], out["scores"], out["classes"], out["valid"], out.get("masks"),
        image_id=number, original_size=(height, width), shown_size=shown,
        category_ids=category_ids):
      results.append({**result, "file_name": os.path.basename(path)})
    shown_kept = scores >= p.score_threshold
    # Small images are drawn enlarged, so that labels of many small objects stay legible.
    picture = visualize.draw_instances(
        _display_rows(image, _display_range(image)), boxes[shown_kept], classes[shown_kept],
        num_classes=num_classes, masks=None if masks is None else masks[shown_kept],
        scores=scores[shown_kept], class_names=trainer.class_names,
        scale=max(1, OVERLAY_MIN_SIDE // max(height, width)))
    _save_png(os.path.join(out_dir, f"{stem}_overlay.png"), picture)
    _save_png(os.path.join(out_dir, f"{stem}_instances.png"), instance_id_map(
        boxes[shown_kept], scores[shown_kept], None if masks is None else masks[shown_kept],
        (height, width)))
    predicted.append(path)
  bar.close()
  workdir_lib.write_json(os.path.join(out_dir, "detections.json"), results)
  seconds = time.perf_counter() - t0
  print(f"detected objects in {len(predicted)} of {len(files)} images with the step-{step} "
        f"checkpoint of {workdir} in {seconds:.1f} s; {len(results)} detections in "
        f"{os.path.join(out_dir, 'detections.json')}; pictures in {out_dir}")
  _fail_if_skipped(skipped, len(files))
  return {"predicted": predicted, "skipped": skipped, "output": out_dir, "step": step,
          "detections": len(results)}
