"""Semantic segmentation: per-pixel logits, pixel losses, a confusion matrix per split."""

from __future__ import annotations

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
    """The batch's confusion matrix (padding excluded) and its predicted class ids."""
    logits = model.apply(variables, batch["image"], train=False)
    predictions = predict_classes(logits)
    matrix = metrics.confusion_matrix(predictions, batch["mask"],
                                      num_classes=self.config.dataset.num_classes,
                                      ignore_label=self.config.dataset.ignore_label,
                                      valid=batch["valid"])
    return metrics.ConfusionMatrix(matrix=matrix), predictions

  def eval_out_shardings(self, mesh):
    return parallel.replicated(mesh), parallel.batch_sharding(mesh)

  # -------------------------------------------------------------- host

  def evaluator(self, class_names: list[str], reference=None) -> "SemanticEvaluator":
    del reference  # semantic scores need only the eval batches
    return SemanticEvaluator(self.config.num_eval_visuals)

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
        transforms.denormalize_image(visuals["image"][keep]), visuals["mask"][keep],
        visuals["prediction"][keep], c.dataset.num_classes, ignore_label=c.dataset.ignore_label,
        scale=max(1, 256 // c.dataset.image_size), class_names=class_names)


class SemanticEvaluator:
  """Sums confusion matrices over a split; keeps the first examples for the pictures."""

  def __init__(self, num_visuals: int):
    self.num_visuals = num_visuals
    self.total = None
    self.visuals = None

  def add(self, host_batch: dict, device_batch: dict, outputs) -> None:
    matrix, predictions = outputs
    self.total = matrix if self.total is None else self.total.merge(matrix)
    if self.visuals is None and self.num_visuals:
      n = self.num_visuals
      self.visuals = {"image": host_batch["image"][:n], "mask": host_batch["mask"][:n],
                      "valid": host_batch["valid"][:n],
                      "prediction": local_rows(predictions)[:n]}

  def compute(self) -> dict:
    return self.total.compute()
