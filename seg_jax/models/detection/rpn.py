"""Region proposal network: the head (linen) and proposal generation (pure, static shapes).

`RPNHead` runs one shared 3x3 conv and two 1x1 convs on every pyramid level
and returns, levels concatenated P2 first, objectness logits `[N, M]` and box
deltas `[N, M, 4]` for the M anchors of `anchors.multilevel_anchors` in the
same order (cell-major, then anchor shape).

`generate_proposals` turns them into a fixed number of proposals per image:
per level the `pre_nms_topk` best-scored anchors (`lax.top_k`), their deltas
decoded and the boxes clipped to the image, boxes smaller than `min_size`
dropped, NMS within each level (levels never suppress each other, as in
detectron2), and the `post_nms_topk` best survivors over all levels. The
result is padded to exactly `post_nms_topk` boxes with a validity mask, so
every batch compiles to one program. Proposals carry no gradient (they are
targets for the second stage, as in detectron2 and torchvision).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from seg_jax.models import layers
from seg_jax.models.detection import boxes as box_ops
from seg_jax.models.detection import nms as nms_ops


class RPNHead(nn.Module):
  """Objectness logits `[N, M]` and deltas `[N, M, 4]` over all levels' anchors."""
  num_anchors: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, levels: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
    small = nn.initializers.normal(0.01)   # start near "no object, no shift"
    conv = layers.Conv(levels[0].shape[-1], (3, 3), dtype=self.dtype, kernel_init=small, name="conv")
    objectness = layers.Conv(self.num_anchors, (1, 1), dtype=self.dtype, kernel_init=small,
                         name="objectness")
    deltas = layers.Conv(4 * self.num_anchors, (1, 1), dtype=self.dtype, kernel_init=small,
                     name="deltas")
    all_logits, all_deltas = [], []
    for x in levels:
      h = nn.relu(conv(x))
      n = x.shape[0]
      all_logits.append(objectness(h).reshape(n, -1).astype(jnp.float32))
      all_deltas.append(deltas(h).reshape(n, -1, 4).astype(jnp.float32))
    return jnp.concatenate(all_logits, axis=1), jnp.concatenate(all_deltas, axis=1)


def generate_proposals(logits: jax.Array, deltas: jax.Array, level_anchors: Sequence[np.ndarray],
                       image_size: tuple[int, int], *, pre_nms_topk: int, post_nms_topk: int,
                       iou_threshold: float = 0.7, min_size: float = 0.0,
                       weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Fixed-size proposals from RPN outputs.

  Args:
    logits: `[N, M]` objectness logits, levels concatenated.
    deltas: `[N, M, 4]` box deltas.
    level_anchors: one `[M_l, 4]` array per level (sum of M_l = M), as from
      `anchors.multilevel_anchors`.
    image_size: (height, width) the boxes are clipped to.
    pre_nms_topk: candidates kept per level before NMS (fewer if a level has fewer).
    post_nms_topk: proposals returned per image (static).
    iou_threshold: NMS threshold within a level.
    min_size: boxes with a side below this (after clipping) are dropped.
    weights: box-coding weights of the deltas.

  Returns:
    `(boxes [N, P, 4], logits [N, P], valid [N, P])` with P = post_nms_topk, by
    descending logit; padding slots have valid=False.
  """
  logits = lax.stop_gradient(logits)
  deltas = lax.stop_gradient(deltas)
  height, width = image_size
  cand_boxes, cand_scores, cand_valid, cand_level = [], [], [], []
  start = 0
  for level, anchors in enumerate(level_anchors):
    count = anchors.shape[0]
    k = min(pre_nms_topk, count)
    scores, index = lax.top_k(logits[:, start:start + count], k)            # [N, k]
    level_deltas = jnp.take_along_axis(deltas[:, start:start + count], index[..., None], axis=1)
    boxes = box_ops.decode_boxes(level_deltas, jnp.asarray(anchors)[index], weights)
    boxes = box_ops.clip_boxes(boxes, height, width)
    cand_boxes.append(boxes)
    cand_scores.append(scores)
    cand_valid.append(box_ops.nonempty_boxes(boxes, min_size) & jnp.isfinite(scores))
    cand_level.append(jnp.full(scores.shape, level, jnp.int32))
    start += count
  if start != logits.shape[1]:
    raise ValueError(f"the anchors ({start}) do not match the head's outputs ({logits.shape[1]})")
  boxes = jnp.concatenate(cand_boxes, axis=1)
  scores = jnp.concatenate(cand_scores, axis=1)
  valid = jnp.concatenate(cand_valid, axis=1)
  levels = jnp.concatenate(cand_level, axis=1)
  keep, keep_valid = nms_ops.per_class_nms(boxes, scores, levels, iou_threshold=iou_threshold,
                                           max_output=post_nms_topk, valid=valid)
  out_boxes = jnp.take_along_axis(boxes, keep[..., None], axis=1)
  out_scores = jnp.where(keep_valid, jnp.take_along_axis(scores, keep, axis=1), -jnp.inf)
  return jnp.where(keep_valid[..., None], out_boxes, 0.0), out_scores, keep_valid
