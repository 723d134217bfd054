"""Instance segmentation and detection: Mask R-CNN / Faster R-CNN losses, COCO AP, pictures.

Batches carry, besides `image` and `mask`, the padded instances of the data
contract: `boxes [B, M, 4]` (y0, x0, y1, x1 in pixels), `classes [B, M]`
(0 = padding) and `instance_masks [B, M, H, W]`; datasets that mark crowd regions
(coco_json's `iscrowd=1`) add `crowd` uint8 `[B, H, W]`, which training ignores. The eval step returns the
detector's fixed-size detections with their masks pasted into the image and
thresholded at 0.5 on device; the host gathers them (and the ground truth) to
every process and scores them with pycocotools (`seg_jax/coco_eval.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from seg_jax import coco_eval
from seg_jax import parallel
from seg_jax import registry
from seg_jax import visualize
from seg_jax.data import pipeline
from seg_jax.data import transforms
from seg_jax.models.detection import mask_rcnn
from seg_jax.models.detection import postprocess

GT_KEYS = ("boxes", "classes", "instance_masks", "valid")


def detector_targets(batch: dict) -> dict:
  """The data contract's instance fields in the names MaskRCNN takes (and `crowd`, the crowd
  regions of datasets that mark them, coco_json)."""
  targets = {"gt_boxes": batch["boxes"], "gt_classes": batch["classes"],
             "gt_valid": batch["classes"] > 0, "gt_masks": batch["instance_masks"]}
  if "crowd" in batch:
    targets["gt_crowd"] = batch["crowd"]
  return targets


class InstanceTask:
  """Loss, eval outputs, scores and pictures of the detectors."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.with_masks = registry.model_entry(config.model.name).fixed.get("with_masks", False)

  # -------------------------------------------------------------- device (under jit)

  def loss(self, model, variables, batch, *, rng):
    """(total loss, {'loss_<term>': value, 'roi_foreground_fraction': ...}, new batch statistics)."""
    losses, updates = model.apply(variables, batch["image"], detector_targets(batch), train=True,
                                  mutable=["batch_stats"], rngs={"sampling": rng})
    metrics = {f"loss_{k}": losses[k] for k in mask_rcnn.LOSS_PARTS if k in losses}
    metrics["roi_foreground_fraction"] = losses["roi_foreground_fraction"]
    return mask_rcnn.total_loss(losses), metrics, updates.get("batch_stats", {})

  def eval_outputs(self, model, variables, batch):
    """Detections `boxes [B, D, 4]`, `scores`, `classes`, `valid [B, D]` and, for Mask R-CNN,
    binary `masks` uint8 [B, D, H, W] in image pixels."""
    out = model.apply(variables, batch["image"], train=False)
    if self.with_masks:
      pasted = postprocess.paste_masks(out["masks"], out["boxes"], batch["image"].shape[1:3])
      out["masks"] = (pasted >= 0.5).astype(jnp.uint8) * out["valid"][..., None, None]
    return out

  def eval_out_shardings(self, mesh):
    return parallel.batch_sharding(mesh)

  # -------------------------------------------------------------- host

  def evaluator(self, class_names: list[str], reference=None) -> "InstanceEvaluator":
    """class_names[0] is the background; the detector's class c is class_names[c].

    With a `reference` (coco_json's `EvalReference`), detections are mapped back to the
    original images, ids and category ids and scored against the user's own eval JSON.
    """
    return InstanceEvaluator(class_names[1:], with_masks=self.with_masks,
                             num_visuals=self.config.num_eval_visuals, reference=reference)

  def scalars(self, scores: dict, class_names: list[str]) -> dict[str, float]:
    return {f"eval/{k}": float(v) for k, v in scores.items()}

  def headline(self, scores: dict) -> str:
    parts = [f"box AP {scores['box_AP']:.4f} AP50 {scores['box_AP50']:.4f}"]
    if self.with_masks:
      parts.append(f"mask AP {scores['mask_AP']:.4f} AP50 {scores['mask_AP50']:.4f}")
    return " | ".join(parts)

  def table(self, scores: dict, class_names: list[str]) -> str:
    kinds = ("box", "mask") if self.with_masks else ("box",)
    lines = [f"{'':<6}" + "".join(f"{n:>8}" for n in coco_eval.STAT_NAMES)]
    for kind in kinds:
      lines.append(f"{kind:<6}" + "".join(f"{scores[f'{kind}_{n}']:>8.4f}"
                                          for n in coco_eval.STAT_NAMES))
    return "\n".join(lines)

  def picture(self, visuals: dict, class_names: list[str]) -> np.ndarray:
    """image | ground truth | detections (score >= config.visual_score_threshold) rows."""
    c = self.config
    truths, predictions = [], []
    for i in np.nonzero(visuals["valid"])[0]:
      real = visuals["classes"][i] > 0
      truths.append({"boxes": visuals["boxes"][i][real], "classes": visuals["classes"][i][real],
                     "masks": visuals["instance_masks"][i][real]})
      shown = visuals["det_valid"][i] & (
          visuals["det_scores"][i] >= c.visual_score_threshold)
      predictions.append({key: visuals[f"det_{key}"][i][shown]
                          for key in ("boxes", "classes", "scores", "masks")
                          if f"det_{key}" in visuals})
    images = transforms.denormalize_image(visuals["image"][visuals["valid"]],
                                           c.model.input_normalization)
    return visualize.instance_panels(images, truths, predictions,
                                     num_classes=c.dataset.num_classes, class_names=class_names,
                                     scale=max(1, 256 // c.dataset.image_size))


def gather(tree):
  """Numpy copies of batch-sharded global arrays, all rows, on every process."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


class InstanceEvaluator:
  """Collects every image's ground truth and detections, then COCO AP over the split.

  With a `reference`, the detections are instead kept in the COCO results format of the
  user's eval JSON (`results`: original image ids, category ids and pixels, RLE masks) and
  scored against that JSON itself (`coco_eval.score_results`).
  """

  def __init__(self, class_names: list[str], *, with_masks: bool, num_visuals: int,
               reference=None):
    self.coco = coco_eval.CocoEvaluator(class_names, with_masks=with_masks)
    self.with_masks = with_masks
    self.num_visuals = num_visuals
    self.visuals = None
    self.reference = reference
    self.results = [] if reference is not None else None
    if reference is not None:
      self._ids = sorted(reference.image_ids)
      self._index = {example_id: k for k, example_id in enumerate(self._ids)}

  def add(self, host_batch: dict, device_batch: dict, outputs: dict, *, ids=None) -> None:
    """`ids` (the examples' ids, '' for padding) place the detections in the user's own terms
    when the evaluator has a `reference`; per-image AP is not computed (pycocotools scores the
    split)."""
    want_visuals = self.visuals is None and self.num_visuals
    # Images only for the pictures: the COCO scores need none.
    truth = gather({k: device_batch[k] for k in GT_KEYS + (("image",) if want_visuals else ())})
    det = gather(outputs)
    image_size = device_batch["image"].shape[1:3]
    if self.reference is not None:
      index = np.asarray([self._index.get(str(i), -1) for i in ids], np.int32)
      index = (index if jax.process_count() == 1
               else np.asarray(multihost_utils.process_allgather(index, tiled=True)))
      for i in np.nonzero(truth["valid"])[0]:
        example_id = self._ids[index[i]]
        self.results += coco_eval.results_in_original_terms(
            det["boxes"][i], det["scores"][i], det["classes"][i], det["valid"][i],
            det["masks"][i] if self.with_masks else None,
            image_id=self.reference.image_ids[example_id],
            original_size=self.reference.sizes[example_id],
            shown_size=pipeline.shown_shape(*self.reference.sizes[example_id],
                                            self.reference.canvas, self.reference.resize),
            category_ids=self.reference.category_ids)
    for i in np.nonzero(truth["valid"])[0] if self.reference is None else ():
      self.coco.add(truth["boxes"][i], truth["classes"][i], truth["classes"][i] > 0,
                    det["boxes"][i], det["scores"][i], det["classes"][i], det["valid"][i],
                    image_size=image_size,
                    gt_masks=truth["instance_masks"][i] if self.with_masks else None,
                    det_masks=det["masks"][i] if self.with_masks else None)
    if want_visuals:
      n = self.num_visuals
      self.visuals = {**{k: v[:n] for k, v in truth.items()},
                      **{f"det_{k}": v[:n] for k, v in det.items()}}

  def compute(self) -> dict:
    if self.reference is not None:
      return coco_eval.score_results(self.reference.json_path, self.results,
                                     with_masks=self.with_masks)
    return self.coco.compute()
