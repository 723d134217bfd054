"""The 3D U-Net train step in seg_jax against MONAI's `UNet` of the same channels and strides.

  pip install -r requirements-bench.txt
  python benchmarks/compare_monai.py [--batch_size=2 --patch=48,48,48 --num_classes=3 --steps=10]

Network (both): channels 16, 32, 64, 128 (three stride-2 downsamplings by strided 3x3x3 convs),
residual units of two 3x3x3 conv + instance norm (MONAI `num_res_units=2`; MONAI's units use
PReLU and its upsampling is a 3x3x3 transposed conv, seg_jax's ReLU and a 2x2x2 one, so
parameter counts differ and are printed); one input channel; Dice + cross-entropy; Adam 1e-3.
The two run in separate worker processes stepped alternately, as in compare_torch.py, and it
prints one JSON line with the median step times and `ratio` = MONAI's step time / seg_jax's
(> 1: seg_jax is faster).

Where MONAI's step spends its time (torch.profiler's operator table), beside seg_jax's
(per kind of operation):

  python benchmarks/compare_monai.py --worker=torch --profile_monai=3 --batch_size=2
  python benchmarks/profile_step.py --config=configs/unet3d.py --group_by=kind \
      --config.dataset.patch_size="(48, 48, 48)"
"""

import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "--worker=torch" in sys.argv:
  from benchmarks import torch_first  # pylint: disable=unused-import
from seg_jax import xla_flags

xla_flags.set_default_xla_flags()

from absl import app
from absl import flags
import jax
import numpy as np

from benchmarks import compare_torch  # its flags (batch_size, steps, ...)
from benchmarks import harness
from seg_jax import config as config_lib

_PATCH = flags.DEFINE_list("patch", ["48", "48", "48"], "Patch (D, H, W) voxels.")
_PROFILE = flags.DEFINE_integer(
    "profile_monai", 0, "With --worker=torch: profile this many MONAI steps (after 3 warm-up "
    "steps) with torch.profiler and print its table of operators by self CPU time, instead of "
    "serving steps. seg_jax's side: benchmarks/profile_step.py --group_by=kind.")


def _patch() -> tuple[int, int, int]:
  return tuple(int(v) for v in _PATCH.value)


def _inputs():
  rng = np.random.default_rng(0)
  shape = (compare_torch._BATCH.value, *_patch())  # pylint: disable=protected-access
  images = rng.standard_normal((*shape, 1), dtype=np.float32)
  labels = rng.integers(0, compare_torch._CLASSES.value, shape).astype(np.int32)
  return images, labels


def seg_jax_step(images, labels):
  config = config_lib.base_config(model="unet3d", dataset="shapes3d")
  config.dataset.patch_size = _patch()
  config.dataset.num_classes = compare_torch._CLASSES.value
  config.model.width, config.model.max_width, config.model.depth = 16, 128, 3
  config.model.norm, config.model.residual = "instance", True
  config.loss.name = "ce+dice"
  config.optimizer.name, config.optimizer.schedule = "adam", "constant"
  config.batch_size = len(images)
  config.conv_backend = compare_torch._CONV_BACKEND.value
  if config.dataset.num_classes != 4:  # shapes3d's own count; the benchmark makes its data
    config.dataset.name = "decathlon"
    config.dataset.root = "unused"
  return harness.compiled_train_step(config, channels=1, images=images, labels=labels)


def monai_step(images, labels):
  import torch
  from monai.losses import DiceCELoss
  from monai.networks.nets import UNet

  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  model = UNet(spatial_dims=3, in_channels=1, out_channels=compare_torch._CLASSES.value,
               channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2,
               norm="instance").train()
  loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
  x = torch.from_numpy(images).permute(0, 4, 1, 2, 3).contiguous()
  y = torch.from_numpy(labels).long()[:, None]

  def run():
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    loss.item()

  return run, sum(p.numel() for p in model.parameters())


def _profile(run, steps: int) -> None:
  import torch
  for _ in range(3):
    run()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
    for _ in range(steps):
      run()
  print(f"MONAI UNet train step, {steps} steps (times are totals over them):")
  print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main(_):
  ct = compare_torch
  if ct._WORKER.value == "seg_jax":
    run, compile_s, params = seg_jax_step(*_inputs())
    return harness.serve(run, {"compile_s": compile_s, "params": params, "jax": jax.__version__})
  if ct._WORKER.value == "torch":
    import monai
    run, params = monai_step(*_inputs())
    if _PROFILE.value:
      return _profile(run, _PROFILE.value)
    return harness.serve(run, {"params": params, "monai": monai.__version__})
  (jax_worker, jax_info), (monai_worker, monai_info) = (
      harness.start_worker(__file__, name) for name in ("seg_jax", "torch"))
  jax_s, monai_s = harness.interleaved_median_seconds([jax_worker, monai_worker],
                                                      ct._STEPS.value)
  print(json.dumps({
      "benchmark": "compare_monai", "model": "unet3d", "batch_size": ct._BATCH.value,
      "patch": list(_patch()), "num_classes": ct._CLASSES.value,
      "seg_jax_step_ms": round(jax_s * 1e3, 1), "monai_step_ms": round(monai_s * 1e3, 1),
      "seg_jax_compile_s": round(jax_info["compile_s"], 2), "ratio": round(monai_s / jax_s, 3),
      "params": {"seg_jax": jax_info["params"], "monai": monai_info["params"]},
      "conv_backend": ct._CONV_BACKEND.value, "jax": jax_info["jax"],
      "monai": monai_info["monai"], "cpu_count": os.cpu_count(),
      "python": platform.python_version()}))


if __name__ == "__main__":
  app.run(main)
