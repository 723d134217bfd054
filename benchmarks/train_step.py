"""Times the jitted train step (or eval step) on synthetic data; prints one JSON line.

  python benchmarks/train_step.py --config=configs/unet.py [--config.key=value ...] [--steps=20]
  python benchmarks/train_step.py --config=configs/mask_rcnn.py
  python benchmarks/train_step.py --config=configs/unet.py --step=eval   # eval throughput

`--step=eval` times the jitted eval step that `--mode=eval` and the in-training evaluations
run: the forward pass in inference mode plus the task's outputs (the batch's confusion matrix
and class ids; for detectors, NMS'd detections with pasted masks); host-side scoring excluded.

Reports the median step time after warm-up, images/s, compile time, XLA's
FLOP count for the step (taken with XLA's convolutions, since XLA counts nothing in the oneDNN
custom calls) and the achieved GFLOP/s, and for the U-Net and SegFormer the analytic
count of their convolutions and matmuls (benchmarks/flops.py) to cross-check XLA's.

  python benchmarks/train_step.py --config=configs/segformer.py:ade20k --config.dataset.root=x \
      --config.batch_size=2 --steps=3      # SegFormer-B0 at 512 px
"""

import json
import os
import platform
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from seg_jax import host_memory  # before jax is imported; SEG_JAX_REUSE_HOST_MEMORY=1 to use
from seg_jax import xla_flags  # SEG_JAX_PLAIN_XLA=1 for plain XLA

xla_flags.set_default_xla_flags()
_REUSES_HOST_MEMORY = host_memory.keep_freed_memory()

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from benchmarks import flops as flop_count
from benchmarks import harness
from seg_jax import config as config_lib
from seg_jax import models
from seg_jax.models import segformer
from seg_jax.ops import conv as conv_ops

_CONFIG = config_flags.DEFINE_config_file("config", "configs/unet.py", "Experiment config.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps after 3 warm-up steps.")
_STEP = flags.DEFINE_enum("step", "train", ["train", "eval"], "Which jitted step to time.")


def main(_):
  config = _CONFIG.value
  size, b = config.dataset.image_size, config.batch_size
  compiled, state, batch, compile_s, jitted = harness.synthetic_step(config, _STEP.value)
  # XLA counts no FLOPs in custom calls (oneDNN's convolutions), so the count comes from the
  # same step with XLA's convolutions, lowered but not compiled.
  xla_convs = config.copy_and_resolve_references()
  xla_convs.conv_backend = "xla"
  cost = jitted(xla_convs).lower(state, batch).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan")))
  times, faults, system_s = [], [], []
  for i in range(3 + _STEPS.value):
    faults_before, cpu_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, os.times()
    t0 = time.perf_counter()
    if _STEP.value == "train":
      state, out = compiled(state, batch)
    else:
      out = compiled(state, batch)
    jax.block_until_ready(out)
    if i >= 3:
      times.append(time.perf_counter() - t0)
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
      system_s.append(os.times().system - cpu_before.system)
  step_s = float(np.median(times))
  analytic = None
  passes = 3 if _STEP.value == "train" else 1  # forward + both gradients; forward only
  if config.model.name == "unet" and not config.model.backbone:
    analytic = passes * flop_count.unet_forward_flops(
        b, size, 3, config.model.width, config.model.depth, models.num_logits(config)) / 1e9
  elif config.model.name == "segformer":
    analytic = passes * flop_count.segformer_forward_flops(
        b, size, size, 3, segformer.architecture(config.model), models.num_logits(config)) / 1e9
  print(json.dumps({
      "benchmark": f"{_STEP.value}_step", "model": config.model.name, "batch_size": b, "image_size": size,
      "width": config.model.get("width"), "depth": config.model.get("depth"),
      "variant": config.model.get("variant"), "dtype": config.dtype,
      "conv_backend": conv_ops.resolve(config.conv_backend),
      "step_ms": round(step_s * 1e3, 2), "img_per_s": round(b / step_s, 1),
      "compile_s": round(compile_s, 2), "gflops_per_step": round(flops / 1e9, 2),
      "achieved_gflops": round(flops / 1e9 / step_s, 1),
      # U-Net: its convs; SegFormer: its matmuls and convs (benchmarks/flops.py)
      "analytic_gflops_per_step": analytic and round(analytic, 2),
      # Kernel work per step: first touches of freshly mapped host memory (seg_jax/host_memory.py).
      "page_faults_per_step": int(np.median(faults)),
      "system_cpu_ms": round(float(np.median(system_s)) * 1e3, 1),
      "reuse_host_memory": _REUSES_HOST_MEMORY,
      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
      "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
      "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "python": platform.python_version()}))


if __name__ == "__main__":
  app.run(main)
