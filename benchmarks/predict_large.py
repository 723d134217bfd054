"""Time and peak memory of --mode=predict on one large image; one JSON line.

  python benchmarks/predict_large.py --config=configs/unet.py --workdir=runs/unet \\
      [--size=4000] [--config.predict.tile_size=256 ...]

Writes a SIZE x SIZE mosaic of embedded-dataset scenes (at the training scale,
so a trained model should segment it) with its ground truth, segments it with
WORKDIR's newest checkpoint through `predict.run`, and reports seconds per
image (the one image; compilation excluded), CPU seconds, the peak resident
memory during prediction beside the resident memory before it, what one whole-image float32 [H, W, K] array would
take for comparison, and the mean Dice of the label PNG against the truth.
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


def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def main(_):
  from seg_jax import predict
  config = _CONFIG.value
  out = _OUT.value or tempfile.mkdtemp(prefix="predict_large_")
  os.makedirs(out, exist_ok=True)
  image_path = os.path.join(out, f"mosaic{_SIZE.value}.png")
  image, truth = _mosaic(_SIZE.value, config.dataset.image_size)
  Image.fromarray(image).save(image_path)
  del image
  config.predict.input = image_path
  config.predict.output = os.path.join(out, "predictions")
  config_lib.validate(config)

  # Peak RSS from here on (Linux: writing 5 to clear_refs resets VmHWM).
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  before = _status_kib("VmRSS")
  cpu_before = resource.getrusage(resource.RUSAGE_SELF)
  summary = predict.run(config, _WORKDIR.value)
  cpu_after = resource.getrusage(resource.RUSAGE_SELF)
  peak = _status_kib("VmHWM")

  label = np.asarray(Image.open(os.path.join(config.predict.output, f"mosaic{_SIZE.value}_label.png")))
  k = config.dataset.num_classes
  dice = []
  for c in range(k):
    both = np.count_nonzero((label == c) & (truth == c))
    total = np.count_nonzero(label == c) + np.count_nonzero(truth == c)
    if total:
      dice.append(2 * both / total)
  print(json.dumps({
      "size": _SIZE.value, "classes": k, "tile_size": config.predict.tile_size,
      "overlap": config.predict.overlap, "tta": config.predict.tta,
      "tile_batch": config.predict.batch_size,
      "save_probabilities": config.predict.save_probabilities,
      "seconds_per_image": round(summary["seconds_per_image"], 2),
      # CPU seconds of all of predict.run (restore and compilation included): on a shared
      # machine a steadier measure of the work than wall-clock seconds.
      "cpu_seconds_predict_run": round(cpu_after.ru_utime + cpu_after.ru_stime
                                       - cpu_before.ru_utime - cpu_before.ru_stime, 1),
      "load_average": round(os.getloadavg()[0], 1), "cpus": os.cpu_count(),
      "rss_before_predict_mib": round(before / 1024),
      "peak_rss_during_predict_mib": round(peak / 1024),
      "whole_image_probabilities_mib": round(_SIZE.value ** 2 * k * 4 / 2 ** 20),
      "mean_dice_vs_truth": round(float(np.mean(dice)), 4), "output": out}))


if __name__ == "__main__":
  app.run(main)
