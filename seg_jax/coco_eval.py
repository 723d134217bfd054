"""COCO box and mask AP through pycocotools (host code).

`CocoEvaluator` collects, image by image, the padded ground truth and the
fixed-size detections the jitted model returns (numpy arrays, validity masks
included), converts them to COCO's formats (boxes as [x, y, width, height],
masks as run-length encodings) and runs `COCOeval` for 'bbox' and 'segm'.
Only process 0 needs to hold everything: gather the arrays to it first.

Metric names, as written to metrics.jsonl: `box_AP`, `box_AP50`, `box_AP75`,
`box_APs`, `box_APm`, `box_APl` and the same with `mask_` (COCO's AP over
IoU 0.50:0.95, at 0.50, at 0.75, and for small/medium/large objects). A
metric COCO cannot compute (e.g. no small objects) is NaN, not -1.
"""

from __future__ import annotations

import contextlib
import io
from typing import Sequence

import numpy as np
from pycocotools import coco as coco_api
from pycocotools import cocoeval
from pycocotools import mask as mask_api

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _xywh(boxes: np.ndarray) -> np.ndarray:
  """(y0, x0, y1, x1) -> COCO's (x, y, width, height)."""
  boxes = np.asarray(boxes, np.float64)
  return np.stack([boxes[:, 1], boxes[:, 0], boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]],
                  axis=1)


def _rle(masks: np.ndarray) -> list[dict]:
  """Binary `[K, H, W]` masks -> COCO RLEs (counts as str, so they are JSON-safe)."""
  if len(masks) == 0:
    return []
  encoded = mask_api.encode(np.asfortranarray(np.moveaxis(masks.astype(np.uint8), 0, -1)))
  for rle in encoded:
    rle["counts"] = rle["counts"].decode("ascii")
  return encoded


class CocoEvaluator:
  """Accumulates images, then `compute()` gives {'box_AP': ..., 'mask_AP': ...}."""

  def __init__(self, class_names: Sequence[str], *, with_masks: bool = True):
    self.class_names = list(class_names)       # class c (1..K) is class_names[c - 1]
    self.with_masks = with_masks
    self._images, self._gt, self._dt = [], [], []

  def add(self, gt_boxes, gt_classes, gt_valid, det_boxes, det_scores, det_classes, det_valid, *,
          image_size: tuple[int, int], gt_masks=None, det_masks=None) -> None:
    """One image. Boxes `[., 4]` (y0, x0, y1, x1) in pixels; classes in 1..K; masks `[., H, W]`
    (detections: probabilities or binary, thresholded at 0.5)."""
    image_id = len(self._images) + 1
    height, width = image_size
    self._images.append({"id": image_id, "height": int(height), "width": int(width)})
    keep = np.asarray(gt_valid, bool)
    boxes = _xywh(np.asarray(gt_boxes)[keep])
    classes = np.asarray(gt_classes)[keep]
    rles = _rle(np.asarray(gt_masks)[keep] > 0.5) if self.with_masks else [None] * len(boxes)
    for box, cls, rle in zip(boxes, classes, rles):
      area = float(mask_api.area(rle)) if rle is not None else float(box[2] * box[3])
      ann = {"id": len(self._gt) + 1, "image_id": image_id, "category_id": int(cls),
             "bbox": box.tolist(), "area": area, "iscrowd": 0}
      if rle is not None:
        ann["segmentation"] = rle
      self._gt.append(ann)
    keep = np.asarray(det_valid, bool)
    boxes = _xywh(np.asarray(det_boxes)[keep])
    scores = np.asarray(det_scores)[keep]
    classes = np.asarray(det_classes)[keep]
    rles = _rle(np.asarray(det_masks)[keep] >= 0.5) if self.with_masks else [None] * len(boxes)
    for box, score, cls, rle in zip(boxes, scores, classes, rles):
      det = {"image_id": image_id, "category_id": int(cls), "bbox": box.tolist(),
             "score": float(score)}
      if rle is not None:
        det["segmentation"] = rle
      self._dt.append(det)

  def compute(self) -> dict[str, float]:
    gt = coco_api.COCO()
    gt.dataset = {"images": self._images, "annotations": self._gt,
                  "categories": [{"id": i + 1, "name": n} for i, n in enumerate(self.class_names)]}
    with contextlib.redirect_stdout(io.StringIO()):   # pycocotools prints its progress
      gt.createIndex()
    return _cocoeval_scores(gt, self._dt, with_masks=self.with_masks)


# ---------------------------------------------------------------------------- the user's own terms

def to_original_pixels(boxes: np.ndarray, masks: np.ndarray | None, *,
                       original_size: tuple[int, int], shown_size: tuple[int, int]):
  """Boxes `[K, 4]` (y0, x0, y1, x1) and binary masks `[K, H, W]` of an image shown at
  `shown_size` (top-left of a padded canvas) -> the original image's pixels.

  Boxes are scaled per axis and clipped to the image; masks are cropped to the shown region and
  resampled to the original size by nearest neighbour (pixel centres), so an image shown at its
  own size comes back unchanged.
  """
  (height, width), (shown_h, shown_w) = original_size, shown_size
  scale = np.asarray([height / shown_h, width / shown_w] * 2, np.float64)
  boxes = np.asarray(boxes, np.float64) * scale
  boxes = np.clip(boxes, 0, [height, width, height, width])
  if masks is None:
    return boxes, None
  masks = np.asarray(masks)[:, :shown_h, :shown_w]
  if (shown_h, shown_w) != (height, width):
    rows = np.minimum(((np.arange(height) + 0.5) * shown_h / height).astype(int), shown_h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * shown_w / width).astype(int), shown_w - 1)
    masks = masks[:, rows][:, :, cols]
  return boxes, masks


def results_in_original_terms(boxes, scores, classes, valid, masks, *, image_id: int,
                              original_size: tuple[int, int], shown_size: tuple[int, int],
                              category_ids: Sequence[int]) -> list[dict]:
  """One image's fixed-size detections as COCO results: the original image id, pixels and
  category ids (class c is category_ids[c - 1]), masks as RLE (counts as str)."""
  keep = np.asarray(valid, bool)
  boxes, masks = to_original_pixels(
      np.asarray(boxes)[keep], None if masks is None else np.asarray(masks)[keep] >= 0.5,
      original_size=original_size, shown_size=shown_size)
  rles = _rle(masks) if masks is not None else [None] * len(boxes)
  out = []
  for box, score, cls, rle in zip(_xywh(boxes), np.asarray(scores)[keep],
                                  np.asarray(classes)[keep], rles):
    result = {"image_id": image_id, "category_id": int(category_ids[int(cls) - 1]),
              "bbox": [round(float(v), 3) for v in box], "score": float(score)}
    if rle is not None:
      result["segmentation"] = rle
    out.append(result)
  return out


def load_ground_truth(json_path: str) -> coco_api.COCO:
  with contextlib.redirect_stdout(io.StringIO()):   # pycocotools prints its progress
    return coco_api.COCO(json_path)


def score_results(json_path: str, results: list[dict], *, with_masks: bool = True
                  ) -> dict[str, float]:
  """COCO box (and mask) AP of COCO-format `results` against the annotation file `json_path`,
  by pycocotools' COCOeval over every image of the file; names as `CocoEvaluator.compute`."""
  return _cocoeval_scores(load_ground_truth(json_path), results, with_masks=with_masks)


def _cocoeval_scores(gt: coco_api.COCO, results: list[dict], *, with_masks: bool
                     ) -> dict[str, float]:
  """box_<stat> (and mask_<stat>) of COCOeval over `results` against `gt`; 0 without results,
  nan where COCOeval has no value (-1)."""
  scores = {}
  for kind, prefix in (("bbox", "box"), ("segm", "mask")):
    if kind == "segm" and not with_masks:
      continue
    if not results:
      scores.update({f"{prefix}_{n}": 0.0 for n in STAT_NAMES})
      continue
    with contextlib.redirect_stdout(io.StringIO()):   # pycocotools prints its progress
      evaluator = cocoeval.COCOeval(gt, gt.loadRes([dict(r) for r in results]), kind)
      evaluator.evaluate()
      evaluator.accumulate()
      evaluator.summarize()
    for name, value in zip(STAT_NAMES, evaluator.stats[:6]):
      scores[f"{prefix}_{name}"] = float(value) if value >= 0 else float("nan")
  return scores
