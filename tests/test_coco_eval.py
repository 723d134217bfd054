"""COCO AP through pycocotools: perfect detections, a shifted box, and the bookkeeping."""

import numpy as np
import pytest

from seg_jax import coco_eval


def _box_mask(box, size=(64, 64)):
  mask = np.zeros(size, np.float32)
  y0, x0, y1, x1 = np.asarray(box, int)
  mask[y0:y1, x0:x1] = 1
  return mask


GT_BOXES = np.array([[4, 4, 24, 28], [30, 10, 60, 40], [0, 0, 0, 0]], np.float32)
GT_CLASSES = np.array([1, 2, 0])
GT_VALID = np.array([True, True, False])


def _add(evaluator, det_boxes, det_scores, det_classes, det_valid):
  evaluator.add(GT_BOXES, GT_CLASSES, GT_VALID, det_boxes, det_scores, det_classes, det_valid,
                image_size=(64, 64), gt_masks=np.stack([_box_mask(b) for b in GT_BOXES]),
                det_masks=np.stack([_box_mask(b) for b in det_boxes]))


def test_perfect_detections_give_ap_one():
  evaluator = coco_eval.CocoEvaluator(["square", "disc"])
  det_boxes = np.concatenate([GT_BOXES[:2], np.zeros((3, 4), np.float32)])
  for _ in range(2):   # two images
    _add(evaluator, det_boxes, np.array([0.9, 0.8, 0, 0, 0]), np.array([1, 2, 0, 0, 0]),
         np.array([True, True, False, False, False]))
  scores = evaluator.compute()
  for prefix in ("box", "mask"):
    for name in ("AP", "AP50", "AP75"):
      assert scores[f"{prefix}_{name}"] == pytest.approx(1.0), (prefix, name)
  # Both objects are small (area < 32**2); COCO has no medium/large value: we write NaN.
  assert scores["box_APs"] == pytest.approx(1.0)
  assert np.isnan(scores["box_APm"]) and np.isnan(scores["box_APl"])


def test_a_shifted_box_scores_the_thresholds_it_passes():
  """Object 1 found with IoU 0.66 (shifted), object 2 exactly: per class, AP over the ten IoU
  thresholds 0.50:0.95 is the share of thresholds passed, and mean AP averages the classes."""
  shifted = GT_BOXES[0] + np.array([0, 5, 0, 5], np.float32)   # 20x24 box moved 5 px right
  inter = 20 * 19
  iou = inter / (2 * 20 * 24 - inter)
  assert 0.65 < iou < 0.7
  evaluator = coco_eval.CocoEvaluator(["square", "disc"])
  _add(evaluator, np.stack([shifted, GT_BOXES[1]]), np.array([0.9, 0.8]), np.array([1, 2]),
       np.array([True, True]))
  scores = evaluator.compute()
  passed = sum(iou >= t for t in np.linspace(0.5, 0.95, 10))     # 0.50 ... 0.65: 4
  assert scores["box_AP"] == pytest.approx((passed / 10 + 1.0) / 2, abs=1e-6)
  assert scores["box_AP50"] == pytest.approx(1.0)
  assert scores["box_AP75"] == pytest.approx(0.5)                # class 1 misses at 0.75
  assert scores["mask_AP"] == pytest.approx(scores["box_AP"], abs=1e-6)   # box-shaped masks


def test_false_positive_ranked_first_halves_precision():
  evaluator = coco_eval.CocoEvaluator(["square", "disc"], with_masks=False)
  evaluator.add(GT_BOXES[:1], GT_CLASSES[:1], GT_VALID[:1],
                np.array([[40, 40, 60, 60], GT_BOXES[0]], np.float32), np.array([0.9, 0.5]),
                np.array([1, 1]), np.array([True, True]), image_size=(64, 64))
  scores = evaluator.compute()
  # Precision 1/2 at recall 1: COCO's interpolated AP over 101 recall points is 0.5.
  assert scores["box_AP50"] == pytest.approx(0.5)
  assert "mask_AP" not in scores


def test_no_detections_gives_zero():
  evaluator = coco_eval.CocoEvaluator(["square", "disc"], with_masks=False)
  evaluator.add(GT_BOXES, GT_CLASSES, GT_VALID, np.zeros((2, 4)), np.zeros(2), np.zeros(2, int),
                np.zeros(2, bool), image_size=(64, 64))
  assert evaluator.compute()["box_AP"] == 0.0
