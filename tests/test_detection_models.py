"""FPN, RPN head, proposal generation and training targets, against independent numpy computations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seg_jax.models import init_key
from seg_jax.models.detection import anchors as anchor_lib
from seg_jax.models.detection import boxes as box_lib
from seg_jax.models.detection import fpn as fpn_lib
from seg_jax.models.detection import roi_heads as roi_lib
from seg_jax.models.detection import rpn as rpn_lib
from seg_jax.models.detection import targets as target_lib
from tests.test_detection_ops import np_greedy_nms, np_iou, np_random_boxes


def _random_pyramid_inputs(key, n=2, h=16, w=24, channels=(8, 16, 32, 64)):
  keys = jax.random.split(key, 4)
  return {f"c{k}": jax.random.normal(kk, (n, -(-h // 2 ** (k - 2)), -(-w // 2 ** (k - 2)), c))
          for k, kk, c in zip((2, 3, 4, 5), keys, channels)}


def test_resnet_fpn_levels_have_strides_4_to_64():
  model = fpn_lib.ResNetFPN("resnet18", width=8, stem="small", features=16)
  shape = (2, 64, 96, 3)
  variables = jax.eval_shape(lambda: model.init(init_key(0), jnp.zeros(shape), train=False))
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape), train=False), variables)
  assert sorted(out) == ["p2", "p3", "p4", "p5", "p6"]
  for k in fpn_lib.LEVELS:
    assert out[f"p{k}"].shape == (2, 64 // 2 ** k or 1, -(-96 // 2 ** k), 16), k


def test_fpn_top_down_pathway():
  """Each level sees its own and every coarser map, never a finer one; P6 subsamples P5."""
  fpn = fpn_lib.FPN(features=8)
  inputs = _random_pyramid_inputs(jax.random.key(0))
  variables = fpn.init(jax.random.key(1), inputs)
  out = fpn.apply(variables, inputs)
  np.testing.assert_array_equal(out["p6"], out["p5"][:, ::2, ::2])
  changed_c5 = dict(inputs, c5=inputs["c5"] + 1.0)
  changed_c2 = dict(inputs, c2=inputs["c2"] + 1.0)
  out_c5 = fpn.apply(variables, changed_c5)
  out_c2 = fpn.apply(variables, changed_c2)
  for k in (2, 3, 4, 5):
    assert float(jnp.abs(out_c5[f"p{k}"] - out[f"p{k}"]).max()) > 1e-4, k
  np.testing.assert_array_equal(out_c2["p3"], out["p3"])
  np.testing.assert_array_equal(out_c2["p5"], out["p5"])
  assert float(jnp.abs(out_c2["p2"] - out["p2"]).max()) > 1e-4


def test_fpn_top_down_sum_matches_numpy():
  """P4 before its output conv = lateral(c4) + nearest-2x(lateral(c5)), checked with numpy."""
  fpn = fpn_lib.FPN(features=4)
  inputs = _random_pyramid_inputs(jax.random.key(2), h=16, w=16)
  variables = fpn.init(jax.random.key(3), inputs)
  _, state = fpn.apply(variables, inputs, capture_intermediates=True)
  p = variables["params"]
  lateral = lambda name, x: np.asarray(x) @ np.asarray(p[name]["kernel"][0, 0]) + np.asarray(p[name]["bias"])
  l4, l5 = lateral("lateral4", inputs["c4"]), lateral("lateral5", inputs["c5"])
  merged4 = l4 + l5.repeat(2, axis=1).repeat(2, axis=2)
  # The output conv's input is the merged map: recover it from the captured conv call.
  conv_out = state["intermediates"]["output4"]["__call__"][0]
  expected = jax.lax.conv_general_dilated(
      jnp.asarray(merged4), p["output4"]["kernel"], (1, 1), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["output4"]["bias"]
  np.testing.assert_allclose(conv_out, expected, rtol=1e-4, atol=1e-4)


def test_rpn_head_outputs_follow_the_anchor_order():
  sizes = [(8, 12), (4, 6), (2, 3)]
  levels = [jax.random.normal(jax.random.key(i), (2, h, w, 8)) for i, (h, w) in enumerate(sizes)]
  num_anchors = anchor_lib.num_anchors_per_cell((16,), (0.5, 1.0, 2.0))
  head = rpn_lib.RPNHead(num_anchors)
  variables = head.init(jax.random.key(5), levels)
  logits, deltas = head.apply(variables, levels)
  anchors = anchor_lib.multilevel_anchors(sizes, strides=(4, 8, 16), sizes=((16,), (32,), (64,)),
                                          aspect_ratios=(0.5, 1.0, 2.0))
  total = sum(a.shape[0] for a in anchors)
  assert logits.shape == (2, total) and deltas.shape == (2, total, 4)
  # Anchor (i * W + j) * A + a of level 1 is the head's channel a at cell (i, j) of that level.
  p = variables["params"]
  h = np.maximum(np.asarray(jax.lax.conv_general_dilated(
      levels[1], p["conv"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      + p["conv"]["bias"]), 0)
  obj = h @ np.asarray(p["objectness"]["kernel"][0, 0]) + np.asarray(p["objectness"]["bias"])
  box = h @ np.asarray(p["deltas"]["kernel"][0, 0]) + np.asarray(p["deltas"]["bias"])
  start = anchors[0].shape[0]
  i, j, a = 3, 5, 2
  index = start + (i * 6 + j) * num_anchors + a
  np.testing.assert_allclose(logits[:, index], obj[:, i, j, a], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(deltas[:, index], box[:, i, j, 4 * a:4 * a + 4], rtol=1e-4, atol=1e-5)


def _np_decode(deltas, anchors, clip=np.log(1000.0 / 16)):
  h = anchors[:, 2] - anchors[:, 0]
  w = anchors[:, 3] - anchors[:, 1]
  cy = anchors[:, 0] + 0.5 * h + deltas[:, 0] * h
  cx = anchors[:, 1] + 0.5 * w + deltas[:, 1] * w
  nh = h * np.exp(np.minimum(deltas[:, 2], clip))
  nw = w * np.exp(np.minimum(deltas[:, 3], clip))
  return np.stack([cy - nh / 2, cx - nw / 2, cy + nh / 2, cx + nw / 2], axis=1)


def _np_proposals(logits, deltas, level_anchors, image_size, pre, post, thr, min_size):
  """One image: the same rules written as a plain loop."""
  boxes, scores, levels = [], [], []
  start = 0
  for level, anchors in enumerate(level_anchors):
    count = len(anchors)
    order = sorted(range(count), key=lambda i: (-logits[start + i], i))[:min(pre, count)]
    decoded = _np_decode(deltas[start + np.array(order)], anchors[order])
    decoded[:, [0, 2]] = decoded[:, [0, 2]].clip(0, image_size[0])
    decoded[:, [1, 3]] = decoded[:, [1, 3]].clip(0, image_size[1])
    for box, i in zip(decoded, order):
      if box[2] - box[0] > min_size and box[3] - box[1] > min_size:
        boxes.append(box)
        scores.append(logits[start + i])
        levels.append(level)
    start += count
  kept = np_greedy_nms(np.array(boxes), np.array(scores), thr, classes=levels)
  return np.array(boxes)[kept][:post], np.array(scores)[kept][:post]


@pytest.mark.parametrize("post", [20, 400])
def test_generate_proposals_matches_numpy(post):
  rng = np.random.default_rng(0)
  image_size = (64, 80)
  sizes = anchor_lib.feature_sizes(image_size, (8, 16))
  level_anchors = anchor_lib.multilevel_anchors(sizes, strides=(8, 16), sizes=((16,), (32,)),
                                                aspect_ratios=(0.5, 1.0, 2.0))
  total = sum(len(a) for a in level_anchors)
  logits = rng.normal(size=(2, total)).astype(np.float32)
  deltas = (rng.normal(size=(2, total, 4)) * 0.3).astype(np.float32)
  deltas[0, :5, 2] = 20.0            # exp clipping
  deltas[1, :40, 2:] = -8.0          # tiny boxes, dropped by min_size
  fn = jax.jit(lambda l, d: rpn_lib.generate_proposals(
      l, d, level_anchors, image_size, pre_nms_topk=100, post_nms_topk=post, iou_threshold=0.5,
      min_size=1.0))
  boxes, scores, valid = fn(logits, deltas)
  assert boxes.shape == (2, post, 4) and valid.shape == (2, post)
  for n in range(2):
    want_boxes, want_scores = _np_proposals(logits[n], deltas[n], level_anchors, image_size,
                                            100, post, 0.5, 1.0)
    count = int(valid[n].sum())
    assert count == len(want_boxes)
    assert not bool(valid[n, count:].any())
    np.testing.assert_allclose(boxes[n, :count], want_boxes, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(scores[n, :count], want_scores, rtol=1e-6)
  assert int(valid.sum(axis=1).min()) < post or post == 20


def test_proposals_carry_no_gradient():
  level_anchors = anchor_lib.multilevel_anchors([(4, 4)], strides=(8,), sizes=((16,),),
                                                aspect_ratios=(1.0,))
  logits = jnp.linspace(-1, 1, 16)[None]
  deltas = jnp.zeros((1, 16, 4))

  def total(l, d):
    boxes, _, valid = rpn_lib.generate_proposals(l, d, level_anchors, (32, 32), pre_nms_topk=16,
                                                 post_nms_topk=8)
    return jnp.sum(jnp.where(valid[..., None], boxes, 0.0))

  g_logits, g_deltas = jax.grad(total, argnums=(0, 1))(logits, deltas)
  assert not bool(g_logits.any()) and not bool(g_deltas.any())


# ---------------------------------------------------------------------------- targets


@pytest.mark.parametrize("allow_low_quality", [False, True])
def test_match_equals_numpy_rules(allow_low_quality):
  rng = np.random.default_rng(1)
  anchors = np_random_boxes(rng, 60)
  anchors[7] = anchors[3]                     # a tie for the low-quality rule
  gt = np_random_boxes(rng, 6)
  gt_valid = np.array([True, True, False, True, True, False])
  gt[2] = anchors[10]                         # a padding row that would match perfectly
  matched, labels = jax.jit(functools.partial(
      target_lib.match, high=0.5, low=0.3, allow_low_quality=allow_low_quality))(
          anchors, gt, gt_valid)
  iou = np.array([[np_iou(g, a) if v else -1.0 for a in anchors] for g, v in zip(gt, gt_valid)])
  best = iou.max(axis=0)
  want = np.where(best >= 0.5, 1, np.where(best < 0.3, 0, -1))
  if allow_low_quality:
    for g in range(len(gt)):
      if gt_valid[g] and iou[g].max() > 0:
        want[np.isclose(iou[g], iou[g].max(), rtol=0, atol=1e-6)] = 1
  np.testing.assert_array_equal(labels, want)
  fg = want == 1
  np.testing.assert_array_equal(np.asarray(matched)[fg], iou.argmax(axis=0)[fg])
  assert not (np.asarray(matched)[fg] == 2).any()   # padding never matched
  if allow_low_quality:
    assert labels[3] == labels[7]


@pytest.mark.parametrize("num_pos,num_neg,expect_pos,expect_neg", [
    (10, 300, 10, 54), (50, 300, 16, 48), (3, 5, 3, 5), (0, 300, 0, 64)])
def test_sample_fixed_budget(num_pos, num_neg, expect_pos, expect_neg):
  labels = np.full(400, -1, np.int32)
  labels[:num_pos] = 1
  labels[100:100 + num_neg] = 0
  fn = jax.jit(functools.partial(target_lib.sample, num_samples=64, positive_fraction=0.25))
  positive, negative = fn(jnp.asarray(labels), jax.random.key(0))
  assert int(positive.sum()) == expect_pos and int(negative.sum()) == expect_neg
  assert (labels[np.asarray(positive)] == 1).all() and (labels[np.asarray(negative)] == 0).all()
  other, _ = fn(jnp.asarray(labels), jax.random.key(1))
  if num_pos > 16:   # a random subset: another key picks others
    assert (np.asarray(other) != np.asarray(positive)).any()


def test_rpn_loss_matches_numpy():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 50)).astype(np.float32) * 3
  deltas = rng.normal(size=(2, 50, 4)).astype(np.float32)
  targets = rng.normal(size=(2, 50, 4)).astype(np.float32)
  positive = rng.random((2, 50)) < 0.2
  negative = ~positive & (rng.random((2, 50)) < 0.5)
  for beta in (0.0, 0.5):
    got = target_lib.rpn_loss(logits, deltas, positive, negative, targets, num_samples=32,
                              smooth_l1_beta=beta)
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    bce = -(positive * np.log(p) + (1 - positive) * np.log(1 - p))
    diff = np.abs(deltas - targets)
    box = diff if beta == 0 else np.where(diff < beta, 0.5 * diff ** 2 / beta, diff - beta / 2)
    np.testing.assert_allclose(got["rpn_objectness"], bce[positive | negative].sum() / 64, rtol=1e-5)
    np.testing.assert_allclose(got["rpn_box"], box.sum(-1)[positive].sum() / 64, rtol=1e-5)


def test_rpn_targets_decode_back_to_the_matched_boxes():
  level_anchors = anchor_lib.multilevel_anchors(
      anchor_lib.feature_sizes((64, 64), (8,)), strides=(8,), sizes=((16,),),
      aspect_ratios=(0.5, 1.0, 2.0))
  anchors = level_anchors[0]
  gt = np.zeros((2, 3, 4), np.float32)
  gt[0, 0] = [10, 12, 26, 30]
  gt[0, 1] = [40, 40, 56, 50]
  gt_valid = np.array([[True, True, False], [False, False, False]])
  positive, negative, deltas = jax.jit(functools.partial(target_lib.rpn_targets, num_samples=32))(
      anchors, gt, gt_valid, jax.random.key(0))
  assert int(positive[0].sum()) >= 2 and not bool(positive[1].any())
  assert int(negative[1].sum()) == 32 and int(positive[0].sum() + negative[0].sum()) == 32
  for m in np.flatnonzero(positive[0]):
    box = _np_decode(np.asarray(deltas[0, m])[None], anchors[m][None])[0]
    ious = [np_iou(box, g) for g in gt[0, :2]]
    assert max(ious) > 0.999, (m, box)


def _np_coverage(boxes, region):
  """Brute force: crowd pixels whose centre lies in the box (rounded bounds) over the box area."""
  ys, xs = np.nonzero(region)
  out = []
  for y0, x0, y1, x1 in boxes:
    area = max(y1 - y0, 0) * max(x1 - x0, 0)
    inside = ((ys >= np.round(y0)) & (ys < np.round(y1)) & (xs >= np.round(x0))
              & (xs < np.round(x1))).sum()
    out.append(inside / area if area > 0 else 0.0)
  return np.asarray(out)


def test_region_coverage_matches_brute_force():
  rng = np.random.default_rng(5)
  region = np.zeros((40, 48), bool)
  region[5:20, 30:46] = True
  region[rng.random((40, 48)) < 0.1] = True
  boxes = np_random_boxes(rng, 200, size=60) - 6                 # some reach out of the image
  boxes[0] = [5, 30, 20, 46]                                      # exactly the block: 1.0
  boxes[1] = [10, 10, 10, 20]                                     # zero area: 0
  got = np.asarray(box_lib.region_coverage(jnp.asarray(boxes), jnp.asarray(region)))
  np.testing.assert_allclose(got, _np_coverage(boxes, region), rtol=1e-6, atol=1e-7)
  assert got[0] == 1.0 and got[1] == 0.0


def _crowd_scene():
  """One 64 px image: an object top-left, a crowd clump bottom-right; anchors of 16 px."""
  level_anchors = anchor_lib.multilevel_anchors(
      anchor_lib.feature_sizes((64, 64), (4,)), strides=(4,), sizes=((16,),),
      aspect_ratios=(0.5, 1.0, 2.0))
  gt = np.zeros((1, 2, 4), np.float32)
  gt[0, 0] = [4, 4, 22, 24]
  gt_valid = np.array([[True, False]])
  crowd = np.zeros((1, 64, 64), np.uint8)
  crowd[0, 34:62, 30:60] = 1
  return level_anchors[0], gt, gt_valid, crowd


def test_rpn_targets_ignore_what_a_crowd_region_covers():
  anchors, gt, gt_valid, crowd = _crowd_scene()
  fn = jax.jit(functools.partial(target_lib.rpn_targets, num_samples=256, positive_fraction=0.5))
  plain = jax.tree.map(np.asarray, fn(anchors, gt, gt_valid, jax.random.key(0)))
  crowded = jax.tree.map(np.asarray, fn(anchors, gt, gt_valid, jax.random.key(0), crowd=crowd))
  covered = _np_coverage(anchors, crowd[0]) >= 0.7
  assert covered.sum() > 20
  assert plain[1][0][covered].any()                       # without: some sampled as background
  assert not (crowded[0][0] | crowded[1][0])[covered].any()   # with: never positive or negative
  np.testing.assert_array_equal(crowded[0], plain[0])     # the object's positives are unchanged
  _, labels = target_lib.match(anchors, gt[0], gt_valid[0], high=0.7, low=0.3,
                               allow_low_quality=True,
                               ignore=jnp.asarray(covered))
  np.testing.assert_array_equal(np.asarray(labels)[covered], -1)


def test_sample_rois_never_take_crowd_covered_proposals_as_background():
  _, gt, gt_valid, crowd = _crowd_scene()
  rng = np.random.default_rng(6)
  proposals = np_random_boxes(rng, 60, size=64)[None].astype(np.float32)
  proposals[0, :20] = [36, 32, 58, 56] + rng.uniform(-3, 3, (20, 4))   # inside the clump
  fn = jax.jit(functools.partial(roi_lib.sample_rois, num_samples=48, positive_fraction=0.25))
  args = (proposals, np.ones((1, 60), bool), gt, np.array([[1, 0]], np.int32), gt_valid,
          jax.random.key(0))
  plain, crowded = fn(*args), fn(*args, crowd=crowd)
  inside = _np_coverage(proposals[0], crowd[0]) >= 0.7
  assert inside[:20].all()
  def sampled_background(rois):
    boxes = np.asarray(rois.boxes[0])[np.asarray(rois.valid[0] & ~rois.foreground[0])]
    return {tuple(b) for b in boxes.round(4)}
  crowd_boxes = {tuple(b) for b in proposals[0][inside].round(4)}
  assert sampled_background(plain) & crowd_boxes          # without: sampled as background
  assert not sampled_background(crowded) & crowd_boxes    # with: never
  assert int(crowded.foreground.sum()) == int(plain.foreground.sum())


# ---------------------------------------------------------------------------- RoI heads

def _np_decode_weighted(deltas, anchors, weights):
  return _np_decode(np.asarray(deltas) / np.asarray(weights), anchors)


@pytest.fixture(scope="module")
def sampled_rois():
  """Two images: one with two objects, proposals near them, background and padding; one empty."""
  rng = np.random.default_rng(3)
  gt_boxes = np.zeros((2, 3, 4), np.float32)
  gt_boxes[0, 0] = [10, 10, 30, 34]
  gt_boxes[0, 1] = [36, 40, 60, 62]
  gt_classes = np.array([[2, 5, 0], [0, 0, 0]], np.int32)
  gt_valid = np.array([[True, True, False], [False, False, False]])
  proposals = np_random_boxes(rng, 2 * 40).reshape(2, 40, 4)
  proposals[0, :6] = gt_boxes[0, 0] + rng.uniform(-2, 2, (6, 4))      # IoU >= 0.5 with object 0
  proposals[0, 6:9] = gt_boxes[0, 1] + rng.uniform(-2, 2, (3, 4))
  proposal_valid = np.ones((2, 40), bool)
  proposal_valid[:, 30:] = False
  fn = jax.jit(functools.partial(roi_lib.sample_rois, num_samples=24, positive_fraction=0.25))
  rois = fn(proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, jax.random.key(0))
  return dict(rois=jax.tree.map(np.asarray, rois), gt_boxes=gt_boxes, gt_classes=gt_classes,
              gt_valid=gt_valid, proposals=proposals, proposal_valid=proposal_valid)


def test_sample_rois_labels_and_targets(sampled_rois):
  r, gt = sampled_rois["rois"], sampled_rois["gt_boxes"]
  assert r.boxes.shape == (2, 24, 4)
  for n in range(2):
    fg, valid = r.foreground[n], r.valid[n]
    count = int(fg.sum())
    assert fg[:count].all() and not fg[count:].any()          # foreground rows first
    real = [g for g in range(3) if sampled_rois["gt_valid"][n, g]]
    for s in range(24):
      ious = [np_iou(r.boxes[n, s], gt[n, g]) for g in real]
      if fg[s]:
        g = r.matched_gt[n, s]
        assert np_iou(r.boxes[n, s], gt[n, g]) >= 0.5 and r.classes[n, s] == sampled_rois["gt_classes"][n, g]
        decoded = _np_decode_weighted(r.target_deltas[n, s][None], r.boxes[n, s][None],
                                      roi_lib.BOX_WEIGHTS)[0]
        np.testing.assert_allclose(decoded, gt[n, g], atol=1e-3)
      elif valid[s]:
        assert r.classes[n, s] == 0 and (not ious or max(ious) < 0.5)
  # Image 0: 6 + 3 close proposals + 2 appended ground-truth boxes = 11 candidates, capped at 6.
  assert int(r.foreground[0].sum()) == 6 and int(r.valid[0].sum()) == 24
  # Image 1: no objects; 30 valid proposals, so all 24 rows are background.
  assert int(r.foreground[1].sum()) == 0 and int(r.valid[1].sum()) == 24


def test_box_and_mask_heads_shapes():
  pooled = jnp.ones((2, 5, 7, 7, 8))
  head = roi_lib.BoxHead(num_classes=3, hidden=16)
  logits, deltas = head.apply(head.init(jax.random.key(0), pooled), pooled)
  assert logits.shape == (2, 5, 4) and deltas.shape == (2, 5, 3, 4)
  pooled = jnp.ones((2, 5, 14, 14, 8))
  mask_head = roi_lib.MaskHead(num_classes=3, features=8)
  assert mask_head.apply(mask_head.init(jax.random.key(0), pooled), pooled).shape == (2, 5, 28, 28, 3)


def test_fast_rcnn_loss_matches_numpy(sampled_rois):
  r = sampled_rois["rois"]
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(2, 24, 6)).astype(np.float32)
  deltas = rng.normal(size=(2, 24, 5, 4)).astype(np.float32)
  got = roi_lib.fast_rcnn_loss(logits, deltas, roi_lib.SampledRois(*r))
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  count = r.valid.sum()
  ce = sum(-log_probs[n, s, r.classes[n, s]] for n in range(2) for s in range(24) if r.valid[n, s])
  reg = sum(np.abs(deltas[n, s, r.classes[n, s] - 1] - r.target_deltas[n, s]).sum()
            for n in range(2) for s in range(24) if r.foreground[n, s])
  np.testing.assert_allclose(got["box_cls"], ce / count, rtol=1e-5)
  np.testing.assert_allclose(got["box_reg"], reg / count, rtol=1e-5)


def test_mask_targets_and_loss_match_numpy(sampled_rois):
  from tests.test_detection_ops import np_roi_align_one
  r = roi_lib.SampledRois(*sampled_rois["rois"])
  masks = np.zeros((2, 3, 64, 80), np.float32)
  for g, (y0, x0, y1, x1) in enumerate(sampled_rois["gt_boxes"][0, :2].astype(int)):
    yy, xx = np.mgrid[y0:y1, x0:x1]
    masks[0, g, y0:y1, x0:x1] = ((yy - (y0 + y1) / 2) ** 2 / ((y1 - y0) / 2) ** 2
                                 + (xx - (x0 + x1) / 2) ** 2 / ((x1 - x0) / 2) ** 2) <= 1
  targets = np.asarray(roi_lib.mask_targets(jnp.asarray(masks), r, size=14))
  assert targets.shape == (2, 24, 14, 14)
  for s in range(24):
    if r.foreground[0, s]:
      g = int(r.matched_gt[0, s])
      want = np_roi_align_one(masks[0, g][..., None], np.asarray(r.boxes[0, s], np.float64),
                              (14, 14), 1.0, 2, True)[..., 0] >= 0.5
      np.testing.assert_array_equal(targets[0, s], want)
    else:
      assert not targets[0, s].any()
  assert targets[0][np.asarray(r.foreground[0])].mean() > 0.3     # the ellipses are in there
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(2, 24, 14, 14, 5)).astype(np.float32)
  got = roi_lib.mask_loss(logits, targets, r)
  total, count = 0.0, 0
  for n in range(2):
    for s in range(24):
      if r.foreground[n, s]:
        x = logits[n, s, :, :, r.classes[n, s] - 1].astype(np.float64)
        t = targets[n, s]
        total += (np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0) - x * t).sum()
        count += x.size
  np.testing.assert_allclose(got, total / count, rtol=1e-5)


# ---------------------------------------------------------------------------- inference

def test_detect_matches_numpy():
  from seg_jax.models.detection import postprocess
  rng = np.random.default_rng(6)
  n, r, k = 2, 30, 3
  logits = (rng.normal(size=(n, r, k + 1)) * 2).astype(np.float32)
  deltas = (rng.normal(size=(n, r, k, 4))).astype(np.float32)
  rois = np_random_boxes(rng, n * r).reshape(n, r, 4)
  rois[:, :10] = rois[:, :1]                      # overlapping RoIs, so NMS has work
  roi_valid = rng.random((n, r)) < 0.9
  fn = jax.jit(functools.partial(postprocess.detect, image_size=(64, 70), score_threshold=0.2,
                                 iou_threshold=0.5, max_detections=12))
  boxes, scores, classes, valid = fn(logits, deltas, rois, roi_valid)
  for i in range(n):
    probs = np.exp(logits[i]) / np.exp(logits[i]).sum(-1, keepdims=True)
    cand_boxes, cand_scores, cand_classes = [], [], []
    for j in range(r):
      for c in range(1, k + 1):
        box = _np_decode_weighted(deltas[i, j, c - 1][None], rois[i, j][None], (10, 10, 5, 5))[0]
        box[[0, 2]] = box[[0, 2]].clip(0, 64)
        box[[1, 3]] = box[[1, 3]].clip(0, 70)
        if roi_valid[i, j] and probs[j, c] > 0.2 and box[2] > box[0] and box[3] > box[1]:
          cand_boxes.append(box)
          cand_scores.append(probs[j, c])
          cand_classes.append(c)
    kept = np_greedy_nms(np.array(cand_boxes), np.array(cand_scores), 0.5,
                         classes=cand_classes)[:12]
    count = int(valid[i].sum())
    assert count == len(kept)
    np.testing.assert_allclose(boxes[i, :count], np.array(cand_boxes)[kept], atol=1e-3)
    np.testing.assert_allclose(scores[i, :count], np.array(cand_scores)[kept], rtol=1e-5)
    np.testing.assert_array_equal(classes[i, :count], np.array(cand_classes)[kept])


def test_paste_masks_matches_numpy():
  from seg_jax.models.detection import postprocess
  rng = np.random.default_rng(7)
  masks = rng.random((3, 7, 7)).astype(np.float32)
  boxes = np.array([[4.3, 5.0, 20.7, 15.2], [-3.0, 10.0, 9.0, 40.0], [10.0, 10.0, 10.5, 30.0]],
                   np.float32)
  got = np.asarray(postprocess.paste_masks(jnp.asarray(masks), jnp.asarray(boxes), (24, 36)))
  want = np.zeros((3, 24, 36))
  for d, (y0, x0, y1, x1) in enumerate(boxes.astype(np.float64)):
    for y in range(24):
      for x in range(36):
        cy, cx = y + 0.5, x + 0.5
        if not (y0 <= cy < y1 and x0 <= cx < x1):
          continue
        u = min(max((cy - y0) / (y1 - y0) * 7 - 0.5, 0), 6)
        v = min(max((cx - x0) / (x1 - x0) * 7 - 0.5, 0), 6)
        u0, v0 = int(np.floor(u)), int(np.floor(v))
        u1, v1 = min(u0 + 1, 6), min(v0 + 1, 6)
        fu, fv = u - u0, v - v0
        want[d, y, x] = ((1 - fu) * (1 - fv) * masks[d, u0, v0] + (1 - fu) * fv * masks[d, u0, v1]
                         + fu * (1 - fv) * masks[d, u1, v0] + fu * fv * masks[d, u1, v1])
  np.testing.assert_allclose(got, want, atol=1e-5)
  # A full mask covers exactly the pixels whose centres are in the box.
  ones = np.asarray(postprocess.paste_masks(jnp.ones((1, 7, 7)), jnp.asarray(boxes[:1]), (24, 36)))
  assert ones[0].sum() == 17 * 10 and ones[0, 4:21, 5:15].min() == 1.0   # centres 4.5..20.5, 5.5..14.5


# ---------------------------------------------------------------------------- the whole model

def _tiny_mask_rcnn(**overrides):
  from seg_jax.models.detection import mask_rcnn
  settings = dict(num_classes=2, backbone="resnet10", width=8, stem="small", fpn_features=16,
                  anchor_sizes=(8, 16, 32, 64, 128), rpn_pre_nms_topk=64,
                  rpn_post_nms_topk=64, rpn_num_samples=64, roi_num_samples=32,
                  canonical_size=56.0, box_head_hidden=32, mask_head_features=8,
                  detections_per_image=10)
  settings.update(overrides)
  return mask_rcnn.MaskRCNN(**settings)


def _tiny_scene(rng, n=2, size=64):
  """Bright rectangles (class 1) and discs (class 2) on noise, with padded ground truth."""
  images = rng.normal(0, 0.1, (n, size, size, 3)).astype(np.float32)
  boxes = np.zeros((n, 3, 4), np.float32)
  classes = np.zeros((n, 3), np.int32)
  valid = np.zeros((n, 3), bool)
  masks = np.zeros((n, 3, size, size), np.float32)
  yy, xx = np.mgrid[:size, :size] + 0.5
  for i in range(n):
    for g, (y0, x0, side, cls) in enumerate([(8, 8 + 20 * i, 18, 1), (36, 30 - 10 * i, 22, 2)]):
      y1, x1 = y0 + side, x0 + side
      if cls == 1:
        m = (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
      else:
        m = (yy - (y0 + y1) / 2) ** 2 + (xx - (x0 + x1) / 2) ** 2 <= (side / 2) ** 2
      images[i][m] += 1.0 if cls == 1 else -1.0
      boxes[i, g] = [y0, x0, y1, x1]
      classes[i, g] = cls
      valid[i, g] = True
      masks[i, g] = m
  targets = {"gt_boxes": boxes, "gt_classes": classes, "gt_valid": valid, "gt_masks": masks}
  return images, targets


def test_mask_rcnn_train_steps_lower_the_loss_and_compile_once():
  import optax
  from seg_jax.models.detection import mask_rcnn
  model = _tiny_mask_rcnn()
  images, targets = _tiny_scene(np.random.default_rng(0))
  variables = jax.jit(lambda: model.init({"params": jax.random.key(0), "sampling": jax.random.key(1)},
                                         images, targets, train=True))()
  tx = optax.adam(3e-3)
  opt_state = tx.init(variables["params"])

  @jax.jit
  def step(params, batch_stats, opt_state, images, targets, key):
    def loss_fn(params):
      losses, updates = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                    targets, train=True, rngs={"sampling": key},
                                    mutable=["batch_stats"])
      return mask_rcnn.total_loss(losses), (losses, updates["batch_stats"])
    (loss, (losses, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss, losses

  params, batch_stats = variables["params"], variables["batch_stats"]
  history = []
  for i in range(12):
    params, batch_stats, opt_state, loss, losses = step(
        params, batch_stats, opt_state, images, targets, jax.random.key(100 + i))
    history.append(float(loss))
    assert set(mask_rcnn.LOSS_PARTS) <= set(losses) and all(np.isfinite(float(v)) for v in losses.values())
  assert np.mean(history[-3:]) < 0.8 * np.mean(history[:3]), history
  # Another batch of the same shapes runs the same compiled program.
  other_images, other_targets = _tiny_scene(np.random.default_rng(1))
  step(params, batch_stats, opt_state, other_images, other_targets, jax.random.key(7))
  assert step._cache_size() == 1

  # Inference traced, not compiled (a compile costs ~30 s here): the shapes are what is fixed.
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False),
                       {"params": params, "batch_stats": batch_stats}, images)
  assert out["boxes"].shape == (2, 10, 4) and out["masks"].shape == (2, 10, 28, 28)
  assert out["valid"].dtype == jnp.bool_ and out["classes"].shape == (2, 10)


def test_faster_rcnn_has_no_mask_head():
  model = _tiny_mask_rcnn(with_masks=False)
  images, targets = _tiny_scene(np.random.default_rng(0))
  variables = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "sampling": jax.random.key(1)}, images, targets, train=True))
  assert "mask_head" not in variables["params"] and "box_head" in variables["params"]
