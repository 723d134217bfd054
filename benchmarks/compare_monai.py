"""The 3D U-Net train step in seg_jax against MONAI's `UNet` of the same channels and strides.

  pip install -r requirements-bench.txt
  python benchmarks/compare_monai.py [--batch_size=2 --patch=48,48,48 --num_classes=3 --steps=10]

Networks: MONAI's `UNet(channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2)`,
instance norm, one input channel, Dice + cross-entropy, Adam 1e-3; seg_jax's
`configs/unet3d.py:monai`, the same levels (16, 32, 64, 128 channels at 1/2, 1/4, 1/8, 1/8 of
the patch; residual units of two 3x3x3 conv + instance norm). They differ in detail: MONAI's
up-layers are 3x3x3 transposed convs followed by a one-conv residual unit, seg_jax's 2x2x2
learned upsamplings followed by a two-conv unit; MONAI's strided shortcuts are 3x3x3 convs,
seg_jax's 1x1x1; MONAI's activation is PReLU, seg_jax's ReLU. `model_gflop` prints each
network's forward and parameter-gradient FLOPs (XLA's count and torch's FlopCounterMode).
`--seg_jax_preset=default` times `configs/unet3d.py` itself instead (nnU-Net's layout, a
full-resolution level first: ~8x the FLOPs); `--monai_channels=16,32,64,128,128
--monai_strides=1,2,2,2` gives MONAI that network's resolution levels.
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
    "issue's; 16,32,64,128,128 with --monai_strides=1,2,2,2 has the resolution levels of "
    "--seg_jax_preset=default.")
_MONAI_STRIDES = flags.DEFINE_list("monai_strides", ["2", "2", "2"], "MONAI UNet's strides.")
_SEG_JAX_PRESET = flags.DEFINE_enum(
    "seg_jax_preset", "monai", ["monai", "default"], "seg_jax's network: configs/unet3d.py:monai "
    "(MONAI's levels) or configs/unet3d.py (a full-resolution level first).")
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
  from configs import unet3d
  config = unet3d.get_config("monai" if _SEG_JAX_PRESET.value == "monai" else "")
  config.dataset.patch_size = _patch()
  config.dataset.num_classes = compare_torch._CLASSES.value
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
      "seg_jax_preset": _SEG_JAX_PRESET.value,
      "conv_backend": ct._CONV_BACKEND.value, "jax": jax_info["jax"],
      "monai": monai_info["monai"], "cpu_count": os.cpu_count(),
      "python": platform.python_version()}))


if __name__ == "__main__":
  app.run(main)
