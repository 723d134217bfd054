"""Semantic-segmentation metrics: confusion matrix -> dice, jaccard (IoU), accuracy.

Conventions (shared with `seg_jax.losses`):

- `predictions`: int class ids `[B, H, W]`; `labels`: int `[B, H, W]` in `[0, K)`
  or `ignore_label` (default 255); `valid`: optional bool `[B]`, False marks a
  padded example.
- A pixel counts iff its label is in `[0, K)`, differs from `ignore_label`, its
  prediction is in `[0, K)` and its example is valid. Out-of-range labels other
  than `ignore_label` are a data error that cannot raise inside `jit`; they are
  left out rather than wrapped into another class's cell.
- The confusion matrix is `[K, K]` int32 with rows = ground truth and columns =
  prediction: `cm[t, p]` counts pixels of true class t predicted as p.

Scores (`scores_from_confusion`, host side, float64) per class c, with
`TP = cm[c, c]`, `T = sum(cm[c, :])` (truth) and `P = sum(cm[:, c])` (prediction):

    dice_c    = 2 TP / (T + P)
    jaccard_c = TP / (T + P - TP)          (IoU; mean over classes = mIoU)
    pixel_accuracy = trace(cm) / sum(cm)

A class absent from both the ground truth and the predictions has denominator 0:
its per-class dice/jaccard is NaN and it is left out of the means (nanmean), the
usual mIoU convention (e.g. mmseg). A class that is predicted but absent from the
truth scores 0 and does count. A mean over no class at all is NaN.

Exactness: counts are summed over the whole dataset first (`ConfusionMatrix.merge`)
and scores are computed once from the total, never averaged over batches.
"""

import functools

import clu.metrics
import clu.values
import flax
import jax
import jax.numpy as jnp
import numpy as np

from seg_jax import losses


def confusion_matrix(predictions, labels, *, num_classes, ignore_label=255,
                     valid=None):
  """Counts (ground truth, prediction) pairs over all counted pixels.

  Pure jnp and shape-static, so it can run inside `jit` on a global array
  sharded over devices (the partitioner turns the scatter-add into per-device
  partial counts plus an all-reduce).

  Args:
    predictions: int `[B, H, W]` predicted class ids in `[0, num_classes)`.
    labels: int `[B, H, W]` in `[0, num_classes)` or `ignore_label`.
    num_classes: K (static Python int).
    ignore_label: label value that never counts.
    valid: optional bool `[B]`; all pixels of examples with False are excluded.

  Returns:
    int32 `[K, K]`, rows = ground truth, columns = prediction. Use it per batch
    (int32 holds up to 2**31 - 1 pixels); `ConfusionMatrix.merge` sums batches
    on host in int64.
  """
  predictions = jnp.asarray(predictions).astype(jnp.int32)
  labels = jnp.asarray(labels).astype(jnp.int32)
  if predictions.shape != labels.shape:
    raise ValueError(f'predictions {predictions.shape} and labels '
                     f'{labels.shape} must have the same shape [B,H,W]')
  k = int(num_classes)
  counted = (losses.counted_pixels(labels, k, ignore_label, valid)
             & (predictions >= 0) & (predictions < k))
  # A weighted bincount of the flat cell index. One-hot matmul
  # (one_hot(labels).T @ one_hot(pred)) was much slower on CPU and, in float32,
  # is only exact up to 2**24 pixels per cell. jit, [8,128,128], 10% ignored,
  # 2-core CPU, jax 0.10.2:
  #   K=2:   bincount+weights 0.62 ms, bincount dropping index K*K 0.52 ms,
  #          one-hot f32 matmul 1.27 ms, one-hot bf16 matmul 1.78 ms
  #   K=21:  0.35 / 0.50 / 8.5 / 11.4 ms
  #   K=150: 0.48 / 0.61 / 138 / 207 ms
  cell = jnp.where(counted, labels * k + predictions, 0)
  counts = jnp.bincount(cell.reshape(-1), counted.reshape(-1).astype(jnp.int32),
                        length=k * k)
  return counts.reshape(k, k).astype(jnp.int32)


def _nanmean(x):
  """Mean of the non-NaN entries; NaN (without a warning) if there are none."""
  x = x[~np.isnan(x)]
  return float(x.mean()) if x.size else float('nan')


def scores_from_confusion(cm):
  """Host-side scores from a `[K, K]` confusion matrix (rows = ground truth).

  Args:
    cm: integer `[K, K]` array (numpy or jax), e.g. `ConfusionMatrix.matrix`.

  Returns:
    dict with `dice`, `jaccard` (float64 `[K]`, NaN for classes absent from
    truth and prediction), `mean_dice`, `mean_jaccard` (mIoU),
    `mean_dice_foreground`, `mean_jaccard_foreground` (classes 1..K-1) and
    `pixel_accuracy` (Python floats; NaN when nothing counts). See the module
    docstring for the formulas and the NaN convention.
  """
  cm = np.asarray(cm).astype(np.int64)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
    raise ValueError(
        f'confusion matrix must be square [K, K], got shape {cm.shape}; a '
        f'leading device axis must be reduced first (Metric.reduce())')
  cm = cm.astype(np.float64)
  tp = np.diag(cm)
  truth = cm.sum(axis=1)
  predicted = cm.sum(axis=0)
  with np.errstate(divide='ignore', invalid='ignore'):
    dice = np.where(truth + predicted > 0, 2 * tp / (truth + predicted), np.nan)
    union = truth + predicted - tp
    jaccard = np.where(union > 0, tp / union, np.nan)
  total = cm.sum()
  return {
      'dice': dice,
      'jaccard': jaccard,
      'mean_dice': _nanmean(dice),
      'mean_jaccard': _nanmean(jaccard),
      'mean_dice_foreground': _nanmean(dice[1:]),
      'mean_jaccard_foreground': _nanmean(jaccard[1:]),
      'pixel_accuracy': float(tp.sum() / total) if total > 0 else float('nan'),
  }


def _is_tracer(x):
  return isinstance(x, jax.core.Tracer)


@flax.struct.dataclass
class ConfusionMatrix(clu.metrics.Metric):
  """Dataset-level confusion matrix as a `clu.metrics.Metric`.

  Standalone:

      cm = ConfusionMatrix.empty(num_classes)
      for batch in eval_batches:
        cm = cm.merge(eval_step(params, batch))  # eval_step returns
        # ConfusionMatrix.from_model_output(logits=..., labels=..., valid=...)
      scores = cm.compute()  # dict, see scores_from_confusion

  In a `clu.metrics.Collection`, whose `empty()` calls each metric's `empty()`
  without arguments, bind K first:

      @flax.struct.dataclass
      class EvalMetrics(clu.metrics.Collection):
        confusion: ConfusionMatrix.with_num_classes(21)
        loss: clu.metrics.Average.from_output('loss')

  `from_model_output` takes `valid` ([B]); for CLU's own metrics in the same
  Collection pass `mask=valid` too. A `mask` argument, if given, also restricts
  this metric (a [B] or [B,H,W] bool), so forgetting `valid` cannot count padding.

  Accumulate on host, outside `jit`: with concrete arrays `merge` adds in numpy
  int64, because jax arrays are int32 (x64 is off) and a dataset's count for a
  frequent class reaches 2**31 (Cityscapes train: 6.2e9 pixels, ~35% road). Inside
  `jit` (tracers, e.g. CLU's `reduce()` scan over devices) it adds with jnp.
  `compute()` returns `scores_from_confusion(matrix)`, a dict;
  `compute_value()` (used by `Collection.compute_values`) returns only the
  headline mIoU (`mean_jaccard`) as a `clu.values.Scalar`.
  """

  matrix: jax.Array  # [K, K]; rows = ground truth, columns = prediction.

  # Class attributes (no annotation, so not dataclass fields / pytree leaves).
  ignore_label = 255
  num_classes = None  # set by with_num_classes(), used by empty()

  @classmethod
  def with_num_classes(cls, num_classes, ignore_label=255):
    """Subclass with K (and ignore_label) bound, for use in a Collection."""
    return _bound_confusion_matrix(cls, int(num_classes), ignore_label)

  @classmethod
  def empty(cls, num_classes=None):
    """Zero counts `[K, K]`; K defaults to the class's bound `num_classes`."""
    num_classes = cls.num_classes if num_classes is None else num_classes
    if num_classes is None:
      raise ValueError(
          'ConfusionMatrix.empty() needs num_classes: call '
          'ConfusionMatrix.empty(num_classes) or use '
          'ConfusionMatrix.with_num_classes(K) (e.g. in a clu Collection)')
    return cls(matrix=np.zeros((num_classes, num_classes), np.int64))

  @classmethod
  def from_model_output(cls, *, logits, labels, valid=None, mask=None, **_):
    """Confusion matrix of one batch.

    Args:
      logits: float `[B, H, W, K]` -> prediction argmax; one logit `[B, H, W, 1]`
        or `[B, H, W]` -> prediction `logit > 0`, K = 2.
      labels: int `[B, H, W]` in `[0, K)` or `cls.ignore_label`.
      valid: optional bool `[B]`; False marks padded examples.
      mask: optional bool `[B]` or `[B, H, W]` (CLU's name), and-ed with valid.
      **_: other model outputs of a Collection, ignored.
    """
    labels = jnp.asarray(labels)
    logits = jnp.asarray(logits)
    if logits.ndim == labels.ndim + 1 and logits.shape[-1] > 1:
      num_classes = logits.shape[-1]
      predictions = jnp.argmax(logits, axis=-1)
    elif logits.shape in (labels.shape, labels.shape + (1,)):
      num_classes = 2
      predictions = (logits.reshape(labels.shape) > 0).astype(jnp.int32)
    else:
      raise ValueError(
          f'logits must be [B,H,W,K] (or [B,H,W,1] / [B,H,W] for one binary '
          f'logit) matching labels [B,H,W]; got logits {logits.shape} and '
          f'labels {labels.shape}')
    if cls.num_classes is not None and cls.num_classes != num_classes:
      raise ValueError(f'{cls.__name__} is bound to num_classes='
                       f'{cls.num_classes} but logits {logits.shape} give '
                       f'{num_classes} classes')
    if mask is not None:
      mask = jnp.asarray(mask, bool)
      if mask.shape == labels.shape[:1]:
        mask = mask.reshape(mask.shape + (1,) * (labels.ndim - 1))
      elif mask.shape != labels.shape:
        raise ValueError(f'mask must be [B] or [B,H,W] for labels '
                         f'{labels.shape}, got {mask.shape}')
      # Masked-out pixels take the ignore label, which never counts.
      labels = jnp.where(mask, labels, cls.ignore_label)
    matrix = confusion_matrix(predictions, labels, num_classes=num_classes,
                              ignore_label=cls.ignore_label, valid=valid)
    return cls(matrix=matrix)

  def merge(self, other):
    """Adds counts: jnp inside jit, numpy int64 on host (see class docstring)."""
    if np.shape(self.matrix) != np.shape(other.matrix):
      raise ValueError(f'cannot merge confusion matrices of shapes '
                       f'{np.shape(self.matrix)} and {np.shape(other.matrix)}')
    if _is_tracer(self.matrix) or _is_tracer(other.matrix):
      return type(self)(matrix=self.matrix + other.matrix)
    return type(self)(matrix=np.asarray(self.matrix).astype(np.int64)
                      + np.asarray(other.matrix).astype(np.int64))

  def compute(self):
    """Scores dict from the accumulated matrix (`scores_from_confusion`)."""
    return scores_from_confusion(self.matrix)

  def compute_value(self):
    return clu.values.Scalar(self.compute()['mean_jaccard'])


@functools.cache
def _bound_confusion_matrix(base, num_classes, ignore_label):
  # Cached so the same K gives the same class: a new class per call would be a
  # new pytree type (jit retraces) and break Collection field equality.
  name = f'{base.__name__}{num_classes}'
  attrs = {'num_classes': num_classes, 'ignore_label': ignore_label,
           '__qualname__': name, '__module__': base.__module__}
  return flax.struct.dataclass(type(name, (base,), attrs))
