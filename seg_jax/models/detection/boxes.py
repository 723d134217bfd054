"""Axis-aligned box geometry: area, IoU matrices, clipping and R-CNN box coding.

Convention, used by every module in `seg_jax.models.detection` and by the data
contract: a box is `(y0, x0, y1, x1)` in input-image pixels, float, with the
pixel grid continuous -- pixel (i, j) covers `[i, i+1) x [j, j+1)`, so a box
that covers the whole `H x W` image is `(0, 0, H, W)`. Height is `y1 - y0`
(no "+1"), as in detectron2 and torchvision.

Every function is pure `jnp`, broadcasts over leading axes, and works under
`jit`, `vmap` and `grad`. Degenerate boxes (zero or negative size, e.g. the
zero padding of `max_instances`) never produce NaN or inf: they have area 0,
IoU 0 with everything, and finite deltas, so they can sit in padded arrays
whose loss terms are masked out afterwards (`0 * NaN` would still be NaN).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

# Largest log-scale a decoded box may grow by: exp(clip) turns a 16 px anchor into
# a 1000 px box. detectron2 and torchvision clip dh, dw here before exp, so that an
# untrained regressor cannot overflow the decoded box to inf.
DEFAULT_SCALE_CLIP = math.log(1000.0 / 16)

# Smallest height/width used inside `encode_boxes` logs, so that degenerate
# (padding) boxes give large but finite deltas instead of -inf.
_MIN_SIZE = 1e-6


def box_area(boxes: jax.Array) -> jax.Array:
  """Area of `[..., 4]` boxes -> `[...]`; boxes with negative extent have area 0."""
  boxes = jnp.asarray(boxes)
  height = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0)
  width = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0)
  return height * width


def pairwise_intersection(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """Intersection areas of `[..., N, 4]` and `[..., M, 4]` boxes -> `[..., N, M]`."""
  boxes1 = jnp.asarray(boxes1)[..., :, None, :]
  boxes2 = jnp.asarray(boxes2)[..., None, :, :]
  top_left = jnp.maximum(boxes1[..., :2], boxes2[..., :2])
  bottom_right = jnp.minimum(boxes1[..., 2:], boxes2[..., 2:])
  extent = jnp.maximum(bottom_right - top_left, 0)
  return extent[..., 0] * extent[..., 1]


def pairwise_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """IoU matrix of `[..., N, 4]` and `[..., M, 4]` boxes -> `[..., N, M]`.

  Leading axes broadcast (e.g. `[B, N, 4]` with `[B, M, 4]`). A pair whose union
  is empty (two degenerate boxes) has IoU 0, and its gradient is 0 rather than NaN.
  """
  inter = pairwise_intersection(boxes1, boxes2)
  union = box_area(boxes1)[..., :, None] + box_area(boxes2)[..., None, :] - inter
  positive = union > 0
  return jnp.where(positive, inter / jnp.where(positive, union, 1), 0)


def region_coverage(boxes: jax.Array, region: jax.Array) -> jax.Array:
  """Fraction `[M]` of each box's own area that a binary region `[H, W]` covers.

  The pixels counted are those inside the box's bounds rounded to the grid and clipped to the
  image, read off a summed-area table; the area is the unclipped box's, so a box reaching out
  of the image is covered only by its part inside. Boxes of zero area give 0.
  """
  height, width = region.shape
  table = jnp.pad(jnp.cumsum(jnp.cumsum(region.astype(jnp.int32), axis=0), axis=1),
                  ((1, 0), (1, 0)))
  bounds = jnp.round(boxes).astype(jnp.int32)
  y0, y1 = (jnp.clip(bounds[:, k], 0, height) for k in (0, 2))
  x0, x1 = (jnp.clip(bounds[:, k], 0, width) for k in (1, 3))
  y1, x1 = jnp.maximum(y1, y0), jnp.maximum(x1, x0)
  inside = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
  area = box_area(boxes)
  return jnp.where(area > 0, inside / jnp.maximum(area, 1e-6), 0.0)


def clip_boxes(boxes: jax.Array, height: jax.Array | float, width: jax.Array | float) -> jax.Array:
  """Clips `[..., 4]` boxes to the image `[0, height] x [0, width]`.

  `height` and `width` may be Python numbers or arrays broadcasting against
  `boxes[..., 0]` (e.g. `[B, 1]` for per-image sizes of padded images).
  """
  boxes = jnp.asarray(boxes)
  height = jnp.asarray(height, boxes.dtype)
  width = jnp.asarray(width, boxes.dtype)
  y0 = jnp.clip(boxes[..., 0], 0, height)
  x0 = jnp.clip(boxes[..., 1], 0, width)
  y1 = jnp.clip(boxes[..., 2], 0, height)
  x1 = jnp.clip(boxes[..., 3], 0, width)
  return jnp.stack([y0, x0, y1, x1], axis=-1)


def nonempty_boxes(boxes: jax.Array, min_size: float = 0.0) -> jax.Array:
  """Bool `[...]`: height and width both larger than `min_size` pixels."""
  boxes = jnp.asarray(boxes)
  return ((boxes[..., 2] - boxes[..., 0]) > min_size) & ((boxes[..., 3] - boxes[..., 1]) > min_size)


def _centre_size(boxes: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  height = boxes[..., 2] - boxes[..., 0]
  width = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + 0.5 * height, boxes[..., 1] + 0.5 * width, height, width


def encode_boxes(boxes: jax.Array, anchors: jax.Array,
                 weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> jax.Array:
  """Regression targets that turn `anchors` into `boxes` (the R-CNN box coding).

  With centres (cy, cx), sizes (h, w), anchor a, box b and `weights`
  (wy, wx, wh, ww):

      dy = wy (cy_b - cy_a) / h_a        dh = wh log(h_b / h_a)
      dx = wx (cx_b - cx_a) / w_a        dw = ww log(w_b / w_a)

  Same parametrisation as detectron2's `Box2BoxTransform.get_deltas` and
  torchvision's `BoxCoder.encode`, in (y, x) order. Typical weights: (1, 1, 1, 1)
  for the RPN, (10, 10, 5, 5) for the Fast R-CNN box head.

  Args:
    boxes: `[..., 4]` target boxes.
    anchors: `[..., 4]` reference boxes (anchors or proposals), broadcasting
      with `boxes`.
    weights: (wy, wx, wh, ww).

  Returns:
    float32 `[..., 4]` deltas (dy, dx, dh, dw). Sizes below 1e-6 px are raised
    to 1e-6 first, so degenerate (padding) boxes give finite deltas.
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  anchors = jnp.asarray(anchors, jnp.float32)
  wy, wx, wh, ww = weights
  cy_b, cx_b, h_b, w_b = _centre_size(boxes)
  cy_a, cx_a, h_a, w_a = _centre_size(anchors)
  h_a = jnp.maximum(h_a, _MIN_SIZE)
  w_a = jnp.maximum(w_a, _MIN_SIZE)
  h_b = jnp.maximum(h_b, _MIN_SIZE)
  w_b = jnp.maximum(w_b, _MIN_SIZE)
  return jnp.stack([wy * (cy_b - cy_a) / h_a, wx * (cx_b - cx_a) / w_a,
                    wh * jnp.log(h_b / h_a), ww * jnp.log(w_b / w_a)], axis=-1)


def decode_boxes(deltas: jax.Array, anchors: jax.Array,
                 weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 scale_clip: float = DEFAULT_SCALE_CLIP) -> jax.Array:
  """Applies deltas (dy, dx, dh, dw) to `anchors`: the inverse of `encode_boxes`.

      cy = cy_a + (dy / wy) h_a           h = h_a exp(min(dh / wh, scale_clip))
      cx = cx_a + (dx / wx) w_a           w = w_a exp(min(dw / ww, scale_clip))

  and the box is `(cy - h/2, cx - w/2, cy + h/2, cx + w/2)`. Only the upper side
  of dh, dw is clipped (as in detectron2/torchvision); a very negative delta just
  gives a tiny box. The result is not clipped to the image: use `clip_boxes`.

  Args:
    deltas: `[..., 4]`, e.g. `[R, 4]`, or `[R, K, 4]` per-class deltas with
      anchors `[R, 1, 4]`.
    anchors: `[..., 4]` reference boxes, broadcasting with `deltas`.
    weights: (wy, wx, wh, ww), the ones used for encoding.
    scale_clip: upper bound of dh / wh and dw / ww before exp.

  Returns:
    float32 `[..., 4]` boxes (y0, x0, y1, x1).
  """
  deltas = jnp.asarray(deltas, jnp.float32)
  anchors = jnp.asarray(anchors, jnp.float32)
  wy, wx, wh, ww = weights
  cy_a, cx_a, h_a, w_a = _centre_size(anchors)
  cy = cy_a + deltas[..., 0] / wy * h_a
  cx = cx_a + deltas[..., 1] / wx * w_a
  h = h_a * jnp.exp(jnp.minimum(deltas[..., 2] / wh, scale_clip))
  w = w_a * jnp.exp(jnp.minimum(deltas[..., 3] / ww, scale_clip))
  return jnp.stack([cy - 0.5 * h, cx - 0.5 * w, cy + 0.5 * h, cx + 0.5 * w], axis=-1)
