"""Faster R-CNN and Mask R-CNN (He et al., 2017) as one linen module with static shapes.

`MaskRCNN(...)(images, targets, train=True)` returns the training losses;
`MaskRCNN(...)(images, train=False)` returns fixed-size detections. Every
array has a shape known at trace time, so the whole model jits once per
image size and runs data-parallel like the semantic models:

- anchors are numpy constants computed from the pyramid's static sizes;
- the RPN keeps a fixed `pre_nms_topk` per level and `post_nms_topk` proposals
  per image, padded, with a validity mask (`rpn.generate_proposals`);
- ground truth comes padded to G boxes per image with `gt_valid`, and optionally with
  crowd regions, which make the anchors and proposals they cover neither positives nor
  negatives (`targets.crowd_ignore`, `crowd_ignore_coverage`);
- the second stage samples exactly `roi_num_samples` RoIs per image, foreground
  first (`roi_heads.sample_rois`), and the mask head runs on the first rows
  of them, which hold every sampled foreground RoI (at most
  `roi_num_samples * roi_positive_fraction`; padding rows carry no loss);
- inference keeps `detections_per_image` boxes per image with a validity mask.

The price of static shapes: padded rows cost compute, and the budgets
(G, proposals, RoIs, detections) are fixed per config rather than per image. The
mask head, the costliest part per row, runs on the smallest of a ladder of static
budgets that holds the real rows (`budgets.py`): its foreground RoIs in training,
its valid detections at inference.

Targets (train): `gt_boxes [N, G, 4]` (y0, x0, y1, x1) in pixels, `gt_classes
[N, G]` in 1..K, `gt_valid [N, G]` bool, for masks `gt_masks [N, G, H, W]`, and optionally
`gt_crowd [N, H, W]` (bool or 0/1: COCO's iscrowd regions).
Sampling needs the 'sampling' PRNG stream (`rngs={'sampling': key}`).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from seg_jax import registry
from seg_jax.models import resnet
from seg_jax.models.detection import anchors as anchor_ops
from seg_jax.models.detection import budgets
from seg_jax.models.detection import fpn as fpn_ops
from seg_jax.models.detection import postprocess
from seg_jax.models.detection import roi_align as roi_ops
from seg_jax.models.detection import roi_heads
from seg_jax.models.detection import rpn as rpn_ops
from seg_jax.models.detection import targets as target_ops
from seg_jax.models.detection import torchvision_weights  # registers its init_from layout

RPN_LEVELS = (2, 3, 4, 5, 6)   # P2-P6 for proposals
ROI_LEVELS = (2, 3, 4, 5)      # P2-P5 for RoIAlign
ROI_KEYS = tuple(f"p{k}" for k in ROI_LEVELS)


class MaskRCNN(nn.Module):
  """A ResNet-FPN detector with fixed budgets: every one is a static shape, so each image is
  given exactly this many anchors, proposals, RoIs and detections."""
  num_classes: int = 1                               # K object classes (no background)
  with_masks: bool = True                            # False: Faster R-CNN
  backbone: str = "resnet50"                         # a ResNet (resnet.RESNETS)
  width: int = 64                                    # its stage-1 width
  stem: str = "imagenet"                             # imagenet | small (both of stride 4)
  norm: str = "batch"
  norm_groups: int = 8
  frozen_backbone_norm: bool = False                 # the ResNet's batch norms as loaded (FrozenBN)
  fpn_features: int = 256
  anchor_sizes: Sequence[float] = (32, 64, 128, 256, 512)  # anchor side of P2..P6, pixels
  aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)   # anchor height / width
  rpn_pre_nms_topk: int = 2000                       # proposals kept per level before NMS
  rpn_post_nms_topk: int = 1000                      # proposals per image after NMS
  rpn_nms_threshold: float = 0.7
  rpn_num_samples: int = 256                         # anchors per image in the RPN loss
  roi_num_samples: int = 512                         # RoIs per image in the second stage's losses
  roi_positive_fraction: float = 0.25
  crowd_ignore_coverage: float = 0.7                 # anchors/RoIs this much inside a crowd: ignored
  canonical_size: float = 224.0                      # RoI of this side pools from P4 (FPN eq. 1)
  box_head_hidden: int = 1024                        # the two FC layers of the box head
  mask_head_features: int = 256                      # the four 3x3 convs of the mask head
  mask_size: int = 28                                # mask head output, per RoI and class
  score_threshold: float = 0.05                      # inference: lowest class probability kept
  nms_threshold: float = 0.5                         # inference: per-class NMS IoU
  detections_per_image: int = 100
  dtype: Any = jnp.float32

  @property
  def _level_sizes(self) -> tuple[tuple[float], ...]:
    """One anchor size per pyramid level, in anchor_ops' per-level form."""
    return tuple((float(s),) for s in self.anchor_sizes)

  def _anchors(self, pyramid: dict[str, jax.Array]):
    sizes = [pyramid[f"p{k}"].shape[1:3] for k in RPN_LEVELS]
    return anchor_ops.multilevel_anchors(sizes, strides=[2 ** k for k in RPN_LEVELS],
                                         sizes=self._level_sizes,
                                         aspect_ratios=tuple(float(r) for r in self.aspect_ratios))

  def _pool(self, pyramid, boxes, size):
    return roi_ops.multilevel_roi_align(
        [pyramid[k] for k in ROI_KEYS], boxes, min_level=ROI_LEVELS[0], output_size=size,
        sampling_ratio=2, canonical_size=self.canonical_size)

  def _mask_head(self) -> roi_heads.MaskHead:
    """The mask head as a pure function of its parameters (`parent=None`): it runs inside
    `budgets`' switch branches and custom gradient, where flax modules cannot be bound."""
    return roi_heads.MaskHead(self.num_classes, self.mask_head_features, dtype=self.dtype,
                              parent=None)

  def _mask_loss(self, rows: int, head_params, levels, constants) -> jax.Array:
    """The mask loss over the first `rows` RoIs of each image (foreground RoIs come first)."""
    gt_masks, rois = constants
    fg_rois = jax.tree.map(lambda x: x[:, :rows], rois)
    with jax.named_scope("mask_roi_align"):
      pooled = self._pool(dict(zip(ROI_KEYS, levels)), fg_rois.boxes, self.mask_size // 2)
    with jax.named_scope("mask_head"):
      mask_logits = self._mask_head().apply({"params": head_params}, pooled)
    with jax.named_scope("mask_targets"):
      targets = roi_heads.mask_targets(gt_masks, fg_rois, size=self.mask_size)
    with jax.named_scope("losses"):
      return roi_heads.mask_loss(mask_logits, targets, fg_rois)

  def _mask_probs(self, rows: int, head_params, levels, boxes, classes) -> jax.Array:
    """`[N, D, M, M]` mask probabilities of the first `rows` detections' classes; 0 past them."""
    with jax.named_scope("mask_roi_align"):
      pooled = self._pool(dict(zip(ROI_KEYS, levels)), boxes[:, :rows], self.mask_size // 2)
    with jax.named_scope("mask_head"):
      mask_logits = self._mask_head().apply({"params": head_params}, pooled)  # [N, rows, M, M, K]
    index = jnp.maximum(classes[:, :rows] - 1, 0)[..., None, None, None]
    probs = jax.nn.sigmoid(jnp.take_along_axis(mask_logits, index, axis=-1)[..., 0])
    return jnp.pad(probs, ((0, 0), (0, boxes.shape[1] - rows), (0, 0), (0, 0)))

  @nn.compact
  def __call__(self, images: jax.Array, targets: dict | None = None, *, train: bool):
    image_size = images.shape[1:3]
    pyramid = fpn_ops.ResNetFPN(backbone=self.backbone, width=self.width, stem=self.stem,
                                norm=self.norm, norm_groups=self.norm_groups,
                                frozen_norm=self.frozen_backbone_norm,
                                features=self.fpn_features, dtype=self.dtype,
                                name="backbone")(images, train=train)
    level_anchors = self._anchors(pyramid)
    num_anchors = anchor_ops.num_anchors_per_cell(self._level_sizes[0], self.aspect_ratios)
    logits, deltas = rpn_ops.RPNHead(num_anchors, self.dtype, name="rpn")(
        [pyramid[f"p{k}"] for k in RPN_LEVELS])
    with jax.named_scope("proposals"):
      proposals, _, proposal_valid = rpn_ops.generate_proposals(
          logits, deltas, level_anchors, image_size, pre_nms_topk=self.rpn_pre_nms_topk,
          post_nms_topk=self.rpn_post_nms_topk, iou_threshold=self.rpn_nms_threshold)
    box_head = roi_heads.BoxHead(self.num_classes, self.box_head_hidden, self.dtype,
                                 name="box_head")
    if self.with_masks:
      # A submodule named mask_head owns the parameters (initialised as any submodule's);
      # the head then runs as a pure function of them (`_mask_head`).
      owner = roi_heads.MaskHead(self.num_classes, self.mask_head_features, dtype=self.dtype,
                                 name="mask_head")
      if self.is_initializing():
        half = self.mask_size // 2
        owner(jnp.zeros((1, half, half, self.fpn_features), jnp.float32))
      mask_head_params = owner.variables["params"]
      levels = [pyramid[k] for k in ROI_KEYS]

    if not train:
      with jax.named_scope("box_roi_align"):
        pooled = self._pool(pyramid, proposals, 7)
      class_logits, box_deltas = box_head(pooled)
      with jax.named_scope("detect"):
        boxes, scores, classes, valid = postprocess.detect(
            class_logits, box_deltas, proposals, proposal_valid, image_size,
            score_threshold=self.score_threshold, iou_threshold=self.nms_threshold,
            max_detections=self.detections_per_image)
      out = {"boxes": boxes, "scores": scores, "classes": classes, "valid": valid}
      if self.with_masks:
        # Detections come valid first, so the head runs on the fewest rows holding them all.
        out["masks"] = budgets.on_budget(jnp.max(jnp.sum(valid, axis=1)),
                                         self.detections_per_image, self._mask_probs,
                                         mask_head_params, levels, boxes, classes)
      return out

    rpn_key, roi_key = jax.random.split(self.make_rng("sampling"))
    crowd = targets.get("gt_crowd")
    # The named scopes label the parts in profiles (benchmarks/profile_step.py).
    with jax.named_scope("rpn_targets"):
      all_anchors = jnp.concatenate([jnp.asarray(a) for a in level_anchors], axis=0)
      positive, negative, target_deltas = target_ops.rpn_targets(
          all_anchors, targets["gt_boxes"], targets["gt_valid"], rpn_key,
          num_samples=self.rpn_num_samples, crowd=crowd,
          crowd_coverage=self.crowd_ignore_coverage)
    with jax.named_scope("losses"):
      losses = target_ops.rpn_loss(logits, deltas, positive, negative, target_deltas,
                                   num_samples=self.rpn_num_samples)
    with jax.named_scope("roi_sampling"):
      rois = roi_heads.sample_rois(proposals, proposal_valid, targets["gt_boxes"],
                                   targets["gt_classes"], targets["gt_valid"], roi_key,
                                   num_samples=self.roi_num_samples,
                                   positive_fraction=self.roi_positive_fraction, crowd=crowd,
                                   crowd_coverage=self.crowd_ignore_coverage)
    with jax.named_scope("box_roi_align"):
      pooled = self._pool(pyramid, rois.boxes, 7)
    class_logits, box_deltas = box_head(pooled)
    with jax.named_scope("losses"):
      losses.update(roi_heads.fast_rcnn_loss(class_logits, box_deltas, rois))
    if self.with_masks:
      # Foreground RoIs come first; the head runs on the fewest rows holding every image's.
      losses["mask"] = budgets.scalar_loss(
          jnp.max(jnp.sum(rois.foreground, axis=1)),
          int(self.roi_num_samples * self.roi_positive_fraction), self._mask_loss,
          mask_head_params, levels, (targets["gt_masks"], rois))
    losses["roi_foreground_fraction"] = rois.foreground.sum() / jnp.maximum(rois.valid.sum(), 1)
    return losses


LOSS_PARTS = ("rpn_objectness", "rpn_box", "box_cls", "box_reg", "mask")


def total_loss(losses: dict[str, jax.Array]) -> jax.Array:
  """Sum of the loss terms (diagnostics such as roi_foreground_fraction are not)."""
  return sum(losses[name] for name in LOSS_PARTS if name in losses)


def _check(config) -> None:
  m = config.model
  resnet.check_backbone(m)
  if resnet.STEM_STRIDES[m.stem] != 4:
    registry.fail("model.stem", m.stem, "the FPN needs a stem of stride 4: imagenet or small")
  if len(m.anchor_sizes) != len(RPN_LEVELS) or any(s <= 0 for s in m.anchor_sizes):
    registry.fail("model.anchor_sizes", m.anchor_sizes, "must be 5 positive sizes, one per P2..P6")
  if not m.aspect_ratios or any(r <= 0 for r in m.aspect_ratios):
    registry.fail("model.aspect_ratios", m.aspect_ratios, "must be positive height/width ratios")
  for key in ("fpn_features", "rpn_pre_nms_topk", "rpn_post_nms_topk", "rpn_num_samples",
              "roi_num_samples", "box_head_hidden", "mask_head_features", "mask_size",
              "detections_per_image"):
    registry.check_int(f"model.{key}", m[key])
  if m.mask_size % 2:
    registry.fail("model.mask_size", m.mask_size, "must be even (the head upsamples 2x)")
  for key in ("rpn_nms_threshold", "nms_threshold", "score_threshold", "roi_positive_fraction",
              "crowd_ignore_coverage"):
    registry.check_fraction(f"model.{key}", m[key])
  if int(m.roi_num_samples * m.roi_positive_fraction) < 1:
    registry.fail("model.roi_positive_fraction", m.roi_positive_fraction,
                  f"leaves no foreground RoI of roi_num_samples={m.roi_num_samples}")


def _entry(name: str, with_masks: bool, description: str) -> registry.ModelEntry:
  return registry.register_model(registry.ModelEntry(
      name=name, module=MaskRCNN, task="instance",
      defaults=registry.field_defaults(MaskRCNN, exclude=("num_classes", "with_masks", "dtype")),
      fixed={"with_masks": with_masks},
      input_multiple=lambda m: resnet.input_divisor(32, m.stem),  # the FPN's ResNet: stride 32
      input_multiple_reason=lambda m: f"the input multiple of {name}'s ResNet-FPN",
      check=_check, description=description,
      backbone=lambda m: "backbone/backbone",  # the ResNet; the FPN is new in every run
      inference_keys=("score_threshold", "nms_threshold", "detections_per_image")))


MASK_RCNN = _entry("mask_rcnn", True, "Mask R-CNN: ResNet-FPN, box and mask heads")
FASTER_RCNN = _entry("faster_rcnn", False, "Faster R-CNN: ResNet-FPN, box head")
