"""Tests for seg_jax.metrics against independent numpy references."""

import os
import subprocess
import sys
import textwrap
import warnings

import clu.metrics
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seg_jax import metrics

IGNORE = 255
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def jitted(fn, *args, **kwargs):
  """fn(*args, **kwargs) under jit: one compile instead of one per eager op."""
  return jax.jit(lambda *a: fn(*a, **kwargs))(*args)


def cm_from_output(**outputs):
  """ConfusionMatrix.from_model_output under jit (array outputs only)."""
  return jax.jit(lambda o: metrics.ConfusionMatrix.from_model_output(**o))(
      outputs)


def ref_confusion(predictions, labels, num_classes, valid=None):
  """np.add.at over counted pixels; rows = truth, columns = prediction."""
  keep = labels != IGNORE
  if valid is not None:
    keep &= np.asarray(valid)[:, None, None]
  cm = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(cm, (labels[keep], predictions[keep]), 1)
  return cm


def ref_mean_jaccard(cm):
  """mIoU over classes with a non-empty union, with a plain Python loop."""
  ious = []
  for c in range(cm.shape[0]):
    tp = cm[c, c]
    union = cm[c, :].sum() + cm[:, c].sum() - tp
    if union > 0:
      ious.append(tp / union)
  return np.mean(ious)


def _random(seed, shape, num_classes, ignore_frac=0.15):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, size=shape).astype(np.int32)
  labels[rng.random(shape) < ignore_frac] = IGNORE
  logits = rng.normal(size=shape + (num_classes,)).astype(np.float32)
  return logits, labels


# --- confusion_matrix ------------------------------------------------------


@pytest.mark.parametrize('num_classes', [3, 150])
def test_confusion_matrix_random_with_ignore_and_padding(num_classes):
  rng = np.random.default_rng(num_classes)
  shape = (4, 9, 11)
  labels = rng.integers(0, num_classes, size=shape).astype(np.int32)
  labels[rng.random(shape) < 0.2] = IGNORE
  predictions = rng.integers(0, num_classes, size=shape).astype(np.int32)
  valid = np.array([True, False, True, True])
  fn = jax.jit(lambda p, l, v: metrics.confusion_matrix(
      p, l, num_classes=num_classes, valid=v))
  got = np.asarray(fn(predictions, labels, valid))
  assert got.dtype == np.int32 and got.shape == (num_classes, num_classes)
  want = ref_confusion(predictions, labels, num_classes, valid)
  np.testing.assert_array_equal(got, want)
  # Padding really was dropped (example 1 had counted pixels).
  assert want.sum() < ref_confusion(predictions, labels, num_classes).sum()
  np.testing.assert_array_equal(
      metrics.confusion_matrix(predictions, labels, num_classes=num_classes),
      ref_confusion(predictions, labels, num_classes))


def test_confusion_matrix_orientation():
  # One pixel of true class 2 predicted as 0 -> cm[2, 0].
  got = jitted(metrics.confusion_matrix, np.array([[[0]]]), np.array([[[2]]]),
               num_classes=3)
  want = np.zeros((3, 3), np.int32)
  want[2, 0] = 1
  np.testing.assert_array_equal(got, want)


_SHARDED_SCRIPT = textwrap.dedent("""
    import numpy as np, jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from seg_jax import metrics
    assert jax.device_count() == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ('data',))
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, (8, 16, 16)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.2] = 255
    preds = rng.integers(0, 7, (8, 16, 16)).astype(np.int32)
    valid = np.arange(8) < 6
    put = lambda x: jax.device_put(
        x, NamedSharding(mesh, P('data', *([None] * (x.ndim - 1)))))
    fn = jax.jit(lambda p, l, v: metrics.confusion_matrix(
        p, l, num_classes=7, valid=v))
    got = np.asarray(fn(put(preds), put(labels), put(valid)))
    keep = (labels != 255) & valid[:, None, None]
    want = np.zeros((7, 7), np.int64)
    np.add.at(want, (labels[keep], preds[keep]), 1)
    np.testing.assert_array_equal(got, want)
    print('SHARDED_OK')
""")


def test_confusion_matrix_sharded_over_devices():
  env = dict(os.environ,
             XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu',
             PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  result = subprocess.run([sys.executable, '-c', _SHARDED_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=120)
  assert 'SHARDED_OK' in result.stdout, result.stderr[-3000:]


# --- scores_from_confusion -------------------------------------------------


def test_scores_hand_worked_3x3():
  cm = np.array([[3, 1, 0],
                 [1, 4, 1],
                 [0, 2, 6]])
  # truth (row sums) T = [4, 6, 8]; predicted (column sums) P = [4, 7, 7];
  # TP = [3, 4, 6]; total = 18.
  dice = [2 * 3 / (4 + 4), 2 * 4 / (6 + 7), 2 * 6 / (8 + 7)]  # .75 .615 .8
  jaccard = [3 / 5, 4 / 9, 6 / 9]                            # TP/(T+P-TP)
  s = metrics.scores_from_confusion(cm)
  assert s['dice'].dtype == np.float64
  np.testing.assert_allclose(s['dice'], dice)
  np.testing.assert_allclose(s['jaccard'], jaccard)
  np.testing.assert_allclose(s['mean_dice'], (0.75 + 8 / 13 + 0.8) / 3)
  np.testing.assert_allclose(s['mean_jaccard'], (3 / 5 + 4 / 9 + 6 / 9) / 3)
  np.testing.assert_allclose(s['mean_dice_foreground'], (8 / 13 + 0.8) / 2)
  np.testing.assert_allclose(s['mean_jaccard_foreground'], (4 / 9 + 6 / 9) / 2)
  np.testing.assert_allclose(s['pixel_accuracy'], 13 / 18)


def test_scores_absent_classes_are_nan_and_excluded():
  # Class 2 absent from truth and prediction; class 3 predicted, never true.
  cm = np.array([[2, 1, 0, 1],
                 [0, 3, 0, 0],
                 [0, 0, 0, 0],
                 [0, 0, 0, 0]])
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # no "mean of empty slice" etc.
    s = metrics.scores_from_confusion(cm)
  assert np.isnan(s['dice'][2]) and np.isnan(s['jaccard'][2])
  assert s['dice'][3] == 0.0 and s['jaccard'][3] == 0.0
  np.testing.assert_allclose(s['dice'][[0, 1]], [4 / 6, 6 / 7])
  np.testing.assert_allclose(s['mean_dice'], (4 / 6 + 6 / 7 + 0) / 3)
  np.testing.assert_allclose(s['mean_jaccard'], (2 / 4 + 3 / 4 + 0) / 3)
  np.testing.assert_allclose(s['mean_jaccard_foreground'], (3 / 4 + 0) / 2)
  np.testing.assert_allclose(s['pixel_accuracy'], 5 / 7)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    empty = metrics.scores_from_confusion(np.zeros((3, 3), np.int32))
  assert np.all(np.isnan(empty['dice']))
  assert np.isnan(empty['mean_jaccard']) and np.isnan(empty['pixel_accuracy'])


def test_scores_exact_beyond_int32():
  big = 3_000_000_000  # > 2**31
  s = metrics.scores_from_confusion(np.array([[big, 1], [1, big]], np.int64))
  np.testing.assert_allclose(s['pixel_accuracy'], 2 * big / (2 * big + 2))
  with pytest.raises(ValueError, match='square'):
    metrics.scores_from_confusion(np.zeros((2, 3, 3)))


# --- ConfusionMatrix -------------------------------------------------------


@jax.jit
def _eval_step(logits, labels, valid):
  return metrics.ConfusionMatrix.from_model_output(
      logits=logits, labels=labels, valid=valid)


def test_merge_over_uneven_padded_batches_equals_whole_dataset():
  num_classes = 4
  logits, labels = _random(0, (10, 6, 7), num_classes)
  predictions = logits.argmax(-1)
  want = ref_confusion(predictions, labels, num_classes)
  # Batches of 4, 3 and 3 real examples; the last one padded to 4 with junk
  # (real-looking labels) that must not count.
  cm = metrics.ConfusionMatrix.empty(num_classes)
  for start, size, padded in [(0, 4, 4), (4, 3, 3), (7, 3, 4)]:
    lg, lb = logits[start:start + size], labels[start:start + size]
    if padded > size:
      junk_logits, junk_labels = _random(1, (padded - size, 6, 7), num_classes)
      lg = np.concatenate([lg, junk_logits])
      lb = np.concatenate([lb, junk_labels])
    valid = np.arange(padded) < size
    cm = cm.merge(_eval_step(lg, lb, valid))
  assert isinstance(cm.matrix, np.ndarray) and cm.matrix.dtype == np.int64
  np.testing.assert_array_equal(cm.matrix, want)
  np.testing.assert_allclose(cm.compute()['mean_jaccard'],
                             ref_mean_jaccard(want))


def test_dataset_level_dice_differs_from_mean_of_batch_dice():
  # Batch A: 4 foreground pixels, all right: dice = [nan, 1] -> mean 1.
  # Batch B: truth [0,0,0,1], prediction [0,0,1,0]: cm [[2,1],[1,0]]
  #   -> dice = [4/6, 0] -> mean 1/3. Average of batch means: 2/3.
  # Whole dataset: cm [[2,1],[1,4]] -> dice = [4/6, 8/10] -> mean 11/15.
  def binary_logits(pred):
    return np.where(np.array(pred, np.float32) > 0, 5.0, -5.0)[None, None, :]

  a = cm_from_output(
      logits=binary_logits([1, 1, 1, 1]), labels=np.array([[[1, 1, 1, 1]]]))
  b = cm_from_output(
      logits=binary_logits([0, 0, 1, 0]), labels=np.array([[[0, 0, 0, 1]]]))
  np.testing.assert_array_equal(b.matrix, [[2, 1], [1, 0]])
  per_batch = (a.compute()['mean_dice'] + b.compute()['mean_dice']) / 2
  np.testing.assert_allclose(per_batch, 2 / 3)
  np.testing.assert_allclose(a.merge(b).compute()['mean_dice'], 11 / 15)


def test_merge_on_host_does_not_overflow_int32():
  big = np.array([[2_000_000_000, 0], [0, 1]], np.int32)
  total = metrics.ConfusionMatrix(matrix=jnp.asarray(big)).merge(
      metrics.ConfusionMatrix(matrix=jnp.asarray(big)))
  assert total.matrix[0, 0] == 4_000_000_000


def test_merge_and_reduce_inside_jit():
  _, labels = _random(2, (2, 3, 3), 3)
  preds = np.zeros_like(labels)
  one = metrics.ConfusionMatrix(
      matrix=jitted(metrics.confusion_matrix, preds, labels, num_classes=3))
  merged = jax.jit(lambda x, y: x.merge(y))(one, one)
  assert isinstance(merged.matrix, jax.Array)
  np.testing.assert_array_equal(merged.matrix,
                                2 * ref_confusion(preds, labels, 3))
  # CLU's reduce() over a leading (device) axis scans merge() on tracers.
  stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), one, one, one)
  np.testing.assert_array_equal(stacked.reduce().matrix,
                                3 * ref_confusion(preds, labels, 3))


def test_binary_single_logit_predictions():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 5, 5, 1)).astype(np.float32)
  labels = rng.integers(0, 2, size=(2, 5, 5)).astype(np.int32)
  labels[0, 0] = IGNORE
  want = ref_confusion((x[..., 0] > 0).astype(np.int32), labels, 2)
  for logits in (x, x[..., 0]):
    got = cm_from_output(logits=logits, labels=labels)
    np.testing.assert_array_equal(got.matrix, want)


def test_in_clu_collection():
  num_classes = 3

  @flax.struct.dataclass
  class EvalMetrics(clu.metrics.Collection):
    confusion: metrics.ConfusionMatrix.with_num_classes(num_classes)
    loss: clu.metrics.Average.from_output('loss')

  @jax.jit
  def step(logits, labels, valid):
    return EvalMetrics.single_from_model_output(
        logits=logits, labels=labels, valid=valid, mask=valid,
        loss=jnp.ones(labels.shape[0]))

  logits, labels = _random(4, (6, 4, 5), num_classes)
  valid = np.array([True, True, True, True, False, False])
  ms = EvalMetrics.empty()
  for sl in (slice(0, 3), slice(3, 6)):
    ms = ms.merge(step(logits[sl], labels[sl], valid[sl]))
  want = ref_confusion(logits.argmax(-1), labels, num_classes, valid)
  np.testing.assert_array_equal(ms.confusion.matrix, want)
  out = ms.compute()
  np.testing.assert_allclose(out['confusion']['mean_jaccard'],
                             ref_mean_jaccard(want))
  np.testing.assert_allclose(out['loss'], 1.0)
  values = ms.compute_values()
  np.testing.assert_allclose(values['confusion'].value, ref_mean_jaccard(want))


def test_clu_mask_alone_also_drops_padding():
  logits, labels = _random(5, (3, 4, 4), 3)
  mask = np.array([True, False, True])
  got = cm_from_output(logits=logits, labels=labels, mask=mask)
  np.testing.assert_array_equal(
      got.matrix, ref_confusion(logits.argmax(-1), labels, 3, mask))


def test_empty_and_bound_classes():
  with pytest.raises(ValueError, match='num_classes'):
    metrics.ConfusionMatrix.empty()
  bound = metrics.ConfusionMatrix.with_num_classes(5)
  assert bound is metrics.ConfusionMatrix.with_num_classes(5)
  assert bound.empty().matrix.shape == (5, 5)
  assert not np.any(bound.empty().matrix)
  logits, labels = _random(6, (1, 2, 2), 4)
  with pytest.raises(ValueError, match='num_classes=5'):
    bound.from_model_output(logits=logits, labels=labels)
  with pytest.raises(ValueError, match='merge'):
    metrics.ConfusionMatrix.empty(3).merge(metrics.ConfusionMatrix.empty(4))
