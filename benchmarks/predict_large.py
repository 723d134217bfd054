"""Time and peak memory of --mode=predict on one large image or volume; one JSON line.

  python benchmarks/predict_large.py --config=configs/unet.py --workdir=runs/unet \\
      [--size=4000] [--config.predict.tile_size=256 ...]
  python benchmarks/predict_large.py --config=configs/unet3d.py --workdir=runs/unet3d \\
      [--volume_shape=300,512,512 --config.predict.tta=none --config.predict.batch_size=4]

Writes a SIZE x SIZE mosaic of embedded-dataset scenes (at the training scale,
so a trained model should segment it) with its ground truth, segments it with
WORKDIR's newest checkpoint through `predict.run`, and reports seconds per
image (the one image; compilation excluded), CPU seconds, the peak resident
memory during prediction beside the resident memory before it, what one whole-image float32 [H, W, K] array would
take for comparison, and the mean Dice of the label PNG against the truth.

A volumetric model (configs/unet3d.py) gets a CT-sized scan instead: a `--volume_shape`
(D, H, W) NIfTI (uncompressed .nii) tiled from embedded shapes3d cases, written at the spacing
the workdir's model was trained on (so it is not resampled), segmented by sliding windows of
`dataset.patch_size` through `predict.run`; the same fields, with the whole-volume float32
[D, H, W, K] probabilities for comparison and the Dice of the written labels.
"""

import json
import os
import resource
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_GCE_CHECK", "true")

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np
from PIL import Image

from seg_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/unet.py", "Experiment config.",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run's directory.", required=True)
_SIZE = flags.DEFINE_integer("size", 4000, "Height and width of the test image.")
_OUT = flags.DEFINE_string("out", "", "Where the image and predictions go ('' = a temp dir).")
_VOLUME_SHAPE = flags.DEFINE_list("volume_shape", ["300", "512", "512"],
                                  "Volumetric models: (D, H, W) voxels of the test scan.")


def _mosaic(size: int, scene_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  from seg_jax.data.builders import shapes
  rng = np.random.default_rng(seed)
  cells = -(-size // scene_size)
  image = np.zeros((cells * scene_size, cells * scene_size, 3), np.uint8)
  mask = np.zeros(image.shape[:2], np.uint8)
  for i in range(cells):
    for j in range(cells):
      scene = shapes.generate_scene(rng, scene_size)
      rows = slice(i * scene_size, (i + 1) * scene_size)
      cols = slice(j * scene_size, (j + 1) * scene_size)
      image[rows, cols], mask[rows, cols] = scene["image"], scene["mask"]
  return image[:size, :size], mask[:size, :size]


def _volume_mosaic(shape: tuple[int, int, int], spacing, seed: int = 0, tiles: int = 4
                   ) -> tuple[np.ndarray, np.ndarray]:
  """A [D, H, W] scan and its labels tiled from `tiles` shapes3d cases of 32 x 64 x 64 voxels
  (repeated: drawing a case per tile would take longer than the prediction)."""
  from seg_jax.data.builders import shapes3d
  rng = np.random.default_rng(seed)
  tile = (32, 64, 64)
  cases = [shapes3d.generate_case(rng, tile, spacing) for _ in range(tiles)]
  counts = [-(-n // t) for n, t in zip(shape, tile)]
  image = np.empty(shape, np.float32)
  mask = np.empty(shape, np.uint8)
  for index in np.ndindex(*counts):
    case_image, case_mask = cases[sum(index) % tiles]
    box = tuple(slice(i * t, min((i + 1) * t, n)) for i, t, n in zip(index, tile, shape))
    crop = tuple(slice(0, b.stop - b.start) for b in box)
    image[box], mask[box] = case_image[crop], case_mask[crop]
  return image, mask


def _write_volume(out: str, workdir: str, shape: tuple[int, int, int]):
  """Writes OUT/scan.nii at the model's training spacing; returns (path, truth [D, H, W])."""
  import nibabel as nib
  from seg_jax import workdir as workdir_lib
  with open(os.path.join(workdir, workdir_lib.MODEL_FILE)) as f:
    preprocessing = json.load(f).get("volume_preprocessing")
  spacing = tuple(preprocessing["target_spacing"]) if preprocessing else (2.5, 1.5, 1.5)
  image, truth = _volume_mosaic(shape, spacing)
  path = os.path.join(out, "scan.nii")
  affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])  # NIfTI holds (x, y, z) = (W, H, D)
  nib.save(nib.Nifti1Image(image.transpose(2, 1, 0), affine), path)
  return path, truth


def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _measured_run(config) -> tuple[dict, dict]:
  """predict.run's summary, and its cost: CPU seconds of all of it (restore and compilation
  included: on a shared machine a steadier measure of the work than wall-clock seconds), the
  load, and the resident memory before it and at its peak."""
  from seg_jax import predict
  # Peak RSS from here on (Linux: writing 5 to clear_refs resets VmHWM).
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  before = _status_kib("VmRSS")
  cpu_before = resource.getrusage(resource.RUSAGE_SELF)
  summary = predict.run(config, _WORKDIR.value)
  cpu_after = resource.getrusage(resource.RUSAGE_SELF)
  peak = _status_kib("VmHWM")
  return summary, {
      "cpu_seconds_predict_run": round(cpu_after.ru_utime + cpu_after.ru_stime
                                       - cpu_before.ru_utime - cpu_before.ru_stime, 1),
      "load_average": round(os.getloadavg()[0], 1), "cpus": os.cpu_count(),
      "rss_before_predict_mib": round(before / 1024),
      "peak_rss_during_predict_mib": round(peak / 1024)}


def _dice_per_class(label: np.ndarray, truth: np.ndarray, classes) -> list[float]:
  """Dice of each of `classes` that is in the label or the truth."""
  dice = []
  for c in classes:
    both = np.count_nonzero((label == c) & (truth == c))
    total = np.count_nonzero(label == c) + np.count_nonzero(truth == c)
    if total:
      dice.append(2 * both / total)
  return dice


def main(_):
  config = _CONFIG.value
  out = _OUT.value or tempfile.mkdtemp(prefix="predict_large_")
  os.makedirs(out, exist_ok=True)
  if config_lib.task(config) == "volumetric":
    return _predict_volume(config, out)
  image_path = os.path.join(out, f"mosaic{_SIZE.value}.png")
  image, truth = _mosaic(_SIZE.value, config.dataset.image_size)
  Image.fromarray(image).save(image_path)
  del image
  config.predict.input = image_path
  config.predict.output = os.path.join(out, "predictions")
  config_lib.validate(config)
  summary, cost = _measured_run(config)

  label = np.asarray(Image.open(os.path.join(config.predict.output, f"mosaic{_SIZE.value}_label.png")))
  k = config.dataset.num_classes
  dice = _dice_per_class(label, truth, range(k))
  print(json.dumps({
      "size": _SIZE.value, "classes": k, "tile_size": config.predict.tile_size,
      "overlap": config.predict.overlap, "tta": config.predict.tta,
      "tile_batch": config.predict.batch_size,
      "save_probabilities": config.predict.save_probabilities,
      "seconds_per_image": round(summary["seconds_per_image"], 2), **cost,
      "whole_image_probabilities_mib": round(_SIZE.value ** 2 * k * 4 / 2 ** 20),
      "mean_dice_vs_truth": round(float(np.mean(dice)), 4), "output": out}))


def _predict_volume(config, out: str) -> None:
  import nibabel as nib
  shape = tuple(int(v) for v in _VOLUME_SHAPE.value)
  scan_path, truth = _write_volume(out, _WORKDIR.value, shape)
  config.predict.input = scan_path
  config.predict.output = os.path.join(out, "predictions")
  config_lib.validate(config)
  summary, cost = _measured_run(config)

  label = np.asarray(nib.load(os.path.join(config.predict.output, "scan.nii.gz")).dataobj
                     ).transpose(2, 1, 0)
  k = config.dataset.num_classes
  dice = _dice_per_class(label, truth, range(1, k))
  print(json.dumps({
      "volume_shape": list(shape), "classes": k, "window": list(config.dataset.patch_size),
      "overlap": config.predict.overlap, "tta": config.predict.tta,
      "window_batch": config.predict.batch_size,
      # reading, preparing, compiling, sliding windows, writing NIfTI and PNG (not restoring)
      "seconds_per_volume": round(summary["seconds_per_case"], 1), **cost,
      "whole_volume_probabilities_mib": round(np.prod(shape) * k * 4 / 2 ** 20),
      "foreground_dice_vs_truth": round(float(np.mean(dice)), 4) if dice else None,
      "output": out}))


if __name__ == "__main__":
  app.run(main)
