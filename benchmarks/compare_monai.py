"""The 3D U-Net train step in seg_jax against MONAI's `UNet` of the same channels and strides.

  pip install -r requirements-bench.txt
  python benchmarks/compare_monai.py [--batch_size=2 --patch=48,48,48 --num_classes=3 --steps=10]

Network (both): channels 16, 32, 64, 128, three stride-2 downsamplings by strided 3x3x3
convs, residual units of two 3x3x3 conv + instance norm (MONAI `num_res_units=2`); one input
channel; Dice + cross-entropy; Adam 1e-3. They are not the same network: MONAI's first unit is
already strided, so its top level works at half the patch, and its decoder has one conv per
unit after a 3x3x3 transposed conv; seg_jax's (nnU-Net's layout) has a full-resolution level
of two 16-channel convs each way and a 2x2x2 transposed conv. seg_jax's network is 8x MONAI's
FLOPs at 48^3 (printed as `model_gflop`: forward and parameter gradient, XLA's count and
torch's FlopCounterMode); `--monai_channels=16,32,64,128,128 --monai_strides=1,2,2,2` gives
MONAI seg_jax's resolution levels (0.8x its FLOPs). MONAI's units use PReLU, seg_jax's ReLU.
The two run in separate worker processes stepped alternately, as in compare_torch.py, and it
prints one JSON line with the median step times, `ratio` = MONAI's step time / seg_jax's
(> 1: seg_jax is faster) and each side's model FLOPs per second of its step.

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
_MONAI_CHANNELS = flags.DEFINE_list(
    "monai_channels", ["16", "32", "64", "128"], "MONAI UNet's channels. The default is the "
    "issue's; its first stride-2 unit halves the patch at once, so seg_jax's network (a full-"
    "resolution level first) does ~4x its FLOPs. 16,32,64,128,128 with --monai_strides=1,2,2,2 "
    "has seg_jax's resolution levels.")
_MONAI_STRIDES = flags.DEFINE_list("monai_strides", ["2", "2", "2"], "MONAI UNet's strides.")
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


def _seg_jax_config(batch_size: int):
  config = config_lib.base_config(model="unet3d", dataset="shapes3d")
  config.dataset.patch_size = _patch()
  config.dataset.num_classes = compare_torch._CLASSES.value
  config.model.width, config.model.max_width, config.model.depth = 16, 128, 3
  config.model.norm, config.model.residual = "instance", True
  config.loss.name = "ce+dice"
  config.optimizer.name, config.optimizer.schedule = "adam", "constant"
  config.batch_size = batch_size
  config.conv_backend = compare_torch._CONV_BACKEND.value
  if config.dataset.num_classes != 4:  # shapes3d's own count; the benchmark makes its data
    config.dataset.name = "decathlon"
    config.dataset.root = "unused"
  return config


def seg_jax_step(images, labels):
  config = _seg_jax_config(len(images))
  return harness.compiled_train_step(config, channels=1, images=images, labels=labels)


def seg_jax_model_flops(images) -> float:
  """XLA's count of the model's forward and parameter-gradient FLOPs on `images` (with XLA's
  convolutions, as custom calls have no count); MONAI's is counted by torch's FlopCounterMode."""
  from seg_jax import models
  from seg_jax.ops import conv as conv_ops
  model = models.build_model(_seg_jax_config(len(images)))
  shapes = jax.eval_shape(lambda: model.init(models.init_key(0), images[:1], train=False))

  def loss(variables):  # instance norm: the variables are the parameters
    with conv_ops.backend("xla"):
      logits = model.apply(variables, images, train=True)
    return logits.sum()

  return float(jax.jit(jax.grad(loss)).lower(shapes).cost_analysis()["flops"])


def monai_step(images, labels):
  import torch
  import torch.utils.flop_counter
  from monai.losses import DiceCELoss
  from monai.networks.nets import UNet

  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  model = UNet(spatial_dims=3, in_channels=1, out_channels=compare_torch._CLASSES.value,
               channels=tuple(int(c) for c in _MONAI_CHANNELS.value),
               strides=tuple(int(s) for s in _MONAI_STRIDES.value), num_res_units=2,
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

  def model_flops():  # forward and backward of the network, as seg_jax_model_flops
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
      model(x).sum().backward()
    optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())

  return run, sum(p.numel() for p in model.parameters()), model_flops


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
    images, labels = _inputs()
    run, compile_s, params = seg_jax_step(images, labels)
    return harness.serve(run, {"compile_s": compile_s, "params": params, "jax": jax.__version__,
                               "model_flops": seg_jax_model_flops(images)})
  if ct._WORKER.value == "torch":
    import monai
    run, params, model_flops = monai_step(*_inputs())
    if _PROFILE.value:
      return _profile(run, _PROFILE.value)
    return harness.serve(run, {"params": params, "monai": monai.__version__,
                               "model_flops": model_flops()})
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
      "model_gflop": {"seg_jax": round(jax_info["model_flops"] / 1e9, 1),
                      "monai": round(monai_info["model_flops"] / 1e9, 1)},
      "gflop_per_s": {"seg_jax": round(jax_info["model_flops"] / jax_s / 1e9, 1),
                      "monai": round(monai_info["model_flops"] / monai_s / 1e9, 1)},
      "monai_channels": [int(c) for c in _MONAI_CHANNELS.value],
      "monai_strides": [int(s) for s in _MONAI_STRIDES.value],
      "conv_backend": ct._CONV_BACKEND.value, "jax": jax_info["jax"],
      "monai": monai_info["monai"], "cpu_count": os.cpu_count(),
      "python": platform.python_version()}))


if __name__ == "__main__":
  app.run(main)
