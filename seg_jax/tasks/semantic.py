"""Semantic segmentation: per-pixel logits, pixel losses, a confusion matrix per split."""

from __future__ import annotations

import csv
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from seg_jax import config as config_lib
from seg_jax import losses
from seg_jax import metrics
from seg_jax import parallel
from seg_jax import visualize
from seg_jax.data import transforms


def predict_classes(logits: jax.Array) -> jax.Array:
  """Class ids [N, H, W] from logits: argmax, or logit > 0 for one binary logit."""
  if logits.shape[-1] == 1:
    return (logits[..., 0] > 0).astype(jnp.int32)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def local_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in order."""
  shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards], axis=0)


PER_IMAGE_COUNTS = ("intersection", "truth", "predicted")


def per_image_counts(predictions, labels, *, num_classes: int, ignore_label: int, valid):
  """Per image and class, int32 [B, K]: `intersection` (pixels of the class in truth and
  prediction), `truth` and `predicted` pixel counts; ignored pixels and padding (valid=False)
  count nowhere. Summed over images: the diagonal, row sums and column sums of the split's
  confusion matrix."""
  batch = labels.shape[0]
  counted = (labels != ignore_label) & valid[:, None, None]
  image = jnp.arange(batch)[:, None, None]

  def count(classes, where):
    cells = jnp.where(where, image * num_classes + jnp.clip(classes, 0, num_classes - 1), 0)
    return jnp.bincount(cells.reshape(-1), where.reshape(-1).astype(jnp.int32),
                        length=batch * num_classes).reshape(batch, num_classes)

  return {"intersection": count(labels, counted & (labels == predictions)),
          "truth": count(labels, counted), "predicted": count(predictions, counted)}


def per_image_scores(table: dict) -> dict[str, np.ndarray]:
  """Per-image `dice` and `iou` [N, K] (NaN where a class is in neither truth nor prediction)
  and their means over classes present, `mean_dice` and `mean_iou` [N], from the counts."""
  inter, truth, pred = (np.asarray(table[k], np.float64) for k in PER_IMAGE_COUNTS)
  with np.errstate(divide="ignore", invalid="ignore"):
    dice = np.where(truth + pred > 0, 2 * inter / (truth + pred), np.nan)
    iou = np.where(truth + pred - inter > 0, inter / (truth + pred - inter), np.nan)
  present = ~np.isnan(dice)
  with np.errstate(divide="ignore", invalid="ignore"):
    mean = lambda x: np.where(present.any(1), np.nansum(x, 1) / present.sum(1), np.nan)
    return {"dice": dice, "iou": iou, "mean_dice": mean(dice), "mean_iou": mean(iou)}


def write_per_image_csv(path: str, table: dict, class_names: list[str]) -> None:
  """One row per image: id, counted pixels, mean Dice/IoU over the classes present, then per
  class Dice, IoU and the three pixel counts (empty where undefined)."""
  scores = per_image_scores(table)
  header = ["image_id", "pixels", "mean_dice", "mean_iou"]
  for name in class_names:
    header += [f"dice/{name}", f"iou/{name}", *(f"{k}/{name}" for k in PER_IMAGE_COUNTS)]
  text = lambda v: "" if np.isnan(v) else repr(float(v))
  with open(path + ".partial", "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    for i, image_id in enumerate(table["id"]):
      row = [image_id, int(table["truth"][i].sum()), text(scores["mean_dice"][i]),
             text(scores["mean_iou"][i])]
      for c in range(len(class_names)):
        row += [text(scores["dice"][i, c]), text(scores["iou"][i, c]),
                *(int(table[k][i, c]) for k in PER_IMAGE_COUNTS)]
      writer.writerow(row)
  os.replace(path + ".partial", path)


class SemanticTask:
  """Loss, eval outputs, scores and pictures of the per-pixel models."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  # -------------------------------------------------------------- device (under jit)

  def loss(self, model, variables, batch, *, rng):
    """(total loss, {'loss_<term>': value}, new batch statistics) of one batch."""
    c = self.config
    weights = None if c.loss.class_weights is None else jnp.asarray(c.loss.class_weights,
                                                                      jnp.float32)
    logits, updates = model.apply(variables, batch["image"], train=True,
                                  mutable=["batch_stats"], rngs={"dropout": rng})
    total, parts = losses.segmentation_loss(
        logits, batch["mask"], terms=config_lib.loss_terms(c), class_weights=weights,
        ignore_label=c.dataset.ignore_label, dice_smooth=c.loss.dice_smooth,
        focal_gamma=c.loss.focal_gamma)
    return total, {f"loss_{k}": v for k, v in parts.items()}, updates.get("batch_stats", {})

  def eval_outputs(self, model, variables, batch):
    """The batch's confusion matrix (padding excluded), its predicted class ids and its
    per-image pixel counts (`per_image_counts`)."""
    logits = model.apply(variables, batch["image"], train=False)
    predictions = predict_classes(logits)
    d = self.config.dataset
    matrix = metrics.confusion_matrix(predictions, batch["mask"], num_classes=d.num_classes,
                                      ignore_label=d.ignore_label, valid=batch["valid"])
    counts = per_image_counts(predictions, batch["mask"], num_classes=d.num_classes,
                              ignore_label=d.ignore_label, valid=batch["valid"])
    return metrics.ConfusionMatrix(matrix=matrix), predictions, counts

  def eval_out_shardings(self, mesh):
    data = parallel.batch_sharding(mesh)
    return parallel.replicated(mesh), data, {key: data for key in PER_IMAGE_COUNTS}

  # -------------------------------------------------------------- host

  def evaluator(self, class_names: list[str], reference=None) -> "SemanticEvaluator":
    del reference  # semantic scores need only the eval batches
    return SemanticEvaluator(self.config.num_eval_visuals)

  def write_per_image(self, path: str, table: dict, class_names: list[str]) -> None:
    write_per_image_csv(path, table, class_names)

  def scalars(self, scores: dict, class_names: list[str]) -> dict[str, float]:
    """Flat scalar dict for the writers: means and per-class values."""
    out = {"eval/dice": scores["mean_dice"], "eval/jaccard": scores["mean_jaccard"],
           "eval/miou": scores["mean_jaccard"], "eval/pixel_accuracy": scores["pixel_accuracy"],
           "eval/dice_foreground": scores["mean_dice_foreground"],
           "eval/miou_foreground": scores["mean_jaccard_foreground"]}
    for c, name in enumerate(class_names):
      out[f"eval/dice/{name}"] = scores["dice"][c]
      out[f"eval/iou/{name}"] = scores["jaccard"][c]
    return {k: float(v) for k, v in out.items()}

  def headline(self, scores: dict) -> str:
    return (f"dice {scores['mean_dice']:.4f} | miou {scores['mean_jaccard']:.4f} | "
            f"pixel acc {scores['pixel_accuracy']:.4f}")

  def table(self, scores: dict, class_names: list[str]) -> str:
    lines = [f"{'class':<16}{'dice':>8}{'iou':>8}"]
    for c, name in enumerate(class_names):
      lines.append(f"{name:<16}{scores['dice'][c]:>8.4f}{scores['jaccard'][c]:>8.4f}")
    lines.append(f"{'mean':<16}{scores['mean_dice']:>8.4f}{scores['mean_jaccard']:>8.4f}")
    lines.append(f"pixel accuracy {scores['pixel_accuracy']:.4f}")
    return "\n".join(lines)

  def picture(self, visuals: dict, class_names: list[str]) -> np.ndarray:
    """image | truth | prediction rows of the first eval examples."""
    c = self.config
    keep = visuals["valid"]
    return visualize.panels(
        transforms.denormalize_image(visuals["image"][keep], c.model.input_normalization), visuals["mask"][keep],
        visuals["prediction"][keep], c.dataset.num_classes, ignore_label=c.dataset.ignore_label,
        scale=max(1, 256 // c.dataset.image_size), class_names=class_names)


class SemanticEvaluator:
  """Sums confusion matrices over a split, keeps this process's per-image counts and the first
  examples for the pictures."""

  def __init__(self, num_visuals: int):
    self.num_visuals = num_visuals
    self.total = None
    self.visuals = None
    self.per_image = {"id": [], **{k: [] for k in PER_IMAGE_COUNTS}}

  def add(self, host_batch: dict, device_batch: dict, outputs, *, ids=None) -> None:
    matrix, predictions, counts = outputs
    self.total = matrix if self.total is None else self.total.merge(matrix)
    if ids is not None:
      real = np.asarray(host_batch["valid"], bool)
      self.per_image["id"] += list(np.asarray(ids)[real])
      for key in PER_IMAGE_COUNTS:
        self.per_image[key].append(local_rows(counts[key])[real])
    if self.visuals is None and self.num_visuals:
      n = self.num_visuals
      self.visuals = {"image": host_batch["image"][:n], "mask": host_batch["mask"][:n],
                      "valid": host_batch["valid"][:n],
                      "prediction": local_rows(predictions)[:n]}

  def compute(self) -> dict:
    """Scores of the summed confusion matrix (`metrics.scores_from_confusion`); with ids given
    to `add`, also "per_image": {"id": [N], "intersection"/"truth"/"predicted": int64 [N, K]}."""
    scores = self.total.compute()
    if self.per_image["id"]:
      scores["per_image"] = {"id": list(self.per_image["id"]), **{
          k: np.concatenate(self.per_image[k]).astype(np.int64) for k in PER_IMAGE_COUNTS}}
    return scores
