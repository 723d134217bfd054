"""MONAI's reference recipe trained and scored on a Decathlon folder, beside a seg_jax run's score.

  pip install -r requirements-bench.txt
  python main.py --config=configs/unet3d.py --workdir=W --config.dataset.name=decathlon \
      --config.dataset.root=DIR --config.dataset.patch_size="(48, 48, 48)" --config.batch_size=2 \
      --config.num_train_steps=400 --config.optimizer.warmup_steps=20
  python benchmarks/monai_reference.py --root=DIR --workdir=W [--steps=400 --batch_size=2]

The recipe of issue 23's acceptance check: MONAI's `UNet` (channels 16-128, strides 2, 2 residual
units, its default instance norm), `DiceCELoss` (softmax, one-hot labels), Adam 1e-3, random
patches by `RandCropByPosNegLabeld` (pos 1, neg 1: half the patches centred on foreground, as in
MONAI's tutorials), no augmentation; the validation cases scored whole by
`sliding_window_inference` (Gaussian weighting, overlap 0.5) and `DiceMetric` per foreground
class (mean over cases, cases without the class skipped).

Both sides see the same voxels: the cases come from seg_jax's own preprocessing
(`seg_jax.data.decathlon.prepare`: RAS+ orientation, resampling to the training median spacing,
CT or z-score normalisation, the same fold of splits_final.json and the same cache). Prints one
JSON line: MONAI's per-class and foreground Dice and its training time, seg_jax's from the
workdir's metrics.jsonl (its last evaluation), and `ratio` = seg_jax's foreground Dice / MONAI's.
"""

import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import torch_first  # pylint: disable=unused-import,g-bad-import-order

from absl import app
from absl import flags
import numpy as np

from seg_jax import config as config_lib
from seg_jax.data import decathlon
from seg_jax.sweep_report import read_records

_ROOT = flags.DEFINE_string("root", None, "A Decathlon folder (dataset.json, imagesTr, labelsTr).",
                            required=True)
_WORKDIR = flags.DEFINE_string("workdir", "", "A seg_jax workdir trained on the same folder.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "seg_jax's cache root ('' = ~/tensorflow_datasets).")
_STEPS = flags.DEFINE_integer("steps", 400, "Training steps.")
_BATCH = flags.DEFINE_integer("batch_size", 2, "Patches per step.")
_PATCH = flags.DEFINE_list("patch", ["48", "48", "48"], "Patch and window (D, H, W) voxels.")
_OVERLAP = flags.DEFINE_float("overlap", 0.5, "Sliding-window overlap.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights and the patches.")
_THREADS = flags.DEFINE_integer(
    "threads", 0, "torch's intra-op threads (0 = every CPU). On a CPU shared with other jobs, 1: "
    "torch's threads wait on each other and a step can take many times longer.")


def prepared_cases(root: str, data_dir: str):
  """seg_jax's preprocessed cases of the folder and its class names."""
  config = config_lib.base_config(model="unet3d", dataset="decathlon")
  config.dataset.root = root
  config.dataset.data_dir = data_dir
  decathlon.configure(config)
  return decathlon.prepare(config, data_dir or None)


def seg_jax_scores(workdir: str, class_names: list[str]) -> dict | None:
  """The last evaluation in WORKDIR/metrics.jsonl: foreground and per-class Dice."""
  evaluations = [r for r in read_records(workdir) if "eval/dice_foreground" in r]
  if not evaluations:
    return None
  last = evaluations[-1]
  return {"step": last.get("step"), "dice_foreground": last["eval/dice_foreground"],
          "dice": {name: last.get(f"eval/dice/{name}") for name in class_names[1:]}}


def train_and_score(volume_set, num_classes: int, patch: tuple[int, int, int]) -> dict:
  import torch
  from monai.inferers import sliding_window_inference
  from monai.losses import DiceCELoss
  from monai.metrics import DiceMetric
  from monai.networks.nets import UNet
  from monai.networks.utils import one_hot
  from monai.transforms import RandCropByPosNegLabeld

  torch.manual_seed(_SEED.value)
  torch.set_num_threads(_THREADS.value or os.cpu_count() or 1)
  channels = volume_set.channels
  model = UNet(spatial_dims=3, in_channels=channels, out_channels=num_classes,
               channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2)
  loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
  crop = RandCropByPosNegLabeld(keys=("image", "label"), label_key="label", spatial_size=patch,
                                pos=1, neg=1, num_samples=1)
  crop.set_random_state(seed=_SEED.value)
  rng = np.random.default_rng(_SEED.value)
  # channel-first, as MONAI holds volumes: image [C, D, H, W], label [1, D, H, W]
  train = [{"image": np.moveaxis(c.image, -1, 0), "label": c.mask[None].astype(np.int64)}
           for c in volume_set.splits["train"]]

  model.train()
  start = time.perf_counter()
  for step in range(1, _STEPS.value + 1):
    rows = [crop(train[int(rng.integers(len(train)))])[0] for _ in range(_BATCH.value)]
    x = torch.stack([torch.as_tensor(np.asarray(r["image"]), dtype=torch.float32) for r in rows])
    y = torch.stack([torch.as_tensor(np.asarray(r["label"])) for r in rows])
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    if step % 50 == 0:
      print(f"step {step}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)",
            file=sys.stderr, flush=True)
  train_s = time.perf_counter() - start

  model.eval()
  metric = DiceMetric(include_background=False, reduction="mean_batch")
  start = time.perf_counter()
  with torch.no_grad():
    for case in volume_set.splits["validation"]:
      x = torch.as_tensor(np.moveaxis(case.image, -1, 0)[None], dtype=torch.float32)
      logits = sliding_window_inference(x, patch, _BATCH.value, model, overlap=_OVERLAP.value,
                                        mode="gaussian")
      prediction = one_hot(logits.argmax(1, keepdim=True), num_classes)
      truth = one_hot(torch.as_tensor(case.mask[None, None].astype(np.int64)), num_classes)
      metric(prediction, truth)
  per_class = [float(v) for v in metric.aggregate()]
  return {"dice_foreground": float(np.nanmean(per_class)), "dice": per_class,
          "train_s": round(train_s, 1), "step_ms": round(train_s / _STEPS.value * 1e3, 1),
          "eval_s": round(time.perf_counter() - start, 1)}


def main(_):
  import monai
  import torch
  patch = tuple(int(v) for v in _PATCH.value)
  volume_set, class_names = prepared_cases(_ROOT.value, _DATA_DIR.value)
  monai_result = train_and_score(volume_set, len(class_names), patch)
  monai_result["dice"] = dict(zip(class_names[1:], monai_result["dice"]))
  ours = seg_jax_scores(_WORKDIR.value, class_names) if _WORKDIR.value else None
  ratio = (round(ours["dice_foreground"] / monai_result["dice_foreground"], 3)
           if ours and monai_result["dice_foreground"] else None)
  print(json.dumps({
      "benchmark": "monai_reference", "root": _ROOT.value, "steps": _STEPS.value,
      "batch_size": _BATCH.value, "patch": list(patch), "overlap": _OVERLAP.value,
      "threads": _THREADS.value or os.cpu_count(), "load_average": round(os.getloadavg()[0], 1),
      "cases": {s: len(c) for s, c in volume_set.splits.items()},
      "monai": monai_result, "seg_jax": ours, "ratio": ratio, "monai_version": monai.__version__,
      "torch": torch.__version__, "cpu_count": os.cpu_count(),
      "python": platform.python_version()}))


if __name__ == "__main__":
  app.run(main)
