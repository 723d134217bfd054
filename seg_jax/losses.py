"""Semantic-segmentation losses: cross-entropy, binary cross-entropy, soft dice, focal.

Conventions (shared with `seg_jax.metrics`):

- `logits`: float `[B, H, W, K]` for K classes. Binary tasks may instead give a
  single logit per pixel, `[B, H, W, 1]` or `[B, H, W]`.
- `labels`: int `[B, H, W]` with values in `[0, K)` (binary: `{0, 1}`), or
  `ignore_label` (default 255).
- `valid`: optional bool `[B]`; False marks a padded example.

A pixel *counts* iff its label is in `[0, K)`, differs from `ignore_label` and its
example is valid. Pixels that do not count contribute nothing to any loss (nor to
its normaliser) and get zero gradient. Labels outside `[0, K)` other than
`ignore_label` are a data error; they cannot raise inside `jit`, so they are
treated like ignored pixels (never wrapped or clipped into a real class).

Every loss returns a float32 scalar, is pure `jnp` (jit-able, shape-static,
differentiable) and returns 0.0 -- never NaN -- when no pixel counts, e.g. for a
batch made only of padding. Logits are cast to float32 first, so bfloat16 models
get a float32 loss.

Single-logit (binary) inputs: `sigmoid_binary_cross_entropy` and the binary mode of
`soft_dice_loss` use them directly. `softmax_cross_entropy` and `focal_loss` treat
a single logit `x` as the two-class logits `[0, x]`, whose softmax is exactly
`[1 - sigmoid(x), sigmoid(x)]`; so 'ce' on one logit equals 'bce', and the class
ids (0 = background, 1 = foreground) match `metrics.ConfusionMatrix` (`x > 0`).
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp

# Loss terms `segmentation_loss` knows, by the name used in configs.
LOSS_TERMS = ('ce', 'bce', 'dice', 'focal')


def counted_pixels(labels, num_classes, ignore_label, valid):
  """Bool mask, labels' shape: pixels that count in losses and metrics.

  A pixel counts when its label is in [0, num_classes), is not `ignore_label`,
  and its example is valid (`valid` bool [B], or None for all).
  """
  counted = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
  if valid is not None:
    valid = jnp.asarray(valid, bool)
    if valid.shape != labels.shape[:1]:
      raise ValueError(
          f'valid must have shape [B]={labels.shape[:1]}, got {valid.shape}')
    counted = counted & valid.reshape(valid.shape + (1,) * (labels.ndim - 1))
  return counted


def _check_logits(logits, labels):
  """Returns float32 logits with a trailing class axis, checking the shapes."""
  logits = jnp.asarray(logits, jnp.float32)
  if logits.ndim == labels.ndim:  # binary, one logit without a channel axis
    logits = logits[..., None]
  if logits.ndim != labels.ndim + 1 or logits.shape[:-1] != labels.shape:
    raise ValueError(
        f'logits must be [B,H,W,K] (or [B,H,W] for one binary logit) matching '
        f'labels [B,H,W]; got logits {logits.shape} and labels {labels.shape}')
  return logits


def _as_multiclass(logits):
  """[..., 1] logit x -> [..., 2] logits [0, x] (softmax = 1-sigmoid, sigmoid)."""
  if logits.shape[-1] == 1:
    return jnp.concatenate([jnp.zeros_like(logits), logits], axis=-1)
  return logits


def _safe_divide(num, den):
  """num / den, and 0 where den == 0, with finite gradients in both branches."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1), 0.0)


def _label_log_probabilities(logits, labels, ignore_label, valid):
  """(log softmax probability of each pixel's label, counted pixels, labels, K) of softmax
  logits (a single logit read as [0, x]): the shared start of cross-entropy and focal loss."""
  labels = jnp.asarray(labels)
  logits = _as_multiclass(_check_logits(logits, labels))
  num_classes = logits.shape[-1]
  counted = counted_pixels(labels, num_classes, ignore_label, valid)
  log_pt = _gather_class(jax.nn.log_softmax(logits, axis=-1), labels)
  return log_pt, counted, labels, num_classes


def _per_pixel(class_values, labels, num_classes, name):
  """A per-class float [K] (class weights, alpha) looked up at each pixel's label."""
  class_values = jnp.asarray(class_values, jnp.float32)
  if class_values.shape != (num_classes,):
    raise ValueError(f'{name} must have shape [K]=({num_classes},), got {class_values.shape}')
  return class_values[jnp.clip(labels, 0, num_classes - 1)]


def _gather_class(values, labels):
  """values[..., labels]: [B,H,W,K] x int [B,H,W] -> [B,H,W] (labels clipped)."""
  k = values.shape[-1]
  safe = jnp.clip(labels, 0, k - 1)  # ignore_label=255 must not index out of range
  # A one-hot select fuses into one elementwise pass; take_along_axis lowers to a
  # gather with full-size index grids that cost XLA:CPU ~30 ms per U-Net step.
  onehot = safe[..., None] == jnp.arange(k, dtype=safe.dtype)
  return jnp.sum(jnp.where(onehot, values, 0), axis=-1)


def softmax_cross_entropy(logits, labels, *, class_weights=None,
                          ignore_label=255, valid=None):
  """Class-weighted softmax cross-entropy, averaged over counted pixels.

  Follows PyTorch's `CrossEntropyLoss(weight=w, ignore_index=ignore_label)`:
  `sum_i w[y_i] * ce_i / sum_i w[y_i]` over counted pixels i, so the weights
  rebalance classes without changing the loss scale.

  Args:
    logits: float `[B, H, W, K]`; a single logit `[B, H, W, 1]` or `[B, H, W]` is
      read as the two-class logits `[0, x]` (then this equals binary CE).
    labels: int `[B, H, W]` in `[0, K)` or `ignore_label`.
    class_weights: optional float `[K]` per-class weights.
    ignore_label: label value that never counts.
    valid: optional bool `[B]`; examples with False never count.

  Returns:
    float32 scalar; 0.0 when no pixel counts.
  """
  log_pt, counted, labels, num_classes = _label_log_probabilities(
      logits, labels, ignore_label, valid)
  ce = -log_pt
  weight = counted.astype(jnp.float32)
  if class_weights is not None:
    weight = weight * _per_pixel(class_weights, labels, num_classes, 'class_weights')
  # where() rather than ce * weight: keeps a NaN/inf ce of a non-counted pixel out.
  return _safe_divide(jnp.sum(jnp.where(counted, ce * weight, 0.0)),
                      jnp.sum(weight))


def sigmoid_binary_cross_entropy(logits, labels, *, ignore_label=255,
                                 valid=None, pos_weight=None):
  """Binary cross-entropy on one logit per pixel, averaged over counted pixels.

  Per pixel `-(pos_weight * y * log sigmoid(x) + (1 - y) * log(1 - sigmoid(x)))`
  (PyTorch's `BCEWithLogitsLoss(pos_weight=...)`), computed with stable
  log-sigmoids; the mean divides by the number of counted pixels.

  Args:
    logits: float `[B, H, W, 1]` or `[B, H, W]`, one logit for the foreground.
    labels: int `[B, H, W]` in `{0, 1}` or `ignore_label`.
    ignore_label: label value that never counts.
    valid: optional bool `[B]`; examples with False never count.
    pos_weight: optional scalar weight of the positive (label 1) term.

  Returns:
    float32 scalar; 0.0 when no pixel counts.
  """
  labels = jnp.asarray(labels)
  logits = _check_logits(logits, labels)
  if logits.shape[-1] != 1:
    raise ValueError(
        f'sigmoid_binary_cross_entropy needs one logit per pixel ([B,H,W,1] or '
        f'[B,H,W]); got logits {logits.shape} with K={logits.shape[-1]} classes '
        f"-- use softmax_cross_entropy ('ce') for K > 1")
  x = logits[..., 0]
  counted = counted_pixels(labels, 2, ignore_label, valid)
  y = (labels == 1).astype(jnp.float32)
  pos = 1.0 if pos_weight is None else jnp.asarray(pos_weight, jnp.float32)
  bce = -(pos * y * jax.nn.log_sigmoid(x) + (1.0 - y) * jax.nn.log_sigmoid(-x))
  return _safe_divide(jnp.sum(jnp.where(counted, bce, 0.0)),
                      jnp.sum(counted.astype(jnp.float32)))


def soft_dice_loss(logits, labels, *, smooth=1.0, ignore_label=255, valid=None):
  """Soft dice loss over the whole batch ("batch dice").

  Multi-class (K > 1 channels): p = softmax probabilities, g = one-hot labels.
  Binary (one logit): p = sigmoid, g = (label == 1), and only the foreground's
  dice is used. For each class c, over all counted pixels of the batch,

      dice_c = (2 * sum(p_c * g_c) + smooth) / (sum(p_c) + sum(g_c) + smooth)

  and the loss is `1 - mean(dice_c)` over the classes present in the batch's
  counted ground truth (`sum(g_c) > 0`): a class absent from the batch neither
  helps nor hurts, so in binary mode a batch without foreground gives 0 (pair
  dice with 'ce'/'bce' to penalise false positives there). Ignored and padded
  pixels add nothing to p or g.

  Args:
    logits: float `[B, H, W, K]`, or `[B, H, W, 1]` / `[B, H, W]` for binary.
    labels: int `[B, H, W]` in `[0, K)` (binary: `{0, 1}`) or `ignore_label`.
    smooth: additive smoothing in numerator and denominator.
    ignore_label: label value that never counts.
    valid: optional bool `[B]`; examples with False never count.

  Returns:
    float32 scalar in [0, 1]; 0.0 when no pixel counts.
  """
  labels = jnp.asarray(labels)
  logits = _check_logits(logits, labels)
  if logits.shape[-1] == 1:  # binary: foreground dice only
    counted = counted_pixels(labels, 2, ignore_label, valid)[..., None]
    probs = jax.nn.sigmoid(logits)
    truth = (labels == 1)[..., None].astype(jnp.float32)
  else:
    num_classes = logits.shape[-1]
    counted = counted_pixels(labels, num_classes, ignore_label, valid)[..., None]
    probs = jax.nn.softmax(logits, axis=-1)
    truth = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  probs = jnp.where(counted, probs, 0.0)
  truth = jnp.where(counted, truth, 0.0)
  axes = tuple(range(labels.ndim))  # everything but the class axis
  intersection = jnp.sum(probs * truth, axis=axes)
  prob_sum = jnp.sum(probs, axis=axes)
  truth_sum = jnp.sum(truth, axis=axes)
  dice = (2.0 * intersection + smooth) / (prob_sum + truth_sum + smooth)
  present = (truth_sum > 0).astype(jnp.float32)
  num_present = jnp.sum(present)
  return _safe_divide(num_present - jnp.sum(dice * present), num_present)


def focal_loss(logits, labels, *, gamma=2.0, alpha=None, ignore_label=255,
               valid=None):
  """Softmax focal loss (Lin et al. 2017), averaged over counted pixels.

  Per pixel `-alpha[y] * (1 - p_t)^gamma * log p_t` with `p_t` the softmax
  probability of the true class; `gamma=0` and no alpha gives cross-entropy.
  Unlike `softmax_cross_entropy`, the mean divides by the number of counted
  pixels, not by the sum of alphas (as in the paper).

  Args:
    logits: float `[B, H, W, K]`; a single logit is read as `[0, x]` (sigmoid
      focal loss, class 1 = foreground).
    labels: int `[B, H, W]` in `[0, K)` or `ignore_label`.
    gamma: focusing parameter >= 0, a Python float (static).
    alpha: optional float `[K]` per-class weights.
    ignore_label: label value that never counts.
    valid: optional bool `[B]`; examples with False never count.

  Returns:
    float32 scalar; 0.0 when no pixel counts.
  """
  log_pt, counted, labels, num_classes = _label_log_probabilities(
      logits, labels, ignore_label, valid)
  loss = -log_pt
  if gamma != 0:
    # 1 - p_t via expm1 is accurate when p_t is close to 1. The floor keeps the
    # gradient of x**gamma finite at x = 0 when gamma < 1 (otherwise inf * 0 =
    # NaN flows back even through the where() that drops non-counted pixels).
    one_minus_pt = jnp.maximum(-jnp.expm1(log_pt), 1e-12)
    loss = one_minus_pt ** gamma * loss
  if alpha is not None:
    loss = loss * _per_pixel(alpha, labels, num_classes, 'alpha')
  return _safe_divide(jnp.sum(jnp.where(counted, loss, 0.0)),
                      jnp.sum(counted.astype(jnp.float32)))


def _check_term_names(names, where):
  unknown = [n for n in names if n not in LOSS_TERMS]
  if unknown:
    raise ValueError(
        f'unknown loss term {unknown[0]!r} in {where}; allowed terms: '
        f'{", ".join(repr(t) for t in LOSS_TERMS)}')


def parse_loss_name(name):
  """'ce+dice' -> ('ce', 'dice'); raises ValueError on unknown or repeated terms."""
  parts = tuple(part.strip() for part in name.split('+'))
  if not all(parts):
    raise ValueError(f'empty loss term in loss name {name!r}; expected names '
                     f'like "ce" or "ce+dice" from {LOSS_TERMS}')
  _check_term_names(parts, f'loss name {name!r}')
  if len(set(parts)) != len(parts):
    raise ValueError(f'repeated loss term in loss name {name!r}')
  return parts


def segmentation_loss(logits, labels, *, terms: Mapping[str, float],
                      class_weights=None, ignore_label=255, valid=None,
                      dice_smooth=1.0, focal_gamma=2.0):
  """Weighted sum of loss terms, e.g. `terms={'ce': 1.0, 'dice': 0.5}`.

  Terms: 'ce' (`softmax_cross_entropy`, uses `class_weights`), 'bce'
  (`sigmoid_binary_cross_entropy`, needs one logit), 'dice' (`soft_dice_loss`
  with `smooth=dice_smooth`), 'focal' (`focal_loss` with `gamma=focal_gamma` and
  `alpha=class_weights`). `class_weights` does not affect 'bce' or 'dice'.

  Args:
    logits: float `[B, H, W, K]`, or `[B, H, W, 1]` / `[B, H, W]` for binary.
    labels: int `[B, H, W]` in `[0, K)` or `ignore_label`.
    terms: term name -> weight; names must be in `LOSS_TERMS`.
    class_weights: optional float `[K]`, see above.
    ignore_label: label value that never counts.
    valid: optional bool `[B]`; examples with False never count.
    dice_smooth: smoothing of the 'dice' term.
    focal_gamma: focusing parameter of the 'focal' term.

  Returns:
    `(total, values)`: `total = sum_name weight * values[name]` (float32 scalar)
    and `values` maps each term name to its unweighted value (for logging).
  """
  if not terms:
    raise ValueError(f'terms must name at least one loss term from {LOSS_TERMS}')
  _check_term_names(list(terms), f'terms {dict(terms)}')
  common = dict(ignore_label=ignore_label, valid=valid)
  compute = {
      'ce': lambda: softmax_cross_entropy(
          logits, labels, class_weights=class_weights, **common),
      'bce': lambda: sigmoid_binary_cross_entropy(logits, labels, **common),
      'dice': lambda: soft_dice_loss(logits, labels, smooth=dice_smooth, **common),
      'focal': lambda: focal_loss(
          logits, labels, gamma=focal_gamma, alpha=class_weights, **common),
  }
  values = {name: compute[name]() for name in terms}
  total = sum(weight * values[name] for name, weight in terms.items())
  return jnp.asarray(total, jnp.float32), values
