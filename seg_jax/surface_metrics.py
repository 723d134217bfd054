"""Per-case metrics of volumes in physical units (host, numpy + scipy): Dice, HD95, NSD.

Conventions (MONAI's `DiceMetric(ignore_empty=True)`, `HausdorffDistanceMetric(percentile=95)`,
`SurfaceDiceMetric`, so numbers compare with theirs):

- The surface of a binary mask is its voxels with a face-neighbour outside the mask
  (mask minus its erosion by the 6-connected cross; voxels on the array's border count as
  surface). Distances are Euclidean in mm, with the voxel spacing (scipy's distance transform
  with `sampling=spacing`), from each surface voxel of one mask to the nearest of the other.
- Dice of a class: 2|P∩T| / (|P| + |T|); NaN when the class is absent from the truth
  (whatever the prediction), and means skip NaN.
- HD95: the larger of the two directed 95th percentiles of the surface distances.
  NaN when the class is absent from both; +inf when it is absent from exactly one.
- NSD at tolerance τ mm: the fraction of both surfaces within τ of the other.
  NaN when absent from both; 0 when absent from exactly one.
- Voxels whose truth is `ignore_label` count in none of them (the prediction there is dropped).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_CROSS = ndimage.generate_binary_structure(3, 1)


def surface(mask: np.ndarray) -> np.ndarray:
  """Bool mask of the surface voxels of a bool volume (see the module docstring)."""
  return mask & ~ndimage.binary_erosion(mask, structure=_CROSS, border_value=0)


def _crop_box(*masks: np.ndarray) -> tuple[slice, ...]:
  """The bounding box of all `masks`' voxels, one voxel wider (clipped to the array)."""
  union = np.logical_or.reduce(masks)
  where = np.argwhere(union)
  lo = np.maximum(where.min(axis=0) - 1, 0)
  hi = np.minimum(where.max(axis=0) + 2, union.shape)
  return tuple(slice(a, b) for a, b in zip(lo, hi))


def surface_distances(prediction: np.ndarray, truth: np.ndarray, spacing
                      ) -> tuple[np.ndarray, np.ndarray]:
  """(mm from each prediction surface voxel to the truth's surface, and the reverse); both
  masks non-empty. Computed in the masks' bounding box: every surface voxel lies in it."""
  box = _crop_box(prediction, truth)
  pred_surface, truth_surface = surface(prediction[box]), surface(truth[box])
  to_truth = ndimage.distance_transform_edt(~truth_surface, sampling=spacing)
  to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
  return to_truth[pred_surface], to_pred[truth_surface]


def hd95(prediction: np.ndarray, truth: np.ndarray, spacing) -> float:
  """95th-percentile Hausdorff distance in mm of two bool volumes (MONAI's empty-mask rules)."""
  if not prediction.any() and not truth.any():
    return float("nan")
  if not prediction.any() or not truth.any():
    return float("inf")
  forward, backward = surface_distances(prediction, truth, spacing)
  return float(max(np.percentile(forward, 95), np.percentile(backward, 95)))


def normalized_surface_dice(prediction: np.ndarray, truth: np.ndarray, spacing,
                            tolerance_mm: float) -> float:
  """Fraction of both surfaces within `tolerance_mm` of the other (MONAI's empty-mask rules)."""
  if not prediction.any() and not truth.any():
    return float("nan")
  if not prediction.any() or not truth.any():
    return 0.0
  forward, backward = surface_distances(prediction, truth, spacing)
  return float((np.sum(forward <= tolerance_mm) + np.sum(backward <= tolerance_mm))
               / (len(forward) + len(backward)))


def case_scores(prediction: np.ndarray, truth: np.ndarray, *, num_classes: int, spacing,
                tolerance_mm: float, ignore_label: int = 255) -> dict[str, np.ndarray]:
  """Per-class scores of one case: 'dice', 'hd95', 'nsd' float64 [K] (class 0 is background:
  NaN for the surface metrics) and 'intersection', 'prediction', 'truth' int64 [K] voxel counts
  (summed over cases for the dataset-level Dice)."""
  counted = truth != ignore_label
  out = {key: np.full(num_classes, np.nan) for key in ("dice", "hd95", "nsd")}
  for key in ("intersection", "prediction", "truth"):
    out[key] = np.zeros(num_classes, np.int64)
  for c in range(num_classes):
    p, t = (prediction == c) & counted, truth == c
    inter, ps, ts = int(np.sum(p & t)), int(p.sum()), int(t.sum())
    out["intersection"][c], out["prediction"][c], out["truth"][c] = inter, ps, ts
    if ts:
      out["dice"][c] = 2 * inter / (ps + ts)
    if c:
      out["hd95"][c] = hd95(p, t, spacing)
      out["nsd"][c] = normalized_surface_dice(p, t, spacing, tolerance_mm)
  return out


def dataset_scores(cases: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Scores of a split from its cases' `case_scores`: per class, 'dice' (mean over cases,
  NaN skipped: MONAI's reduction), 'dice_dataset' (counts summed over cases first), 'hd95'
  and 'nsd' (means over cases of the finite values), and 'mean_dice_foreground'."""
  def nanmean(values):
    values = np.asarray(values, np.float64)
    finite = np.isfinite(values)
    return float(values[finite].mean()) if finite.any() else float("nan")

  stack = {key: np.stack([case[key] for case in cases]) for key in cases[0]}
  num_classes = stack["dice"].shape[1]
  inter, pred, truth = (stack[k].sum(axis=0) for k in ("intersection", "prediction", "truth"))
  denominator = pred + truth
  out = {
      "dice": np.array([nanmean(stack["dice"][:, c]) for c in range(num_classes)]),
      "dice_dataset": np.where(denominator > 0, 2 * inter / np.maximum(denominator, 1), np.nan),
      "hd95": np.array([nanmean(stack["hd95"][:, c]) for c in range(num_classes)]),
      "nsd": np.array([nanmean(stack["nsd"][:, c]) for c in range(num_classes)]),
      "num_cases": len(cases),
  }
  out["mean_dice_foreground"] = nanmean(out["dice"][1:])
  return out
