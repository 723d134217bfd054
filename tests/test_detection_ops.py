"""Detection ops (boxes, anchors, NMS, RoIAlign) against independent numpy implementations."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seg_jax.models.detection import anchors as anchor_lib
from seg_jax.models.detection import boxes as box_lib
from seg_jax.models.detection import nms as nms_lib
from seg_jax.models.detection import roi_align as roi_lib


# ----------------------------------------------------------------------------
# Independent numpy references (plain loops, float64).

def np_iou(a, b):
  """IoU of two single boxes (y0, x0, y1, x1); 0 when the union is empty."""
  ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ih * iw
  area = lambda t: max(0.0, t[2] - t[0]) * max(0.0, t[3] - t[1])
  union = area(a) + area(b) - inter
  return inter / union if union > 0 else 0.0


def np_greedy_nms(boxes, scores, threshold, present=None, classes=None):
  """Classic greedy NMS: returns kept indices by descending score, ties by index."""
  boxes = np.asarray(boxes, np.float64)
  scores = np.asarray(scores, np.float64)
  present = np.ones(len(scores), bool) if present is None else present
  order = sorted((i for i in range(len(scores)) if present[i] and scores[i] > -np.inf),
                 key=lambda i: (-scores[i], i))
  kept = []
  for i in order:
    if all(np_iou(boxes[i], boxes[j]) <= threshold for j in kept
           if classes is None or classes[i] == classes[j]):
      kept.append(i)
  return kept


def np_random_boxes(rng, k, size=64.0, max_side=24.0):
  y0x0 = rng.uniform(0, size, (k, 2))
  hw = rng.uniform(1, max_side, (k, 2))
  return np.concatenate([y0x0, y0x0 + hw], axis=1).astype(np.float32)


def np_bilinear(feature, y, x):
  """torchvision's bilinear sample of feature [H, W, C] at (y, x): [C]."""
  h, w, _ = feature.shape
  if y < -1.0 or y > h or x < -1.0 or x > w:
    return np.zeros(feature.shape[-1]), []
  y, x = max(y, 0.0), max(x, 0.0)
  y0, x0 = int(math.floor(y)), int(math.floor(x))
  if y0 >= h - 1:
    y0 = y1 = h - 1
    y = float(y0)
  else:
    y1 = y0 + 1
  if x0 >= w - 1:
    x0 = x1 = w - 1
    x = float(x0)
  else:
    x1 = x0 + 1
  ly, lx = y - y0, x - x0
  taps = [(y0, x0, (1 - ly) * (1 - lx)), (y0, x1, (1 - ly) * lx),
          (y1, x0, ly * (1 - lx)), (y1, x1, ly * lx)]
  return sum(wt * feature[r, c] for r, c, wt in taps), taps


def np_roi_align_one(feature, box, out_hw, scale, ratio, aligned, grad_out=None, grad_in=None):
  """Pools one box (y0, x0, y1, x1) from feature [H, W, C] -> [oh, ow, C].

  With `grad_out` [oh, ow, C] it also accumulates the adjoint into `grad_in`.
  """
  oh, ow = out_hw
  off = 0.5 if aligned else 0.0
  y_start, x_start = box[0] * scale - off, box[1] * scale - off
  roi_h, roi_w = box[2] * scale - off - y_start, box[3] * scale - off - x_start
  if not aligned:
    roi_h, roi_w = max(roi_h, 1.0), max(roi_w, 1.0)
  bin_h, bin_w = roi_h / oh, roi_w / ow
  gh = ratio if ratio > 0 else int(math.ceil(roi_h / oh))
  gw = ratio if ratio > 0 else int(math.ceil(roi_w / ow))
  count = max(gh * gw, 1)
  out = np.zeros((oh, ow, feature.shape[-1]))
  for p in range(oh):
    for q in range(ow):
      for iy in range(gh):
        y = y_start + p * bin_h + (iy + 0.5) * bin_h / gh
        for ix in range(gw):
          x = x_start + q * bin_w + (ix + 0.5) * bin_w / gw
          value, taps = np_bilinear(feature, y, x)
          out[p, q] += value / count
          if grad_out is not None:
            for r, c, wt in taps:
              grad_in[r, c] += grad_out[p, q] * wt / count
  return out


def np_roi_align(features, boxes, out_hw, scale, ratio, aligned):
  features = np.asarray(features, np.float64)
  return np.stack([np.stack([np_roi_align_one(features[n], b, out_hw, scale, ratio, aligned)
                             for b in np.asarray(boxes[n], np.float64)]) for n in range(len(boxes))])


def np_fpn_level(box, lo, hi, canonical_size=224.0):
  """FPN paper eq. 1 with detectron2's 1e-8, clamped to [lo, hi]."""
  side = math.sqrt(max(box[2] - box[0], 0) * max(box[3] - box[1], 0))
  return int(min(max(math.floor(4 + math.log2(side / canonical_size + 1e-8)), lo), hi))


# ----------------------------------------------------------------------------
# Boxes.

# Jitted once per module: eager jnp ops would compile one small program each.
encode = jax.jit(box_lib.encode_boxes, static_argnames="weights")
decode = jax.jit(box_lib.decode_boxes, static_argnames=("weights", "scale_clip"))

def test_pairwise_iou_matches_numpy_and_broadcasts():
  rng = np.random.default_rng(0)
  a = np_random_boxes(rng, 12, size=20)
  b = np_random_boxes(rng, 9, size=20)
  a[3] = [5, 5, 5, 9]  # zero height
  b[2] = [4, 4, 2, 2]  # inverted
  b[4] = a[0]          # identical
  want = np.array([[np_iou(x, y) for y in b] for x in a])
  got = np.asarray(jax.jit(box_lib.pairwise_iou)(a, b))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert got[0, 4] == pytest.approx(1.0)
  batched = jax.jit(box_lib.pairwise_iou)(np.stack([a, a]), np.stack([b, b[::-1]]))
  np.testing.assert_allclose(np.asarray(batched[1]), want[:, ::-1], rtol=1e-5, atol=1e-6)
  # Two degenerate boxes: IoU 0 and a finite (zero) gradient, not NaN.
  grad = jax.jit(jax.grad(lambda x: box_lib.pairwise_iou(x, x).sum()))(jnp.zeros((3, 4)))
  assert np.all(np.isfinite(np.asarray(grad)))


def test_box_area_and_clip():
  boxes = np.array([[1, 2, 4, 8], [5, 5, 3, 9], [-3, -2, 70, 40]], np.float32)
  np.testing.assert_allclose(np.asarray(box_lib.box_area(boxes)), [18, 0, 73 * 42])
  clipped = np.asarray(box_lib.clip_boxes(boxes, 64, 32))
  np.testing.assert_allclose(clipped, [[1, 2, 4, 8], [5, 5, 3, 9], [0, 0, 64, 32]])
  per_image = np.asarray(box_lib.clip_boxes(np.stack([boxes, boxes]), jnp.array([[10.0], [64.0]]), 32))
  np.testing.assert_allclose(per_image[0, 2], [0, 0, 10, 32])
  np.testing.assert_array_equal(np.asarray(box_lib.nonempty_boxes(boxes, 0.5)), [True, False, True])


def test_box_coding_hand_computed_and_round_trip():
  anchor = np.array([0, 0, 10, 20], np.float32)  # centre (5, 10), size 10 x 20
  targets = np.array([[2, 4, 12, 24], [0, 0, 20, 10]], np.float32)
  want = np.array([[0.2, 0.2, 0.0, 0.0], [0.5, -0.25, math.log(2), math.log(0.5)]])
  np.testing.assert_allclose(np.asarray(encode(targets, anchor)), want, atol=1e-6)
  weighted = encode(targets, anchor, weights=(10, 10, 5, 5))
  np.testing.assert_allclose(np.asarray(weighted), want * [10, 10, 5, 5], atol=1e-5)
  np.testing.assert_allclose(np.asarray(decode(weighted, anchor, weights=(10, 10, 5, 5))),
                             targets, atol=1e-5)

  rng = np.random.default_rng(1)
  boxes, anchors = np_random_boxes(rng, 50), np_random_boxes(rng, 50)
  for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
    deltas = encode(boxes, anchors, weights)
    np.testing.assert_allclose(np.asarray(decode(deltas, anchors, weights)), boxes,
                               rtol=1e-5, atol=1e-4)


def test_decode_clips_scale_before_exp_and_padding_stays_finite():
  anchor = np.array([0, 0, 16, 16], np.float32)
  huge = decode(np.array([0, 0, 50.0, 1e4], np.float32), anchor)
  # exp(log(1000/16)) * 16 = 1000 px, centred at (8, 8).
  np.testing.assert_allclose(np.asarray(huge), [8 - 500, 8 - 500, 8 + 500, 8 + 500], rtol=1e-5)
  tiny = decode(np.array([0, 0, -5.0, 0], np.float32), anchor)
  half = 8 * math.exp(-5)
  np.testing.assert_allclose(np.asarray(tiny)[[0, 2]], [8 - half, 8 + half], rtol=1e-5)
  padded = encode(np.zeros((2, 4), np.float32), np.array([anchor, np.zeros(4, np.float32)]))
  assert np.all(np.isfinite(np.asarray(padded)))
  # Per-class deltas broadcast against one proposal.
  per_class = decode(np.zeros((5, 3, 4), np.float32), np.tile(anchor, (5, 1, 1)))
  assert per_class.shape == (5, 3, 4)


# ----------------------------------------------------------------------------
# Anchors.

def test_anchor_counts_positions_and_shapes():
  strides = (4, 8, 16, 32, 64)
  sizes = ((32,), (64,), (128,), (256,), (512,))
  ratios = (0.5, 1.0, 2.0)
  level_sizes = anchor_lib.feature_sizes((64, 96), strides)
  assert level_sizes == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
  levels = anchor_lib.multilevel_anchors(level_sizes, strides=strides, sizes=sizes, aspect_ratios=ratios)
  assert [len(a) for a in levels] == [16 * 24 * 3, 8 * 12 * 3, 4 * 6 * 3, 2 * 3 * 3, 1 * 2 * 3]
  assert anchor_lib.num_anchors_per_cell(sizes[0], ratios) == 3
  for (h, w), stride, (size,), anchors in zip(level_sizes, strides, sizes, levels):
    assert anchors.dtype == np.float32
    for idx in sorted({0, 1, 2, min(3 * w + 2, len(anchors) - 1), len(anchors) - 1}):
      cell, a = divmod(idx, 3)
      i, j = divmod(cell, w)
      y0, x0, y1, x1 = anchors[idx].astype(np.float64)
      assert ((y0 + y1) / 2, (x0 + x1) / 2) == pytest.approx(((i + 0.5) * stride, (j + 0.5) * stride))
      assert (y1 - y0) * (x1 - x0) == pytest.approx(size ** 2, rel=1e-5)
      assert (y1 - y0) / (x1 - x0) == pytest.approx(ratios[a], rel=1e-5)

  two_sizes = anchor_lib.level_anchors(2, 2, stride=10, sizes=(8, 16), aspect_ratios=(1.0, 4.0), offset=0.0)
  assert two_sizes.shape == (2 * 2 * 4, 4)
  # Cell (0, 1) -> centre (0, 10); shapes: size 8 r 1, size 8 r 4, size 16 r 1, size 16 r 4.
  np.testing.assert_allclose(two_sizes[4:8],
                             [[-4, 6, 4, 14], [-8, 8, 8, 12], [-8, 2, 8, 18], [-16, 6, 16, 14]])


# ----------------------------------------------------------------------------
# NMS.

K = 48


def jitted_nms(max_output, per_class=False):
  # The public functions are jitted with max_output static.
  fn = nms_lib.per_class_nms if per_class else nms_lib.nms
  return functools.partial(fn, max_output=max_output)


def _kept(indices, valid):
  return [int(i) for i in np.asarray(indices)[np.asarray(valid)]]


def test_nms_matches_numpy_greedy_nms_on_random_boxes():
  rng = np.random.default_rng(2)
  seeds = 24
  boxes = np.stack([np_random_boxes(rng, K, size=48) for _ in range(seeds)])
  # Coarse scores make many exact ties; a few candidates are absent.
  scores = rng.integers(0, 12, (seeds, K)).astype(np.float32) / 12
  present = rng.uniform(size=(seeds, K)) > 0.1
  scores[:, 5] = -np.inf
  scores[3, 7] = np.nan
  for threshold in [0.0, 0.3, 0.5, 0.7, 1.0]:
    indices, valid = jitted_nms(K)(boxes, scores, iou_threshold=threshold, valid=present)  # vmapped
    assert indices.shape == (seeds, K) and indices.dtype == jnp.int32
    for s in range(seeds):
      want = np_greedy_nms(boxes[s], scores[s], threshold, present[s])
      assert _kept(indices[s], valid[s]) == want, (threshold, s)
      assert not np.any(np.asarray(valid[s])[len(want):])
      assert np.all(np.asarray(indices[s])[len(want):] == 0)


def test_nms_truncates_to_max_output_and_handles_edge_cases():
  rng = np.random.default_rng(3)
  boxes = np_random_boxes(rng, K, size=64, max_side=8)  # sparse: most boxes survive
  scores = rng.uniform(size=K).astype(np.float32)
  want = np_greedy_nms(boxes, scores, 0.5)
  assert len(want) > 10
  indices, valid = jitted_nms(10)(boxes, scores, iou_threshold=0.5)
  assert _kept(indices, valid) == want[:10] and bool(np.all(valid))

  # Equal scores: lower index first; identical boxes: everything after the first is suppressed.
  same = np.tile(np.array([[0, 0, 10, 10]], np.float32), (K, 1))
  indices, valid = jitted_nms(10)(same, np.ones(K, np.float32), iou_threshold=0.5)
  assert _kept(indices, valid) == [0]
  ties = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 11], [40, 40, 50, 50]], np.float32)
  indices, valid = jitted_nms(10)(ties, np.full(4, 0.5, np.float32), iou_threshold=0.5)
  assert _kept(indices, valid) == [0, 1, 3]

  # No candidate present: nothing is valid.
  indices, valid = jitted_nms(10)(boxes, np.full(K, -np.inf, np.float32), iou_threshold=0.5)
  assert not np.any(np.asarray(valid)) and np.all(np.asarray(indices) == 0)
  indices, valid = nms_lib.nms(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32),
                               iou_threshold=0.5, max_output=3)
  assert indices.shape == (3,) and not np.any(np.asarray(valid))


def test_per_class_nms_matches_numpy_loop_over_classes():
  rng = np.random.default_rng(4)
  for seed in range(6):
    boxes = np_random_boxes(rng, K, size=32)
    scores = rng.uniform(size=K).astype(np.float32)
    classes = rng.integers(0, 3, K).astype(np.int32)
    per_class = [i for c in range(3) for i in np_greedy_nms(boxes, scores, 0.5, classes == c)]
    want = sorted(per_class, key=lambda i: (-scores[i], i))
    indices, valid = jitted_nms(K, per_class=True)(boxes, scores, classes, iou_threshold=0.5)
    assert _kept(indices, valid) == want, seed
    # Same thing through the numpy class-aware loop.
    assert want == np_greedy_nms(boxes, scores, 0.5, classes=classes)


def test_nms_inside_grad():
  boxes = jnp.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], jnp.float32)

  def kept_score_sum(scores):
    indices, valid = nms_lib.nms(boxes, scores, iou_threshold=0.5, max_output=3)
    return jnp.sum(jnp.where(valid, scores[indices], 0.0))

  grad = jax.jit(jax.grad(kept_score_sum))(jnp.array([0.9, 0.8, 0.7]))
  np.testing.assert_allclose(np.asarray(grad), [1, 0, 1])


# ----------------------------------------------------------------------------
# RoIAlign.

H, W, C = 11, 13, 3


def _roi_boxes():
  """Boxes in input pixels for a stride-2 map of 11 x 13 (image 22 x 26)."""
  rng = np.random.default_rng(5)
  random = np_random_boxes(rng, 6, size=24, max_side=18)
  special = np.array([
      [0, 0, 22, 26],          # whole image, touching every border
      [-7.3, -3.1, 9.6, 12.2],  # crossing the top-left border
      [15.2, 19.7, 29.4, 37.9],  # crossing the bottom-right border
      [5.3, 6.1, 6.1, 6.4],    # far smaller than one bin
      [8.0, 8.0, 8.0, 8.0],    # empty
      [-30.2, -30.7, -25.1, -24.3],  # entirely outside
  ], np.float32)
  return np.concatenate([random, special])[None]  # [1, R, 4]


@pytest.fixture(scope="module")
def features():
  return np.random.default_rng(6).normal(size=(1, H, W, C)).astype(np.float32)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("out_hw,ratio", [((3, 3), 1), ((2, 4), 2), ((3, 3), 3), ((2, 3), 0)])
def test_roi_align_matches_numpy(features, aligned, out_hw, ratio):
  boxes = _roi_boxes()
  want = np_roi_align(features, boxes, out_hw, 0.5, ratio, aligned)
  for method in ("dense", "gather"):
    got = roi_lib.roi_align(features, boxes, output_size=out_hw, spatial_scale=0.5, sampling_ratio=ratio,
                            aligned=aligned, max_sampling_ratio=8, method=method)
    assert got.shape == (1, boxes.shape[1]) + out_hw + (C,)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5, err_msg=method)


def test_roi_align_adaptive_cap_uses_evenly_spaced_samples(features):
  boxes = np.array([[[0, 0, 22, 26]]], np.float32)  # 11 x 13 feature px, 2 bins: ceil -> 6 and 7 samples
  capped = roi_lib.roi_align(features, boxes, output_size=2, spatial_scale=0.5, sampling_ratio=0,
                             max_sampling_ratio=3)
  want = np_roi_align(features, boxes, (2, 2), 0.5, 3, True)
  np.testing.assert_allclose(np.asarray(capped), want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="max_sampling_ratio"):
    roi_lib.roi_align(features, boxes, output_size=2, spatial_scale=0.5, sampling_ratio=0)
  with pytest.raises(ValueError, match="method"):
    roi_lib.roi_align(features, boxes, output_size=2, spatial_scale=0.5, sampling_ratio=2, method="fast")


@pytest.mark.parametrize("method", ["dense", "gather"])
def test_roi_align_gradient_matches_numpy_adjoint(features, method):
  boxes = _roi_boxes()
  cotangent = np.random.default_rng(7).normal(size=(1, boxes.shape[1], 2, 3, C))
  pool = functools.partial(roi_lib.roi_align, output_size=(2, 3), spatial_scale=0.5, sampling_ratio=2,
                           method=method)
  grad = jax.jit(jax.grad(lambda f: jnp.sum(pool(f, boxes) * cotangent)))(features)
  want = np.zeros((H, W, C))
  for r, box in enumerate(boxes[0].astype(np.float64)):
    np_roi_align_one(features[0].astype(np.float64), box, (2, 3), 0.5, 2, True,
                     grad_out=cotangent[0, r], grad_in=want)
  np.testing.assert_allclose(np.asarray(grad)[0], want, rtol=1e-5, atol=1e-5)


def test_roi_align_box_gradient_on_a_linear_ramp():
  # On f(y, x) = a y + b x bilinear sampling is exact, so bin (p, q) of an inside
  # box averages to a * (y_start + (p + 1/2) bin_h) + b * (x_start + ...), whose
  # derivative wrt y0 is a * scale * (1 - (p + 1/2) / oh) and wrt y1 a * scale * (p + 1/2) / oh.
  a, b, scale, oh = 0.7, -0.3, 0.5, 4
  ys, xs = np.meshgrid(np.arange(16.0), np.arange(16.0), indexing="ij")
  ramp = (a * ys + b * xs)[None, :, :, None].astype(np.float32)
  box = jnp.array([[[4.3, 6.1, 20.7, 17.9]]])
  p = np.arange(oh) + 0.5
  for method in ("dense", "gather"):
    pool = functools.partial(roi_lib.roi_align, output_size=oh, spatial_scale=scale, sampling_ratio=2,
                             method=method)
    jac = jax.jit(jax.jacrev(lambda bx: pool(ramp, bx)[0, 0, :, 0, 0]))(box)
    jac = np.asarray(jac)[:, 0, 0]
    np.testing.assert_allclose(jac[:, 0], a * scale * (1 - p / oh), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jac[:, 2], a * scale * p / oh, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jac[:, 1] + jac[:, 3], b * scale * np.ones(oh), rtol=1e-5, atol=1e-6)


def test_roi_align_under_vmap_and_jit(features):
  boxes = _roi_boxes()
  pool = functools.partial(roi_lib.roi_align, output_size=2, spatial_scale=0.5, sampling_ratio=2,
                           method="gather")
  stacked_f = np.stack([features, features[:, ::-1]])
  stacked_b = np.stack([boxes, boxes[:, ::-1]])
  got = jax.jit(jax.vmap(pool))(stacked_f, stacked_b)
  want = np_roi_align(features[:, ::-1], boxes[:, ::-1], (2, 2), 0.5, 2, True)
  np.testing.assert_allclose(np.asarray(got[1]), want, rtol=1e-5, atol=1e-5)


def test_assign_fpn_levels_matches_formula():
  rng = np.random.default_rng(8)
  boxes = np_random_boxes(rng, 40, size=100, max_side=900)
  exact = np.array([[0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 111.9, 112], [10, 10, 458, 458],
                    [0, 0, 56, 56], [3, 3, 3, 3], [0, 0, 5000, 5000]], np.float32)
  boxes = np.concatenate([boxes, exact])
  got = np.asarray(jax.jit(functools.partial(roi_lib.assign_fpn_levels, min_level=2, max_level=5))(boxes))
  assert got.tolist() == [np_fpn_level(b.astype(np.float64), 2, 5) for b in boxes]
  assert got[-7:].tolist() == [4, 3, 2, 5, 2, 2, 5]


def test_multilevel_roi_align_pools_each_box_from_its_level():
  rng = np.random.default_rng(9)
  image = 64
  levels = [rng.normal(size=(2, image >> l, image >> l, 2)).astype(np.float32) for l in (2, 3, 4, 5)]
  # Sides from 4 to 120 px, so that boxes land on every level P2-P5.
  side = np.geomspace(4, 120, 10)
  corner = rng.uniform(-10, 40, (2, 10, 2))
  boxes = np.concatenate([corner, corner + side[None, :, None]], axis=-1).astype(np.float32)
  boxes[1, 3] = 0  # a padding box
  for ratio in (2, 0):
    want = np.zeros((2, 10, 3, 3, 2))
    for n in range(2):
      for r in range(10):
        box = boxes[n, r].astype(np.float64)
        level = np_fpn_level(box, 2, 5, canonical_size=56.0)
        want[n, r] = np_roi_align_one(levels[level - 2][n].astype(np.float64), box, (3, 3), 2.0 ** -level,
                                      ratio, True)
    for method in ("dense", "gather"):
      got = roi_lib.multilevel_roi_align(levels, boxes, min_level=2, output_size=3, sampling_ratio=ratio,
                                         canonical_size=56.0, max_sampling_ratio=4, method=method)
      assert got.shape == (2, 10, 3, 3, 2)
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5, err_msg=f"{method} {ratio}")
  used = np.asarray(roi_lib.assign_fpn_levels(boxes, min_level=2, max_level=5, canonical_size=56.0))
  assert set(used.ravel().tolist()) == {2, 3, 4, 5}
