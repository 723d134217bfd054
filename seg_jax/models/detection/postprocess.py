"""Detections from the box head's outputs, and instance masks pasted back into the image.

`detect` scores every (RoI, class) pair by softmax probability, decodes that
class's box, drops pairs below `score_threshold` or with an empty box, runs
NMS within each class and keeps the `max_detections` best: a fixed-size result
with a validity mask, as detectron2's `fast_rcnn_inference` computes it.

`paste_masks` maps each detection's `M x M` mask probabilities into the
image: every image pixel centre inside the box samples the mask bilinearly
(pixel centres of the mask at ((i + 0.5) / M) of the box, edge values held up
to the box border), and pixels outside the box are 0. Thresholded at 0.5
this is detectron2's `paste_masks_in_image` up to its integer rounding of the
box at the image border.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seg_jax.models.detection import boxes as box_ops
from seg_jax.models.detection import nms as nms_ops
from seg_jax.models.detection.roi_heads import BOX_WEIGHTS


def detect(class_logits: jax.Array, box_deltas: jax.Array, rois: jax.Array, roi_valid: jax.Array,
           image_size: tuple[int, int], *, score_threshold: float = 0.05,
           iou_threshold: float = 0.5, max_detections: int = 100
           ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """`(boxes [N, D, 4], scores [N, D], classes [N, D] in 1..K, valid [N, D])`, D = max_detections.

  Args:
    class_logits: `[N, R, K + 1]` (background first); box_deltas: `[N, R, K, 4]`.
    rois: `[N, R, 4]` the boxes the head saw; roi_valid: bool `[N, R]`.
  """
  n, r, k1 = class_logits.shape
  k = k1 - 1
  probs = jax.nn.softmax(class_logits, axis=-1)[..., 1:]                      # [N, R, K]
  boxes = box_ops.decode_boxes(box_deltas, rois[:, :, None, :], BOX_WEIGHTS)   # [N, R, K, 4]
  boxes = box_ops.clip_boxes(boxes, *image_size)
  valid = (roi_valid[..., None] & (probs > score_threshold) & box_ops.nonempty_boxes(boxes))
  classes = jnp.broadcast_to(jnp.arange(1, k + 1, dtype=jnp.int32), (n, r, k))
  flat = lambda x: x.reshape((n, r * k) + x.shape[3:])
  boxes, probs, valid, classes = flat(boxes), flat(probs), flat(valid), flat(classes)
  keep, keep_valid = nms_ops.per_class_nms(boxes, probs, classes, iou_threshold=iou_threshold,
                                           max_output=max_detections, valid=valid)
  take = lambda x: jnp.take_along_axis(x, keep.reshape(keep.shape + (1,) * (x.ndim - 2)), axis=1)
  out_boxes = jnp.where(keep_valid[..., None], take(boxes), 0.0)
  return (out_boxes, jnp.where(keep_valid, take(probs), 0.0),
          jnp.where(keep_valid, take(classes), 0), keep_valid)


def paste_masks(mask_probs: jax.Array, boxes: jax.Array, image_size: tuple[int, int]) -> jax.Array:
  """Float `[..., H, W]` mask probabilities in the image from `[..., M, M]` masks and `[..., 4]`
  boxes (threshold at 0.5 for binary masks)."""
  height, width = image_size
  m = mask_probs.shape[-1]

  def axis_weights(lo, hi, size):
    # [..., size, M] interpolation weights of image pixel centres along one axis.
    centre = jnp.arange(size, dtype=jnp.float32) + 0.5
    extent = jnp.maximum(hi - lo, 1e-6)[..., None]
    u = (centre - lo[..., None]) / extent * m - 0.5                           # mask coordinates
    inside = (centre >= lo[..., None]) & (centre < hi[..., None])
    u = jnp.clip(u, 0.0, m - 1.0)
    low = jnp.floor(u)
    frac = u - low
    grid = jnp.arange(m, dtype=jnp.float32)
    weights = ((grid == low[..., None]) * (1 - frac[..., None])
               + (grid == jnp.minimum(low + 1, m - 1)[..., None]) * frac[..., None])
    return weights * inside[..., None]

  wy = axis_weights(boxes[..., 0], boxes[..., 2], height)                     # [..., H, M]
  wx = axis_weights(boxes[..., 1], boxes[..., 3], width)                      # [..., W, M]
  return jnp.einsum("...hm,...mn,...wn->...hw", wy, mask_probs.astype(jnp.float32), wx)
