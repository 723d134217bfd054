"""Training targets for the detector with static shapes: IoU matching and fixed-size sampling.

`match` labels every anchor (or proposal) against the ground-truth boxes of
its image with detectron2's `Matcher` rules: IoU >= `high` -> foreground (1),
IoU < `low` -> background (0), in between -> ignored (-1); with
`allow_low_quality`, every ground-truth box also claims the anchors that
overlap it best (ties included) even below `high`, so no object goes
unmatched. Ground-truth boxes are padded to a fixed count G per image and
`gt_valid` marks the real ones; an image without any is all background.

Crowd regions (COCO's `iscrowd=1`: a clump labelled as one region) are neither
positives nor negatives: an anchor or proposal that a crowd region covers for at
least a fraction `crowd_coverage` of its area, and that no object claims as
foreground, is ignored (Detectron's crowd filter, there with IoA against crowd
boxes, 0.7; here against the crowd pixels).

`sample` picks at most `num_samples` labelled anchors per image, at most
`positive_fraction` of them foreground, uniformly at random among the
candidates (random keys and `lax.top_k`, so the count is static), and
returns masks: the loss is then a masked mean, with no dynamic shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
import optax

from seg_jax.models.detection import boxes as box_ops

FOREGROUND, BACKGROUND, IGNORE = 1, 0, -1


def match(anchors: jax.Array, gt_boxes: jax.Array, gt_valid: jax.Array, *, high: float,
          low: float, allow_low_quality: bool, ignore: jax.Array | None = None
          ) -> tuple[jax.Array, jax.Array]:
  """`(matched_gt [M] int32, labels [M] int32)` for one image.

  Args:
    anchors: `[M, 4]` anchors or proposals.
    gt_boxes: `[G, 4]` ground-truth boxes (padding rows arbitrary).
    gt_valid: bool `[G]`, True for real boxes.
    high, low: IoU thresholds (low <= high).
    allow_low_quality: also label foreground each anchor with the highest IoU
      for some ground-truth box (if that IoU is > 0).
    ignore: optional bool `[M]`: anchors that may be foreground but never background
      (those a crowd region covers, `crowd_ignore`).

  `matched_gt[m]` is the ground-truth box of highest IoU (lowest index on
  ties); meaningful where `labels == 1`.
  """
  iou = box_ops.pairwise_iou(gt_boxes, anchors)                       # [G, M]
  iou = jnp.where(gt_valid[:, None], iou, -1.0)
  best_iou = iou.max(axis=0)
  matched = jnp.argmax(iou, axis=0).astype(jnp.int32)
  labels = jnp.where(best_iou >= high, FOREGROUND,
                     jnp.where(best_iou < low, BACKGROUND, IGNORE)).astype(jnp.int32)
  if allow_low_quality:
    best_for_gt = iou.max(axis=1, keepdims=True)                      # [G, 1]
    claimed = ((iou == best_for_gt) & (best_for_gt > 0) & gt_valid[:, None]).any(axis=0)
    labels = jnp.where(claimed, FOREGROUND, labels)
  if ignore is not None:
    labels = jnp.where(ignore & (labels == BACKGROUND), IGNORE, labels)
  return matched, labels


def crowd_ignore(anchors: jax.Array, crowd: jax.Array | None, coverage: float
                 ) -> jax.Array | None:
  """bool `[M]`: anchors a crowd region `[H, W]` covers for at least `coverage` of their area
  (None without a crowd region)."""
  if crowd is None:
    return None
  return box_ops.region_coverage(anchors, crowd) >= coverage


def sample(labels: jax.Array, key: jax.Array, *, num_samples: int,
           positive_fraction: float) -> tuple[jax.Array, jax.Array]:
  """`(positive [M] bool, negative [M] bool)`: a random fixed-budget subset of the labels.

  At most `int(num_samples * positive_fraction)` foreground anchors, and
  negatives filling the rest of `num_samples` (fewer if there are not enough).
  """
  num_positive_max = int(num_samples * positive_fraction)
  pos_key, neg_key = jax.random.split(key)
  is_pos = labels == FOREGROUND
  is_neg = labels == BACKGROUND
  num_pos = jnp.minimum(is_pos.sum(), num_positive_max)
  num_neg = jnp.minimum(is_neg.sum(), num_samples - num_pos)

  def choose(candidates, count, key, budget):
    # Random priorities; candidates first. The `count` best are chosen.
    if budget == 0:
      return jnp.zeros(candidates.shape, bool)
    priority = jnp.where(candidates, jax.random.uniform(key, candidates.shape), -1.0)
    k = min(budget, candidates.shape[0])
    _, index = lax.top_k(priority, k)
    chosen = jnp.zeros(candidates.shape, bool).at[index].set(jnp.arange(k) < count)
    return chosen & candidates

  positive = choose(is_pos, num_pos, pos_key, num_positive_max)
  negative = choose(is_neg, num_neg, neg_key, num_samples)
  return positive, negative


def rpn_targets(anchors: jax.Array, gt_boxes: jax.Array, gt_valid: jax.Array, key: jax.Array, *,
                num_samples: int = 256, positive_fraction: float = 0.5, high: float = 0.7,
                low: float = 0.3, weights=(1.0, 1.0, 1.0, 1.0), crowd: jax.Array | None = None,
                crowd_coverage: float = 0.7) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per image of a batch: sampled positive and negative anchors and the positives' deltas.

  Args:
    anchors: `[M, 4]`, shared by the batch.
    gt_boxes: `[N, G, 4]`; gt_valid: bool `[N, G]`.
    key: one PRNG key for the batch.
    crowd: optional bool `[N, H, W]` crowd regions: the anchors they cover are ignored.

  Returns:
    `(positive [N, M] bool, negative [N, M] bool, target_deltas [N, M, 4])`.
  """
  def one(boxes, valid, key, crowd):
    matched, labels = match(anchors, boxes, valid, high=high, low=low, allow_low_quality=True,
                            ignore=crowd_ignore(anchors, crowd, crowd_coverage))
    positive, negative = sample(labels, key, num_samples=num_samples,
                                positive_fraction=positive_fraction)
    deltas = box_ops.encode_boxes(boxes[matched], anchors, weights)
    return positive, negative, jnp.where(positive[:, None], deltas, 0.0)

  keys = jax.random.split(key, gt_boxes.shape[0])
  return jax.vmap(one)(gt_boxes, gt_valid, keys, crowd)


def smooth_l1(x: jax.Array, beta: float) -> jax.Array:
  """Elementwise smooth L1 (Huber / beta); beta = 0 is the L1 loss."""
  x = jnp.abs(x)
  if beta == 0:
    return x
  return jnp.where(x < beta, 0.5 * x * x / beta, x - 0.5 * beta)


def rpn_loss(logits: jax.Array, deltas: jax.Array, positive: jax.Array, negative: jax.Array,
             target_deltas: jax.Array, *, num_samples: int, smooth_l1_beta: float = 0.0
             ) -> dict[str, jax.Array]:
  """detectron2's RPN losses: objectness BCE over the sampled anchors and box regression over
  the positives, both summed and divided by `num_samples * N` (the sampling budget)."""
  normalizer = num_samples * logits.shape[0]
  sampled = positive | negative
  bce = optax.sigmoid_binary_cross_entropy(logits, positive.astype(logits.dtype))
  objectness = jnp.sum(jnp.where(sampled, bce, 0.0)) / normalizer
  box = smooth_l1(deltas - target_deltas, smooth_l1_beta).sum(axis=-1)
  regression = jnp.sum(jnp.where(positive, box, 0.0)) / normalizer
  return {"rpn_objectness": objectness, "rpn_box": regression}
