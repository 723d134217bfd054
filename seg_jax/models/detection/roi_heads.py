"""Second stage of Faster/Mask R-CNN with static shapes: RoI sampling, box head, mask head, losses.

Class ids: 0 is background, 1..K the object classes (the dataset's instance
label + 1), so the box classifier has K + 1 logits and the box and mask heads
predict per object class (K outputs, class c at index c - 1).

`sample_rois` appends the ground-truth boxes to the proposals (as detectron2
does, so every object has a perfect RoI early in training), matches with one
IoU threshold (>= 0.5 foreground, below background), and returns exactly
`num_samples` RoIs per image: the sampled foreground first, then the sampled
background, then padding (valid=False) when there were too few candidates.

Mask targets are the ground-truth instance masks RoI-aligned (28x28 by default)
over each foreground RoI and thresholded at 0.5, as in detectron2.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import optax

from seg_jax.models import layers
from seg_jax.models.detection import boxes as box_ops
from seg_jax.models.detection import roi_align as roi_ops
from seg_jax.models.detection import targets as target_ops

BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)   # Fast R-CNN box coding (detectron2, torchvision)


class SampledRois(NamedTuple):
  boxes: jax.Array          # [N, S, 4]
  classes: jax.Array        # [N, S] int32: 0 background, 1..K foreground
  matched_gt: jax.Array     # [N, S] int32 index into the image's ground truth (foreground rows)
  target_deltas: jax.Array  # [N, S, 4] box targets of foreground rows (BOX_WEIGHTS), else 0
  foreground: jax.Array     # [N, S] bool
  valid: jax.Array          # [N, S] bool: a sampled RoI (foreground or background), not padding


def sample_rois(proposals: jax.Array, proposal_valid: jax.Array, gt_boxes: jax.Array,
                gt_classes: jax.Array, gt_valid: jax.Array, key: jax.Array, *,
                num_samples: int = 512, positive_fraction: float = 0.25,
                iou_threshold: float = 0.5, crowd: jax.Array | None = None,
                crowd_coverage: float = 0.7) -> SampledRois:
  """RoIs and their targets for a batch (proposals `[N, P, 4]`, ground truth `[N, G, ...]`;
  `gt_classes` are 1..K; optional crowd regions `[N, H, W]`, whose covered proposals are not
  sampled as background: `target_ops.crowd_ignore`)."""

  def one(props, props_valid, boxes, classes, valid, key, crowd):
    candidates = jnp.concatenate([props, boxes], axis=0)
    candidate_valid = jnp.concatenate([props_valid, valid], axis=0)
    matched, labels = target_ops.match(
        candidates, boxes, valid, high=iou_threshold, low=iou_threshold, allow_low_quality=False,
        ignore=target_ops.crowd_ignore(candidates, crowd, crowd_coverage))
    labels = jnp.where(candidate_valid, labels, target_ops.IGNORE)
    positive, negative = target_ops.sample(labels, key, num_samples=num_samples,
                                           positive_fraction=positive_fraction)
    # Foreground first, then background, then the rest; a stable order by candidate index.
    rank = jnp.where(positive, 2, jnp.where(negative, 1, 0))
    order = jnp.argsort(-rank, stable=True)[:num_samples]
    rois = candidates[order]
    fg = positive[order]
    sampled = fg | negative[order]
    gt_index = matched[order]
    roi_classes = jnp.where(fg, classes[gt_index], 0).astype(jnp.int32)
    deltas = box_ops.encode_boxes(boxes[gt_index], rois, BOX_WEIGHTS)
    return SampledRois(rois, roi_classes, gt_index, jnp.where(fg[:, None], deltas, 0.0), fg,
                       sampled)

  if proposals.shape[1] + gt_boxes.shape[1] < num_samples:
    raise ValueError(f"{proposals.shape[1]} proposals + {gt_boxes.shape[1]} ground-truth boxes "
                     f"per image cannot fill num_samples={num_samples} RoIs")
  keys = jax.random.split(key, proposals.shape[0])
  return jax.vmap(one)(lax.stop_gradient(proposals), proposal_valid, gt_boxes, gt_classes,
                       gt_valid, keys, crowd)


class BoxHead(nn.Module):
  """Two fully connected layers on pooled RoI features, then class logits `[.., K+1]` and
  per-class box deltas `[.., K, 4]`."""
  num_classes: int            # K object classes (background not counted)
  hidden: int = 1024
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pooled: jax.Array) -> tuple[jax.Array, jax.Array]:
    lead = pooled.shape[:-3]
    x = pooled.reshape(lead + (-1,)).astype(self.dtype)
    x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x))
    x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="fc2")(x))
    logits = nn.Dense(self.num_classes + 1, dtype=self.dtype, name="cls",
                      kernel_init=nn.initializers.normal(0.01))(x)
    deltas = nn.Dense(4 * self.num_classes, dtype=self.dtype, name="box",
                      kernel_init=nn.initializers.normal(0.001))(x)
    return (logits.astype(jnp.float32),
            deltas.reshape(lead + (self.num_classes, 4)).astype(jnp.float32))


class MaskHead(nn.Module):
  """Four 3x3 convs, a learned 2x upsampling, and one mask logit map per class:
  `[.., 14, 14, C]` -> `[.., 28, 28, K]`."""
  num_classes: int
  features: int = 256
  num_convs: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pooled: jax.Array) -> jax.Array:
    lead = pooled.shape[:-3]
    x = pooled.reshape((-1,) + pooled.shape[-3:]).astype(self.dtype)
    for i in range(self.num_convs):
      x = nn.relu(layers.Conv(self.features, (3, 3), dtype=self.dtype, name=f"conv{i + 1}")(x))
    # The function of a 2x2 stride-2 transposed conv, without its slow gradient (layers.py).
    x = nn.relu(layers.LearnedUpsample2x(self.features, dtype=self.dtype, name="upsample")(x))
    x = layers.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="predictor")(x)
    return x.reshape(lead + x.shape[1:]).astype(jnp.float32)


def fast_rcnn_loss(class_logits: jax.Array, box_deltas: jax.Array, rois: SampledRois, *,
                   smooth_l1_beta: float = 0.0) -> dict[str, jax.Array]:
  """Softmax cross-entropy over the sampled RoIs, and box regression of the ground-truth class
  on foreground RoIs; both divided by the number of sampled RoIs (detectron2's normalisation)."""
  count = jnp.maximum(rois.valid.sum(), 1)
  ce = optax.softmax_cross_entropy_with_integer_labels(class_logits, rois.classes)
  cls_loss = jnp.sum(jnp.where(rois.valid, ce, 0.0)) / count
  class_index = jnp.maximum(rois.classes - 1, 0)
  chosen = jnp.take_along_axis(box_deltas, class_index[..., None, None], axis=-2)[..., 0, :]
  box = target_ops.smooth_l1(chosen - rois.target_deltas, smooth_l1_beta).sum(axis=-1)
  box_loss = jnp.sum(jnp.where(rois.foreground, box, 0.0)) / count
  return {"box_cls": cls_loss, "box_reg": box_loss}


def mask_targets(gt_masks: jax.Array, rois: SampledRois, *, size: int = 28) -> jax.Array:
  """Binary `[N, S, size, size]` targets: each RoI's matched instance mask, RoI-aligned
  over the RoI box and thresholded at 0.5 (zeros for background and padding RoIs).

  `gt_masks`: `[N, G, H, W]` instance masks in image pixels.
  """
  as_channels = jnp.moveaxis(gt_masks.astype(jnp.float32), 1, -1)          # [N, H, W, G]
  pooled = roi_ops.roi_align(as_channels, rois.boxes, output_size=size, spatial_scale=1.0,
                             sampling_ratio=2, aligned=True)                 # [N, S, s, s, G]
  mine = jnp.take_along_axis(pooled, rois.matched_gt[:, :, None, None, None], axis=-1)[..., 0]
  return jnp.where(rois.foreground[..., None, None], mine >= 0.5, False)


def mask_loss(mask_logits: jax.Array, targets: jax.Array, rois: SampledRois) -> jax.Array:
  """Mean per-pixel BCE of the ground-truth class's mask over foreground RoIs (0 if none)."""
  class_index = jnp.maximum(rois.classes - 1, 0)
  logits = jnp.take_along_axis(mask_logits, class_index[..., None, None, None], axis=-1)[..., 0]
  bce = optax.sigmoid_binary_cross_entropy(logits, targets.astype(jnp.float32))
  pixels = logits.shape[-1] * logits.shape[-2]
  count = jnp.maximum(rois.foreground.sum(), 1) * pixels
  return jnp.sum(jnp.where(rois.foreground[..., None, None], bce, 0.0)) / count
