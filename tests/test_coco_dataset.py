"""COCO instances from TFDS coco/2017_panoptic, offline: the decoder on hand-made panoptic
segments, the pipeline under tfds.testing.mock_data, and configs/mask_rcnn_coco.py."""

import contextlib
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from seg_jax import config as config_lib
from seg_jax.data import coco
from seg_jax.data import pipeline
from tests.conftest import tiny_detector_config
from tests.test_instance_task import _check_instance_batch

# (segment id, label, is_crowd, rectangle y0, x0, y1, x1). Labels < 80 are things.
SEGMENTS = [(300, 0, False, (2, 3, 20, 30)),          # thing: class 1 (id uses R and G)
            (70000 + 5, 79, False, (30, 10, 50, 40)),  # thing: class 80 (id uses B too)
            (12, 100, False, (0, 40, 64, 64)),          # stuff: background
            (999, 3, True, (52, 2, 62, 12))]           # crowd: not an instance


def _segment_ids(height, width, shift):
  ids = np.zeros((height, width), np.int64)
  for sid, _, _, (y0, x0, y1, x1) in SEGMENTS:   # painted in order: later ones on top
    ids[y0 + shift:y1 + shift, x0:x1] = sid
  return ids


def _panoptic_example(height, width, shift, name):
  ids = _segment_ids(height, width, shift)
  rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
  rng = np.random.default_rng(shift)
  n = len(SEGMENTS)
  return {
      "image": rng.integers(0, 256, (height, width, 3)).astype(np.uint8),
      "image/filename": name.encode(), "image/id": np.int64(shift),
      "panoptic_image": rgb, "panoptic_image/filename": name.encode(),
      "panoptic_objects": {
          "id": np.array([s[0] for s in SEGMENTS], np.int64),
          "area": np.zeros(n, np.int64), "bbox": np.zeros((n, 4), np.float32),
          "label": np.array([s[1] for s in SEGMENTS], np.int64),
          "is_crowd": np.array([s[2] for s in SEGMENTS], bool)}}


def _expected(height, width, shift):
  """The two thing instances' masks (pixels of their segment id) and classes, by hand."""
  ids = _segment_ids(height, width, shift)
  masks = np.stack([ids == SEGMENTS[0][0], ids == SEGMENTS[1][0]]).astype(np.uint8)
  return masks, np.array([1, 80])


def test_decoder_keeps_things_and_drops_stuff_and_crowds():
  example = tf.nest.map_structure(tf.constant, _panoptic_example(64, 72, 0, "a.jpg"))
  out = coco.decode(example, max_instances=4)
  want_masks, want_classes = _expected(64, 72, 0)
  assert int(out["num_instances"]) == 2
  np.testing.assert_array_equal(out["classes"].numpy(), [1, 80, 0, 0])
  np.testing.assert_array_equal(out["instance_masks"].numpy()[:2], want_masks)
  assert not out["instance_masks"].numpy()[2:].any()
  semantic = (want_masks * want_classes[:, None, None]).max(axis=0)
  np.testing.assert_array_equal(out["mask"].numpy(), semantic)


SIZES = [(64, 80), (80, 64), (64, 64)]   # shorter side 64 = dataset.resize: no resampling


@contextlib.contextmanager
def _mocked_coco():
  examples = [_panoptic_example(h, w, shift=i, name=f"{i}.jpg")
              for i, (h, w) in enumerate(SIZES * 2)]

  def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    # As TFDS declares them: image sizes and object counts vary, channels and box sides do not.
    spec = tf.nest.map_structure(lambda x: tf.TensorSpec(
        (None,) * (np.ndim(x) - 1) + np.shape(x)[-1:] if np.ndim(x) >= 2 else (None,) * np.ndim(x),
        tf.as_dtype(np.asarray(x).dtype)), examples[0])
    return tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=spec)

  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_dataset_fn=as_dataset), \
      mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True):
    yield examples


def _coco_config(data_dir):
  c = config_lib.with_dataset(tiny_detector_config(data_dir), "coco")
  c.dataset.num_classes = 81
  c.dataset.resize = 64
  c.dataset.image_size = 64
  c.dataset.eval_size = (96, 96)
  c.dataset.cache = False
  c.dataset.shuffle_buffer = 4
  c.batch_size = 4
  config_lib.validate(c)
  return c


def test_coco_batches_under_mock_data(data_dir):
  with _mocked_coco():
    config = _coco_config(data_dir)
    builder, names = pipeline.prepare_dataset(config)
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=s, shard_lengths=[6], num_bytes=0, filename_template=None)
        for s in ("train", "validation")]))
    assert len(names) == 81 and names[0] == "background"
    train = next(pipeline.train_batches(config, builder))
    assert train["image"].shape == (4, 64, 64, 3)
    _check_instance_batch(train, config.dataset.max_instances)
    batches = list(pipeline.eval_batches(config, builder, "validation"))
    assert sum(b["valid"].sum() for b in batches) == 6
    found = 0
    for b in batches:
      assert b["image"].shape == (4, 96, 96, 3)
      _check_instance_batch(b, config.dataset.max_instances)
      for i in np.nonzero(b["valid"])[0]:
        (h, w), shift = SIZES[found % 3], found % 6   # eval order is the stored order
        masks, classes = _expected(h, w, shift)
        np.testing.assert_array_equal(b["instance_masks"][i, :2, :h, :w], masks)
        assert not b["instance_masks"][i, :, h:].any() and not b["instance_masks"][i, :, :, w:].any()
        np.testing.assert_array_equal(b["classes"][i, :3], [1, 80, 0])
        found += 1
    assert found == 6


def test_coco_config_validates_and_coco_needs_a_detector():
  from configs import mask_rcnn_coco
  config = mask_rcnn_coco.get_config()
  config_lib.validate(config)
  assert config_lib.task(config) == "instance"
  config = config_lib.with_model(config, "unet")
  with pytest.raises(config_lib.ConfigError, match="for the detectors"):
    config_lib.validate(config)


def test_unprepared_coco_says_how_to_get_it(data_dir, tmp_path):
  config = _coco_config(data_dir)
  config.dataset.data_dir = str(tmp_path)
  with pytest.raises(pipeline.DataError, match="download=True"):
    pipeline.prepare_dataset(config)
