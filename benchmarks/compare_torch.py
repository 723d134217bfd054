"""The same U-Net train step in seg_jax (JAX/Flax) and in PyTorch, timed in one process.

  pip install -r requirements-bench.txt
  python benchmarks/compare_torch.py [--batch_size=8 --image_size=128 --width=32 --depth=4 --num_classes=3]

Network (both): `depth` levels of two 3x3 conv (no bias) + batch norm + ReLU, 2x2 max pooling,
a bottleneck, learned 2x upsampling (PyTorch: ConvTranspose2d 2x2/2; seg_jax: the same function
as a 1x1 conv to 4*C plus depth-to-space, whose bias is per sub-pixel: 3*C more parameters per
level), skip concatenation, a 1x1 head; pixel cross-entropy; Adam at 1e-3. PyTorch runs
channels_last (its fastest CPU layout). Prints one JSON line: median step times after warm-up,
images/s of each, analytic GFLOP/step and the speed ratio (seg_jax img/s / PyTorch img/s).
Each framework runs in its own worker process, the two stepped alternately (benchmarks/harness.py).
"""

import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "--worker=torch" in sys.argv:
  from benchmarks import torch_first  # pylint: disable=unused-import
from seg_jax import host_memory  # before jax is imported; SEG_JAX_REUSE_HOST_MEMORY=1 to use
from seg_jax import xla_flags  # SEG_JAX_PLAIN_XLA=1 for plain XLA

xla_flags.set_default_xla_flags()
host_memory.keep_freed_memory()

from absl import app
from absl import flags
import jax
import numpy as np

from benchmarks import flops as flop_count
from benchmarks import harness
from benchmarks import synthetic_data
from seg_jax import config as config_lib
from seg_jax.ops import conv as conv_ops

_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per step.")
_SIZE = flags.DEFINE_integer("image_size", 128, "Square image side.")
_WIDTH = flags.DEFINE_integer("width", 32, "Channels of the first level.")
_DEPTH = flags.DEFINE_integer("depth", 4, "Downsamplings.")
_CLASSES = flags.DEFINE_integer("num_classes", 3, "Classes (logits).")
_CONV_BACKEND = flags.DEFINE_enum("conv_backend", "auto", conv_ops.BACKENDS,
                                  "seg_jax's config.conv_backend (seg_jax/ops/conv.py).")
_STEPS = flags.DEFINE_integer("steps", 15, "Timed steps (after 3 warm-up steps), each framework.")


_WORKER = flags.DEFINE_enum("worker", None, ["seg_jax", "torch"],
                            "Internal: run as the worker process of one framework.")
def _inputs() -> tuple[np.ndarray, np.ndarray]:
  """The same images and labels in both workers."""
  rng = np.random.default_rng(0)
  b, s = _BATCH.value, _SIZE.value
  images = rng.standard_normal((b, s, s, 3), dtype=np.float32)
  labels = rng.integers(0, _CLASSES.value, (b, s, s)).astype(np.int32)
  return images, labels


def seg_jax_step(images: np.ndarray, labels: np.ndarray):
  """(run one step, compile seconds, parameters) of seg_jax's train step."""
  config = config_lib.base_config(dataset=synthetic_data.SYNTHETIC.name)
  config.dataset.image_size, config.dataset.num_classes = _SIZE.value, _CLASSES.value
  config.model.width, config.model.depth = _WIDTH.value, _DEPTH.value
  config.loss.name = "ce"
  config.optimizer.name, config.optimizer.schedule = "adam", "constant"
  config.optimizer.learning_rate = 1e-3
  config.batch_size = _BATCH.value
  config.conv_backend = _CONV_BACKEND.value
  return harness.compiled_train_step(config, images=images, labels=labels)


def torch_step(images: np.ndarray, labels: np.ndarray):
  """(run one step, parameters) of the same network in PyTorch, channels_last."""
  import torch
  from torch import nn

  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)

  def double_conv(c_in, c_out):
    layers = []
    for c in (c_in, c_out):
      layers += [nn.Conv2d(c, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out, eps=1e-5),
                 nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)

  class UNet(nn.Module):
    def __init__(self, channels, width, depth, classes):
      super().__init__()
      widths = [width * 2 ** level for level in range(depth + 1)]
      self.down = nn.ModuleList()
      c = channels
      for f in widths[:-1]:
        self.down.append(double_conv(c, f))
        c = f
      self.bottom = double_conv(c, widths[-1])
      self.up = nn.ModuleList(nn.ConvTranspose2d(widths[l + 1], widths[l], 2, stride=2)
                              for l in range(depth))
      self.up_conv = nn.ModuleList(double_conv(2 * widths[l], widths[l]) for l in range(depth))
      self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x):
      skips = []
      for block in self.down:
        x = block(x)
        skips.append(x)
        x = nn.functional.max_pool2d(x, 2)
      x = self.bottom(x)
      for level in reversed(range(len(self.up))):
        x = self.up_conv[level](torch.cat([skips[level], self.up[level](x)], dim=1))
      return self.head(x)

  model = UNet(images.shape[-1], _WIDTH.value, _DEPTH.value, _CLASSES.value)
  model = model.to(memory_format=torch.channels_last).train()
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
  y = torch.from_numpy(labels).long()

  def run():
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    loss.item()

  return run, sum(p.numel() for p in model.parameters())


def main(_):
  if _WORKER.value == "seg_jax":
    run, compile_s, params = seg_jax_step(*_inputs())
    return harness.serve(run, {"compile_s": compile_s, "params": params, "jax": jax.__version__})
  if _WORKER.value == "torch":
    import torch
    run, params = torch_step(*_inputs())
    return harness.serve(run, {"params": params, "torch": torch.__version__})
  (jax_worker, jax_info), (torch_worker, torch_info) = (
      harness.start_worker(__file__, name) for name in ("seg_jax", "torch"))
  jax_s, torch_s = harness.interleaved_median_seconds([jax_worker, torch_worker], _STEPS.value)
  b, s = _BATCH.value, _SIZE.value
  compile_s = jax_info["compile_s"]
  gflop = 3 * flop_count.unet_forward_flops(b, s, 3, _WIDTH.value, _DEPTH.value,
                                            _CLASSES.value) / 1e9
  print(json.dumps({
      "benchmark": "compare_torch", "model": "unet", "batch_size": b, "image_size": s,
      "width": _WIDTH.value, "depth": _DEPTH.value, "num_classes": _CLASSES.value,
      "seg_jax_step_ms": round(jax_s * 1e3, 1), "seg_jax_img_per_s": round(b / jax_s, 2),
      "seg_jax_compile_s": round(compile_s, 2),
      "torch_step_ms": round(torch_s * 1e3, 1), "torch_img_per_s": round(b / torch_s, 2),
      "ratio": round(torch_s / jax_s, 3), "analytic_gflop_per_step": round(gflop, 2),
      "seg_jax_achieved_gflops": round(gflop / jax_s, 1),
      "torch_achieved_gflops": round(gflop / torch_s, 1),
      "params": {"seg_jax": jax_info["params"], "torch": torch_info["params"]},
      "conv_backend": _CONV_BACKEND.value, "jax": jax_info["jax"], "torch": torch_info["torch"],
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "cpu_count": os.cpu_count(),
      "python": platform.python_version()}))


if __name__ == "__main__":
  app.run(main)
