"""Tests for the procedural scene generator and the `seg_shapes` TFDS builder.

Every check recomputes the expected value independently in numpy (from pixels,
np.nonzero, explicit seed sequences) rather than asking the code under test.
"""

import os

# Offline and CPU only: no GCE metadata probe, no GPUs for TensorFlow.
os.environ.setdefault('NO_GCE_CHECK', 'true')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np
import pytest
import tensorflow_datasets as tfds

from seg_jax.data.builders import shapes

S = 48  # Small scenes keep the whole module well under the time budget.


def _scene(seed, size=S, **kwargs):
  return shapes.generate_scene(np.random.default_rng(seed), size, **kwargs)


def _unique_colours(pixels):
  """Distinct rows of a [P, 3] uint8 array."""
  return np.unique(pixels.reshape(-1, 3), axis=0)


def _tight_box(instance_mask):
  """(y0, x0, y1, x1), y1/x1 exclusive, from np.nonzero."""
  ys, xs = np.nonzero(instance_mask)
  return np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1], np.float32)


def test_same_seed_is_byte_identical_and_different_seed_differs():
  a, b = _scene(7), _scene(7)
  assert a.keys() == b.keys()
  for key in a:
    assert a[key].dtype == b[key].dtype, key
    assert a[key].tobytes() == b[key].tobytes(), key
  c = _scene(8)
  assert not np.array_equal(a['image'], c['image'])


def test_output_shapes_and_dtypes():
  scene = _scene(3)
  n = len(scene['labels'])
  assert n >= 1
  assert scene['image'].shape == (S, S, 3) and scene['image'].dtype == np.uint8
  assert scene['mask'].shape == (S, S) and scene['mask'].dtype == np.uint8
  assert scene['instance_masks'].shape == (n, S, S)
  assert scene['instance_masks'].dtype == np.uint8
  assert scene['boxes'].shape == (n, 4)
  assert scene['boxes'].dtype == np.float32
  assert scene['labels'].dtype == np.int64


@pytest.mark.parametrize('seed', range(8))
def test_clean_mode_masks_are_exactly_the_painted_pixels(seed):
  scene = _scene(seed, clean=True)
  image, mask = scene['image'], scene['mask']
  # The unlabelled pixels share one colour: the flat background.
  bg = _unique_colours(image[mask == 0])
  assert len(bg) == 1
  differs_from_bg = np.any(image != bg[0], axis=-1)
  np.testing.assert_array_equal(differs_from_bg, mask > 0)
  colours = []
  for inst in scene['instance_masks']:
    colour = _unique_colours(image[inst == 1])
    assert len(colour) == 1  # Flat fill.
    colours.append(tuple(colour[0]))
    np.testing.assert_array_equal(np.all(image == colour[0], axis=-1), inst == 1)
  assert len(set(colours)) == len(colours)
  assert tuple(bg[0]) not in colours


@pytest.mark.parametrize('seed', range(8))
def test_normal_mode_masks_boxes_and_labels_are_consistent(seed):
  scene = _scene(seed)
  inst, labels = scene['instance_masks'], scene['labels']
  assert set(np.unique(inst)) <= {0, 1}
  assert np.all(inst.sum(axis=(1, 2)) >= 6)  # Non-empty (>= half of 12 px).
  assert inst.sum(axis=0).max() <= 1  # Pairwise disjoint.
  assert np.all((labels >= 1) & (labels <= 5))
  composed = np.zeros((S, S), np.int64)
  for m, label in zip(inst, labels):
    composed[m == 1] = label
  np.testing.assert_array_equal(scene['mask'], composed)
  expected_boxes = np.stack([_tight_box(m) for m in inst])
  np.testing.assert_array_equal(scene['boxes'], expected_boxes)
  # Layout does not depend on `clean`, and clean masks were verified against
  # the pixels above: so these masks are the painted pixels too.
  clean = _scene(seed, clean=True)
  np.testing.assert_array_equal(inst, clean['instance_masks'])
  np.testing.assert_array_equal(labels, clean['labels'])


def test_image_is_not_separable_by_an_intensity_threshold():
  grays, fgs, images, per_scene = [], [], [], []

  def best_threshold_iou(gray, fg):
    best = 0.0
    for t in range(0, 256, 4):
      for pred in (gray > t, gray <= t):
        best = max(best, (pred & fg).sum() / (pred | fg).sum())
    return best

  for seed in range(20):
    scene = _scene(100 + seed)
    grays.append(scene['image'].astype(np.float64).mean(-1))
    fgs.append(scene['mask'] > 0)
    per_scene.append(best_threshold_iou(grays[-1], fgs[-1]))
    images.append(scene['image'])
  images, fg = np.stack(images), np.stack(fgs)
  # Over the batch, per channel, the central 90% intensity ranges of
  # background and object pixels overlap for most of their length.
  for ch in range(3):
    lo_b, hi_b = np.percentile(images[..., ch][~fg], [5, 95])
    lo_o, hi_o = np.percentile(images[..., ch][fg], [5, 95])
    overlap = min(hi_b, hi_o) - max(lo_b, lo_o)
    assert overlap > 0.7 * min(hi_b - lo_b, hi_o - lo_o), (ch, lo_b, hi_b,
                                                          lo_o, hi_o)
  # One global grey threshold is little better than "everything is object".
  assert best_threshold_iou(np.stack(grays), np.stack(fgs)) < 0.45
  assert np.mean(per_scene) < 0.75


def test_every_class_appears_and_colour_does_not_give_the_class():
  colours = {c: [] for c in range(1, shapes.NUM_CLASSES)}
  for seed in range(60):
    scene = _scene(1000 + seed, size=32)
    for m, label in zip(scene['instance_masks'], scene['labels']):
      colours[int(label)].append(scene['image'][m == 1].mean(axis=0))
  assert all(len(v) >= 10 for v in colours.values()), {
      c: len(v) for c, v in colours.items()
  }
  grand_mean = np.concatenate([np.stack(v) for v in colours.values()]).mean(0)
  for c, v in colours.items():
    assert np.abs(np.mean(v, axis=0) - grand_mean).max() < 40, c


def test_invalid_arguments_raise():
  with pytest.raises(ValueError, match='min_objects'):
    _scene(0, min_objects=4, max_objects=2)
  with pytest.raises(ValueError, match='image_size'):
    _scene(0, size=8)


def test_config_name_encodes_every_field():
  fields = dict(image_size=32, num_train=3, num_validation=2, num_test=1,
                seed=4, min_objects=1, max_objects=3)
  names = {shapes.ShapesConfig(**fields).name}
  for key, value in fields.items():
    names.add(shapes.ShapesConfig(**{**fields, key: value + 10}).name)
  assert len(names) == 1 + len(fields)


def test_tfds_round_trip_and_cache(tmp_path, monkeypatch):
  kwargs = dict(image_size=32, num_train=12, num_validation=3, num_test=2,
                seed=5)
  builder = shapes.shapes_builder(data_dir=tmp_path, **kwargs)
  assert not builder.is_prepared()
  shapes.prepare(builder)
  assert builder.is_prepared()
  assert builder.info.splits['train'].num_examples == 12
  assert builder.info.splits['validation'].num_examples == 3

  for split, split_index, count in (('train', 0, 12), ('validation', 1, 3)):
    examples = list(tfds.as_numpy(builder.as_dataset(split=split)))
    assert len(examples) == count
    ids = sorted(ex['id'].decode() for ex in examples)
    assert ids == [f'{split}_{i:06d}' for i in range(count)]
    for ex in examples:
      i = int(ex['id'].decode().rsplit('_', 1)[1])
      # Example i of split k is seeded with the sequence [seed, k, i].
      want = shapes.generate_scene(
          np.random.default_rng([5, split_index, i]), 32
      )
      np.testing.assert_array_equal(ex['image'], want['image'])
      np.testing.assert_array_equal(ex['mask'][..., 0], want['mask'])
      objects = ex['objects']
      np.testing.assert_array_equal(objects['mask'][..., 0],
                                    want['instance_masks'])
      np.testing.assert_array_equal(objects['box'], want['boxes'])
      np.testing.assert_array_equal(objects['label'], want['labels'])

  # Same arguments: found on disk, and preparing again generates nothing.
  files_before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob('*.tfrecord*')}
  again = shapes.shapes_builder(data_dir=tmp_path, **kwargs)
  assert again.is_prepared()

  def no_generation(*args, **kwargs):
    raise AssertionError('cached dataset was regenerated')

  monkeypatch.setattr(shapes.SegShapes, '_generate_examples', no_generation)
  shapes.prepare(again)
  assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob('*.tfrecord*')} == (
      files_before
  )
  assert len(list(tfds.as_numpy(again.as_dataset(split='test')))) == 2
  monkeypatch.undo()

  # A different image size is a different configuration and directory.
  other = shapes.shapes_builder(data_dir=tmp_path, **{**kwargs,
                                                      'image_size': 40})
  assert other.data_dir != builder.data_dir
  assert not other.is_prepared()
  config_dirs = sorted(p.name for p in (tmp_path / 'seg_shapes').iterdir()
                       if not p.name.startswith('.'))
  assert config_dirs == [builder.builder_config.name]


def test_default_configuration_builds_with_the_registered_config(tmp_path):
  # The defaults name the config in BUILDER_CONFIGS; TFDS rejects a second
  # object with that name, so this must not raise. Nothing is generated.
  builder = shapes.shapes_builder(data_dir=tmp_path)
  assert builder.builder_config is shapes.SegShapes.BUILDER_CONFIGS[0]
  assert builder.info.features['image'].shape == (64, 64, 3)
  assert not builder.is_prepared()
