"""The same Mask R-CNN (or Faster R-CNN) step in seg_jax and in torchvision, timed alternately.

  pip install -r requirements-bench.txt
  python benchmarks/compare_torchvision.py --config=configs/mask_rcnn.py --r50_320  # the issue's case
  python benchmarks/compare_torchvision.py --config=configs/mask_rcnn.py [--config.key=value ...]
      [--step=train|eval] [--steps=5]

`--r50_320` sets Mask R-CNN R50-FPN at 320x320, batch 2, with torchvision's budgets (RPN 2000
candidates per level before NMS, 1000 after; 256 anchors and 512 RoIs per image, 25%
positive; 1024-wide box head; 4x256 mask head; 100 detections); any `--config.*` flag given
after it wins.

Both start from the same weights (torchvision's initial ones, which seg_jax loads through
`model.init_from`), so that their untrained RPNs propose the same boxes and their second
stages see the same RoIs: how many foreground RoIs the mask head trains on, which dominates
the step, follows the proposals. Training moves the two apart (different sampling draws,
rounding), and their workloads with them, so by default the learning rate is 1e-12 (the
optimizer still runs in full); `--learn` trains at the config's rate. The JSON reports the
mask head's RoIs per step of each.

Both build the network `config.model` describes (torchvision: `MaskRCNN` / `FasterRCNN` on a
torchvision ResNet with plain batch norm and every layer trained, wrapped in
`BackboneWithFPN`, with the same anchors, budgets, thresholds, RoIAlign sizes and FPN level
mapping), both train with AdamW at the config's learning rate and weight decay and clip the
gradient norm at `optimizer.grad_clip_norm`, and both see the same scenes of the shapes
generator (`benchmarks/synthetic_data.py`; torchvision gets them as [0, 1] images). The
torchvision backbone is the standard ResNet, so the config must name one: `model.width=64`
and `model.stem=imagenet`.

`--step=eval` times inference: seg_jax's eval step (forward, NMS, masks pasted into the image)
against torchvision's `model.eval()` forward (which also pastes masks), with the same score
threshold, NMS threshold and detections per image, and the same RPN budgets as in training
(seg_jax has one set of budgets).

Each framework runs in its own worker process, stepped alternately (benchmarks/harness.py).
Prints one JSON line: median step times, images/s and the ratio (torchvision step time /
seg_jax step time; above 1 means seg_jax is faster).
"""

import json
import os
import platform
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "--worker=torchvision" in sys.argv or "--profile_torchvision" in sys.argv:
  from benchmarks import torch_first  # pylint: disable=unused-import
  import torchvision  # pylint: disable=unused-import
from seg_jax import host_memory  # before jax is imported
from seg_jax import xla_flags  # SEG_JAX_PLAIN_XLA=1 for plain XLA

xla_flags.set_default_xla_flags()
host_memory.keep_freed_memory()

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from benchmarks import harness
from benchmarks import synthetic_data
from seg_jax import registry
from seg_jax.data import image_io

_CONFIG = config_flags.DEFINE_config_file("config", "configs/mask_rcnn.py", "Experiment config.")
_R50_320 = flags.DEFINE_bool("r50_320", False, "Mask R-CNN R50-FPN at 320 px with torchvision's "
                             "budgets (module docstring).")
_STEP = flags.DEFINE_enum("step", "train", ["train", "eval"], "Which step to time.")
_LEARN = flags.DEFINE_bool("learn", False, "Train at the config's learning rate; by default it is "
                           "1e-12, so that both stay at their shared initial weights and do "
                           "the same work in every step (module docstring).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (after 2 warm-up steps), each framework.")
_WORKER = flags.DEFINE_enum("worker", None, ["seg_jax", "torchvision"],
                            "Internal: run as the worker process of one framework.")
_PROFILE_TORCHVISION = flags.DEFINE_bool(
    "profile_torchvision", False, "Instead of the comparison: torch.profiler over --steps of "
    "torchvision's step (after 2 warm-up steps), its operations' own time summed by kind.")
_WEIGHTS_OUT = flags.DEFINE_string("weights_out", None, "Internal: where the torchvision worker "
                                   "writes its initial weights for the seg_jax worker.")

R50_320 = {"backbone": "resnet50", "width": 64, "stem": "imagenet", "fpn_features": 256,
           "anchor_sizes": (32, 64, 128, 256, 512), "rpn_pre_nms_topk": 2000,
           "rpn_post_nms_topk": 1000, "rpn_num_samples": 256, "roi_num_samples": 512,
           "canonical_size": 224.0, "box_head_hidden": 1024, "mask_head_features": 256,
           "detections_per_image": 100}


def benchmark_config():
  """The config, with `--r50_320`'s settings under any `--config.*` flag the user gave,
  ImageNet input normalisation (torchvision's) and a constant learning rate."""
  config = _CONFIG.value
  config.model.input_normalization = "imagenet"
  config.optimizer.schedule = "constant"  # torchvision's side steps at a constant rate too
  if not _LEARN.value:
    config.optimizer.learning_rate = 1e-12
  if _R50_320.value:
    given = {arg.split("=")[0][len("--config.model."):] for arg in sys.argv
             if arg.startswith("--config.model.")}
    for key, value in R50_320.items():
      if key not in given:
        config.model[key] = value
    if not any(arg.startswith("--config.dataset.image_size") for arg in sys.argv):
      config.dataset.image_size = 320
    if not any(arg.startswith("--config.batch_size") for arg in sys.argv):
      config.batch_size = 2
  return config


def seg_jax_runner(config):
  """(run one step, info) of seg_jax's jitted step."""
  step = harness.synthetic_step(config, _STEP.value)
  holder = {"state": step.state}

  def run():
    if _STEP.value == "train":
      holder["state"], metrics = step.compiled(holder["state"], step.batch)
      # Every RoI sampled (none is padding here), so the fraction gives the count.
      return {"mask_rois": float(metrics["roi_foreground_fraction"])
                           * config.batch_size * config.model.roi_num_samples}
    out = step.compiled(holder["state"], step.batch)
    return {"mask_rois": float(np.sum(out["valid"]))}

  return run, {"compile_s": round(step.compile_s, 2), "jax": jax.__version__}


def torchvision_model(config):
  """torchvision's MaskRCNN / FasterRCNN with the architecture and budgets of `config.model`."""
  import torch
  from torch import nn
  import torchvision
  from torchvision.models.detection import backbone_utils, faster_rcnn, mask_rcnn
  from torchvision.models.detection.anchor_utils import AnchorGenerator
  from torchvision.ops import MultiScaleRoIAlign
  from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

  m = config.model
  if m.width != 64 or m.stem != "imagenet":
    raise SystemExit("torchvision's ResNets have width 64 and the imagenet stem: set "
                     "--config.model.width=64 --config.model.stem=imagenet")
  if m.mask_size != 28:
    raise SystemExit("torchvision's mask head makes 28 px masks: set --config.model.mask_size=28")
  with_masks = registry.model_entry(m.name).fixed["with_masks"]
  torch.manual_seed(0)
  resnet = getattr(torchvision.models, m.backbone)(weights=None, norm_layer=nn.BatchNorm2d)
  # A stage's output width is the input width of its last block (every stage has two or more).
  stage_channels = [getattr(resnet, f"layer{i + 1}")[-1].conv1.in_channels for i in range(4)]
  backbone = backbone_utils.BackboneWithFPN(
      resnet, return_layers={f"layer{i + 1}": str(i) for i in range(4)},
      in_channels_list=stage_channels, out_channels=m.fpn_features,
      extra_blocks=LastLevelMaxPool(), norm_layer=None)
  anchors = AnchorGenerator(sizes=tuple((int(s),) for s in m.anchor_sizes),
                            aspect_ratios=(tuple(float(r) for r in m.aspect_ratios),) * 5)
  num_classes = config.dataset.num_classes  # background included, as torchvision counts
  pooled = lambda size: MultiScaleRoIAlign(["0", "1", "2", "3"], size, 2,
                                           canonical_scale=int(m.canonical_size))
  size = config.dataset.image_size
  common = dict(
      min_size=size, max_size=size, rpn_anchor_generator=anchors,
      rpn_pre_nms_top_n_train=m.rpn_pre_nms_topk, rpn_pre_nms_top_n_test=m.rpn_pre_nms_topk,
      rpn_post_nms_top_n_train=m.rpn_post_nms_topk, rpn_post_nms_top_n_test=m.rpn_post_nms_topk,
      rpn_nms_thresh=m.rpn_nms_threshold, rpn_batch_size_per_image=m.rpn_num_samples,
      box_roi_pool=pooled(7),
      box_head=faster_rcnn.TwoMLPHead(m.fpn_features * 7 * 7, m.box_head_hidden),
      box_predictor=faster_rcnn.FastRCNNPredictor(m.box_head_hidden, num_classes),
      box_score_thresh=m.score_threshold, box_nms_thresh=m.nms_threshold,
      box_detections_per_img=m.detections_per_image, box_batch_size_per_image=m.roi_num_samples,
      box_positive_fraction=m.roi_positive_fraction)
  if not with_masks:
    return faster_rcnn.FasterRCNN(backbone, **common)
  return mask_rcnn.MaskRCNN(
      backbone, mask_roi_pool=pooled(14),
      mask_head=mask_rcnn.MaskRCNNHeads(m.fpn_features, (m.mask_head_features,) * 4, 1),
      mask_predictor=mask_rcnn.MaskRCNNPredictor(m.mask_head_features, m.mask_head_features,
                                                 num_classes),
      **common)


def torchvision_runner(config):
  """(run one step, info) of torchvision's model on the same scenes."""
  import torch
  import torchvision

  torch.set_num_threads(os.cpu_count() or 1)
  model = torchvision_model(config)
  if _WEIGHTS_OUT.value:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, _WEIGHTS_OUT.value)
  batch = synthetic_data.batch(config)
  images = [torch.from_numpy(image_io.model_input_to_unit(image, "imagenet")).permute(2, 0, 1)
            .contiguous() for image in batch["image"]]
  targets = []
  for boxes, classes, masks in zip(batch["boxes"], batch["classes"], batch["instance_masks"]):
    real = classes > 0
    targets.append({"boxes": torch.from_numpy(boxes[real][:, [1, 0, 3, 2]].copy()),  # x0 y0 x1 y1
                    "labels": torch.from_numpy(classes[real].astype(np.int64)),
                    "masks": torch.from_numpy(masks[real])})
  o = config.optimizer
  optimizer = torch.optim.AdamW(model.parameters(), lr=o.learning_rate, weight_decay=o.weight_decay)

  counted = []
  with_masks = model.roi_heads.has_mask()
  if with_masks:
    model.roi_heads.mask_roi_pool.register_forward_hook(
        lambda module, inputs, output: counted.append(output.shape[0]))

  def mask_rois():
    return {"mask_rois": float(counted.pop())} if with_masks else {}

  def train_step():
    losses = model(images, targets)
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if o.grad_clip_norm:
      torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip_norm)
    optimizer.step()
    loss.item()
    return mask_rois()

  def eval_step():
    with torch.no_grad():
      model(images)
    return mask_rois()

  if _STEP.value == "train":
    model.train()
    return train_step, {"torch": torch.__version__, "torchvision": torchvision.__version__}
  model.eval()
  return eval_step, {"torch": torch.__version__, "torchvision": torchvision.__version__}


# torch.profiler operation names -> the kinds the README's table compares.
_TORCH_KINDS = (("convolution_backward", "conv gradient"), ("convolution", "conv forward"),
                ("_roi_align_backward", "RoIAlign gradient"), ("roi_align", "RoIAlign forward"),
                ("nms", "NMS"), ("batch_norm", "batch norm"), ("aten::mm", "matmul"),
                ("aten::addmm", "matmul"), ("Optimizer", "optimizer"))


def profile_torchvision(config) -> None:
  """Prints torchvision's step time by kind of operation (self CPU time, ms per step)."""
  from torch.profiler import ProfilerActivity, profile
  run, info = torchvision_runner(config)
  for _ in range(2):
    run()
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(_STEPS.value):
      run()
  kinds: dict[str, float] = {}
  for event in prof.key_averages():
    kind = next((k for key, k in _TORCH_KINDS if key in event.key), "other")
    kinds[kind] = kinds.get(kind, 0.0) + event.self_cpu_time_total / 1e3 / _STEPS.value
  print(json.dumps({"benchmark": "profile_torchvision", "step": _STEP.value,
                    "self_cpu_ms_per_step": {k: round(v, 1) for k, v in
                                             sorted(kinds.items(), key=lambda kv: -kv[1])},
                    **info}))


def main(_):
  config = benchmark_config()
  if _PROFILE_TORCHVISION.value:
    return profile_torchvision(config)
  if _WORKER.value == "seg_jax":
    return harness.serve(*seg_jax_runner(config))
  if _WORKER.value == "torchvision":
    return harness.serve(*torchvision_runner(config))
  # The same initial weights in both (seg_jax loads torchvision's through model.init_from), so
  # that both untrained RPNs propose the same boxes and both heads see the same RoIs.
  weights = os.path.join(tempfile.mkdtemp(), "torchvision_init.safetensors")
  tv_worker, tv_info = harness.start_worker(__file__, "torchvision", (f"--weights_out={weights}",))
  jax_worker, jax_info = harness.start_worker(__file__, "seg_jax",
                                              (f"--config.model.init_from={weights}",))
  jax_report, tv_report = harness.interleaved_steps([jax_worker, tv_worker], _STEPS.value,
                                                    warmup=2)
  jax_s, tv_s = jax_report["seconds"], tv_report["seconds"]
  b, m = config.batch_size, config.model
  print(json.dumps({
      "benchmark": "compare_torchvision", "step": _STEP.value, "model": m.name,
      "backbone": m.backbone, "batch_size": b, "image_size": config.dataset.image_size,
      "seg_jax_step_ms": round(jax_s * 1e3, 1), "seg_jax_img_per_s": round(b / jax_s, 3),
      "torchvision_step_ms": round(tv_s * 1e3, 1), "torchvision_img_per_s": round(b / tv_s, 3),
      "ratio": round(tv_s / jax_s, 3), "seg_jax_compile_s": jax_info["compile_s"],
      # RoIs the mask heads were given (the real ones; seg_jax pads up to a budget): they
      # follow the proposals of each untrained RPN, so the two differ from step to step.
      "seg_jax_mask_rois_per_step": jax_report.get("mask_rois"),
      "torchvision_mask_rois_per_step": tv_report.get("mask_rois"),
      "budgets": {k: m[k] for k in ("rpn_pre_nms_topk", "rpn_post_nms_topk", "rpn_num_samples",
                                    "roi_num_samples", "detections_per_image")},
      "jax": jax_info["jax"], "torch": tv_info["torch"], "torchvision": tv_info["torchvision"],
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "cpu_count": os.cpu_count(),
      "python": platform.python_version()}))


if __name__ == "__main__":
  app.run(main)
