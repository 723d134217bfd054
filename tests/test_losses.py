"""Tests for seg_jax.losses against independent numpy/scipy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from seg_jax import losses

IGNORE = 255


def jitted(fn, *args, **kwargs):
  """fn(*args, **kwargs) under jit: one compile instead of one per eager op."""
  return jax.jit(lambda *a: fn(*a, **kwargs))(*args)


def _random_batch(seed, shape=(3, 5, 6), num_classes=4, ignore_frac=0.2,
                  scale=3.0):
  rng = np.random.default_rng(seed)
  logits = (scale * rng.normal(size=shape + (num_classes,))).astype(np.float32)
  labels = rng.integers(0, num_classes, size=shape).astype(np.int32)
  labels[rng.random(shape) < ignore_frac] = IGNORE
  return logits, labels


def _counted(labels, valid, num_classes):
  """Reference pixel mask, written with an explicit per-example loop."""
  counted = (labels != IGNORE) & (labels >= 0) & (labels < num_classes)
  if valid is not None:
    for b, v in enumerate(valid):
      if not v:
        counted[b] = False
  return counted


def ref_ce(logits, labels, class_weights=None, valid=None):
  """PyTorch CrossEntropyLoss(weight, ignore_index) semantics, pixel by pixel."""
  num_classes = logits.shape[-1]
  logp = special.log_softmax(logits.astype(np.float64), axis=-1)
  counted = _counted(labels, valid, num_classes)
  num = den = 0.0
  for idx in np.ndindex(labels.shape):
    if counted[idx]:
      y = labels[idx]
      w = 1.0 if class_weights is None else class_weights[y]
      num += -w * logp[idx + (y,)]
      den += w
  return num / den if den > 0 else 0.0


def ref_bce(x, labels, valid=None, pos_weight=1.0):
  x = x.astype(np.float64)
  counted = _counted(labels, valid, 2)
  log_sig = -np.logaddexp(0.0, -x)       # log sigmoid(x)
  log_one_minus = -np.logaddexp(0.0, x)  # log (1 - sigmoid(x))
  total, count = 0.0, 0
  for idx in np.ndindex(labels.shape):
    if counted[idx]:
      y = labels[idx]
      total += -(pos_weight * y * log_sig[idx] + (1 - y) * log_one_minus[idx])
      count += 1
  return total / count if count else 0.0


def ref_dice_loss(probs, truth_classes, counted, smooth):
  """probs [..., C]; truth_classes [...] int; dice over classes present."""
  dices = []
  for c in range(probs.shape[-1]):
    p = np.where(counted, probs[..., c], 0.0)
    g = np.where(counted, truth_classes == c, False).astype(np.float64)
    if g.sum() == 0:
      continue
    dices.append((2 * (p * g).sum() + smooth) / (p.sum() + g.sum() + smooth))
  return 1.0 - np.mean(dices) if dices else 0.0


def ref_focal(logits, labels, gamma, alpha=None, valid=None):
  num_classes = logits.shape[-1]
  probs = special.softmax(logits.astype(np.float64), axis=-1)
  counted = _counted(labels, valid, num_classes)
  total, count = 0.0, 0
  for idx in np.ndindex(labels.shape):
    if counted[idx]:
      y = labels[idx]
      pt = probs[idx + (y,)]
      a = 1.0 if alpha is None else alpha[y]
      total += -a * (1 - pt) ** gamma * np.log(pt)
      count += 1
  return total / count if count else 0.0


# --- cross-entropy ---------------------------------------------------------


def test_ce_class_weights_and_ignore():
  logits, labels = _random_batch(0)
  weights = np.array([0.5, 2.0, 1.0, 3.0], np.float32)
  got = jitted(losses.softmax_cross_entropy, logits, labels, class_weights=weights)
  np.testing.assert_allclose(got, ref_ce(logits, labels, weights), rtol=1e-5)
  # Weighted and unweighted really differ on this batch.
  assert abs(ref_ce(logits, labels, weights) - ref_ce(logits, labels)) > 1e-2
  got = losses.softmax_cross_entropy(logits, labels)  # eager works too
  np.testing.assert_allclose(got, ref_ce(logits, labels), rtol=1e-5)


def test_ce_all_ignored_is_zero_with_zero_grad():
  logits, _ = _random_batch(1)
  labels = np.full(logits.shape[:-1], IGNORE, np.int32)
  loss, grad = jax.jit(jax.value_and_grad(losses.softmax_cross_entropy))(
      jnp.asarray(logits), labels)
  assert float(loss) == 0.0
  assert np.all(np.asarray(grad) == 0.0)


def test_ce_valid_drops_examples():
  logits, labels = _random_batch(2)
  valid = np.array([True, False, True])
  got = jitted(losses.softmax_cross_entropy, logits, labels, valid=valid)
  np.testing.assert_allclose(got, ref_ce(logits[[0, 2]], labels[[0, 2]]),
                             rtol=1e-5)
  # Whatever the padded example holds does not matter.
  logits2, labels2 = logits.copy(), labels.copy()
  logits2[1] = 100.0 * np.random.default_rng(9).normal(size=logits[1].shape)
  labels2[1] = 3
  got2 = jitted(losses.softmax_cross_entropy, logits2, labels2, valid=valid)
  np.testing.assert_allclose(got2, got, rtol=1e-6)
  all_padding = jitted(losses.softmax_cross_entropy, logits, labels,
                                             valid=np.zeros(3, bool))
  assert float(all_padding) == 0.0


def test_ce_jit_and_bfloat16_logits():
  logits, labels = _random_batch(3)
  weights = np.array([1.0, 2.0, 1.0, 0.5], np.float32)
  fn = jax.jit(lambda lg, lb, v: losses.softmax_cross_entropy(
      lg, lb, class_weights=weights, valid=v))
  valid = np.array([True, True, False])
  got = fn(logits, labels, valid)
  want = ref_ce(logits, labels, weights, valid)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  got_bf16 = fn(jnp.asarray(logits, jnp.bfloat16), labels, valid)
  assert got_bf16.dtype == jnp.float32
  np.testing.assert_allclose(got_bf16, want, rtol=2e-2)


def test_ce_on_single_logit_equals_bce():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 4, 5, 1)).astype(np.float32) * 2
  labels = rng.integers(0, 2, size=(2, 4, 5)).astype(np.int32)
  labels[0, 0, :3] = IGNORE
  got = jitted(losses.softmax_cross_entropy, x, labels)
  np.testing.assert_allclose(got, ref_bce(x[..., 0], labels), rtol=1e-5)


def test_ce_rejects_bad_weight_shape():
  logits, labels = _random_batch(5)
  with pytest.raises(ValueError, match='class_weights'):
    jitted(losses.softmax_cross_entropy, logits, labels, class_weights=np.ones(3))


# --- binary cross-entropy --------------------------------------------------


@pytest.mark.parametrize('channel_axis', [True, False])
def test_bce_with_ignore_valid_and_pos_weight(channel_axis):
  rng = np.random.default_rng(6)
  x = (3 * rng.normal(size=(3, 4, 5))).astype(np.float32)
  labels = rng.integers(0, 2, size=(3, 4, 5)).astype(np.int32)
  labels[rng.random(labels.shape) < 0.25] = IGNORE
  valid = np.array([True, False, True])
  logits = x[..., None] if channel_axis else x
  got = jitted(losses.sigmoid_binary_cross_entropy, logits, labels, valid=valid)
  np.testing.assert_allclose(got, ref_bce(x, labels, valid), rtol=1e-5)
  got = jitted(losses.sigmoid_binary_cross_entropy, logits, labels, pos_weight=3.0)
  np.testing.assert_allclose(got, ref_bce(x, labels, pos_weight=3.0),
                             rtol=1e-5)
  all_ignored = np.full_like(labels, IGNORE)
  assert float(jitted(losses.sigmoid_binary_cross_entropy, logits, all_ignored)) == 0.0


def test_bce_rejects_multiclass_logits():
  logits, labels = _random_batch(7)
  with pytest.raises(ValueError, match='one logit'):
    jitted(losses.sigmoid_binary_cross_entropy, logits, labels)


# --- soft dice -------------------------------------------------------------


@pytest.mark.parametrize('smooth', [0.0, 1.0])
def test_dice_multiclass(smooth):
  logits, labels = _random_batch(8, num_classes=5)
  labels[labels == 4] = 0  # class 4 absent from the truth
  labels[1][labels[1] == 3] = 0
  labels[0, 0, 0] = 3       # class 3 only in example 0 ...
  valid = np.array([False, True, True])  # ... which is padding: absent too.
  got = jitted(losses.soft_dice_loss, logits, labels, smooth=smooth, valid=valid)
  probs = special.softmax(logits.astype(np.float64), axis=-1)
  counted = _counted(labels, valid, 5)
  want = ref_dice_loss(probs, labels, counted, smooth)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Absent classes are really left out: averaging over all 5 classes differs.
  all_classes = []
  for c in range(5):
    p = np.where(counted, probs[..., c], 0)
    g = np.where(counted, labels == c, False)
    all_classes.append((2 * (p * g).sum() + smooth) / (p.sum() + g.sum() + smooth))
  assert abs((1 - np.mean(all_classes)) - want) > 1e-3


def test_dice_binary_hand_worked_and_smoothing():
  # Predictions ~[1, 0, 1, 0] vs truth [1, 1, 0, 0], one ignored pixel that
  # would otherwise be a true positive: intersection 1, sum(p) 2, sum(g) 2.
  x = np.array([[[30.0, -30.0, 30.0, -30.0, 30.0]]], np.float32)
  labels = np.array([[[1, 1, 0, 0, IGNORE]]], np.int32)
  np.testing.assert_allclose(
      jitted(losses.soft_dice_loss, x, labels, smooth=0.0), 1 - 2 / 4, atol=1e-6)
  np.testing.assert_allclose(
      jitted(losses.soft_dice_loss, x[..., None], labels, smooth=1.0),
      1 - 3 / 5, atol=1e-6)
  # No foreground in the counted truth: the foreground class is absent -> 0.
  no_fg = np.array([[[0, 0, 0, 0, IGNORE]]], np.int32)
  assert float(jitted(losses.soft_dice_loss, x, no_fg)) == 0.0


def test_dice_binary_random_vs_reference():
  rng = np.random.default_rng(10)
  x = (2 * rng.normal(size=(2, 6, 7, 1))).astype(np.float32)
  labels = rng.integers(0, 2, size=(2, 6, 7)).astype(np.int32)
  labels[rng.random(labels.shape) < 0.2] = IGNORE
  p = special.expit(x[..., 0].astype(np.float64))
  counted = _counted(labels, None, 2)
  # Foreground only: a one-class problem whose "class 0" is the foreground.
  want = ref_dice_loss(p[..., None], np.where(labels == 1, 0, -1), counted, 1.0)
  got = jitted(losses.soft_dice_loss, x, labels, smooth=1.0)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_dice_nothing_counts_is_zero():
  logits, labels = _random_batch(11)
  assert float(jitted(losses.soft_dice_loss, logits, np.full_like(labels, IGNORE))) == 0
  assert float(jitted(losses.soft_dice_loss, logits, labels,
                                     valid=np.zeros(3, bool))) == 0


# --- focal -----------------------------------------------------------------


def test_focal_gamma_zero_equals_ce():
  logits, labels = _random_batch(12)
  got = jitted(losses.focal_loss, logits, labels, gamma=0.0)
  np.testing.assert_allclose(got, ref_ce(logits, labels), rtol=1e-5)


def test_focal_gamma_and_alpha_vs_reference():
  logits, labels = _random_batch(13)
  alpha = np.array([0.25, 1.0, 2.0, 0.5])
  valid = np.array([True, True, False])
  got = jitted(losses.focal_loss, logits, labels, gamma=2.0, alpha=alpha, valid=valid)
  want = ref_focal(logits, labels, 2.0, alpha, valid)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert want < ref_ce(logits, labels, alpha, valid)  # focusing shrinks it


# --- gradients -------------------------------------------------------------


@pytest.mark.parametrize('name,kwargs,binary', [
    ('ce', dict(class_weights=np.array([1.0, 2.0, 0.5, 1.0])), False),
    ('bce', {}, True),
    ('dice', {}, False),
    ('dice', {}, True),
    ('focal', dict(gamma=2.0), False),
    ('focal', dict(gamma=0.5), False),
])
def test_gradients_finite_with_ignore_and_padding(name, kwargs, binary):
  fn = {'ce': losses.softmax_cross_entropy,
        'bce': losses.sigmoid_binary_cross_entropy,
        'dice': losses.soft_dice_loss, 'focal': losses.focal_loss}[name]
  logits, labels = _random_batch(14, num_classes=1 if binary else 4)
  if binary:
    labels = np.where(labels == IGNORE, IGNORE, labels % 2).astype(np.int32)
    labels[0, 0, :2] = [0, 1]
  # Saturated logits: p_t == 1 exactly for some pixels (focal's 0**gamma).
  logits[0, 1] = np.where(np.arange(logits.shape[-1]) == 0, 200.0, -200.0)
  labels[0, 1] = 0
  valid = np.array([True, True, False])
  grad = jax.jit(jax.grad(lambda lg: fn(lg, labels, valid=valid, **kwargs)))(
      jnp.asarray(logits))
  grad = np.asarray(grad)
  assert np.all(np.isfinite(grad))
  assert np.any(grad != 0)
  # Ignored pixels and padded examples get exactly zero gradient.
  assert np.all(grad[labels == IGNORE] == 0)
  assert np.all(grad[2] == 0)
  # And nothing NaN when no pixel counts at all.
  ignored = np.full_like(labels, IGNORE)
  grad = jax.jit(jax.grad(lambda lg: fn(lg, ignored, **kwargs)))(
      jnp.asarray(logits))
  assert np.all(np.asarray(grad) == 0)


# --- combined --------------------------------------------------------------


def test_segmentation_loss_weighted_sum():
  logits, labels = _random_batch(15)
  weights = np.array([1.0, 2.0, 0.5, 1.0])
  valid = np.array([True, False, True])
  total, values = jitted(losses.segmentation_loss, 
      logits, labels, terms={'ce': 1.0, 'dice': 0.5, 'focal': 2.0},
      class_weights=weights, valid=valid, dice_smooth=0.0, focal_gamma=1.0)
  ce = ref_ce(logits, labels, weights, valid)
  probs = special.softmax(logits.astype(np.float64), axis=-1)
  dice = ref_dice_loss(probs, labels, _counted(labels, valid, 4), 0.0)
  focal = ref_focal(logits, labels, 1.0, weights, valid)
  assert set(values) == {'ce', 'dice', 'focal'}
  np.testing.assert_allclose(values['ce'], ce, rtol=1e-5)
  np.testing.assert_allclose(values['dice'], dice, rtol=1e-5)
  np.testing.assert_allclose(values['focal'], focal, rtol=1e-5)
  np.testing.assert_allclose(total, ce + 0.5 * dice + 2.0 * focal, rtol=1e-5)


def test_segmentation_loss_binary_jit():
  rng = np.random.default_rng(16)
  x = rng.normal(size=(2, 4, 4, 1)).astype(np.float32)
  labels = rng.integers(0, 2, size=(2, 4, 4)).astype(np.int32)
  fn = jax.jit(lambda lg, lb: losses.segmentation_loss(
      lg, lb, terms={'bce': 1.0, 'dice': 1.0}))
  total, values = fn(x, labels)
  p = special.expit(x[..., 0].astype(np.float64))
  dice = ref_dice_loss(p[..., None], np.where(labels == 1, 0, -1),
                       _counted(labels, None, 2), 1.0)
  np.testing.assert_allclose(total, ref_bce(x[..., 0], labels) + dice,
                             rtol=1e-5)


def test_unknown_terms_raise_with_allowed_names():
  logits, labels = _random_batch(17)
  with pytest.raises(ValueError, match=r"'lovasz'.*'ce', 'bce', 'dice', 'focal'"):
    jitted(losses.segmentation_loss, logits, labels, terms={'ce': 1.0, 'lovasz': 1.0})
  with pytest.raises(ValueError, match='at least one'):
    jitted(losses.segmentation_loss, logits, labels, terms={})


def test_parse_loss_name():
  assert losses.parse_loss_name('ce+dice') == ('ce', 'dice')
  assert losses.parse_loss_name(' focal ') == ('focal',)
  with pytest.raises(ValueError, match="'dise'.*allowed"):
    losses.parse_loss_name('ce+dise')
  with pytest.raises(ValueError, match='empty'):
    losses.parse_loss_name('ce+')
  with pytest.raises(ValueError, match='repeated'):
    losses.parse_loss_name('ce+ce')


def test_cross_entropy_on_unet_sized_input_matches_scipy():
  """The one-hot class gather agrees with an indexed gather on a larger, ragged input."""
  rng = np.random.default_rng(11)
  logits = rng.normal(size=(3, 17, 13, 7)).astype(np.float32)
  labels = rng.integers(0, 7, size=(3, 17, 13))
  labels[0, :4] = 255
  logp = special.log_softmax(logits.astype(np.float64), axis=-1)
  counted = labels != 255
  picked = np.take_along_axis(logp, np.where(counted, labels, 0)[..., None], -1)[..., 0]
  expected = -picked[counted].mean()
  got = jax.jit(lambda l, y: losses.softmax_cross_entropy(l, y))(logits, labels)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
