"""Input pipeline: eval visits every example once, training stream is deterministic, augmentation is joint."""

import hashlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from seg_jax.data import pipeline
from seg_jax.data import transforms


@pytest.fixture(scope="module")
def builder(data_dir):
  from tests.conftest import tiny_config
  return pipeline.get_builder(tiny_config(data_dir))


def _digest(image):
  return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def test_eval_visits_every_example_exactly_once(config, builder):
  batches = list(pipeline.eval_batches(config, builder, "validation"))
  assert len(batches) == 2  # 12 examples, batch 8: one full batch and one padded
  valid = np.concatenate([b["valid"] for b in batches])
  assert valid.sum() == 12 and not valid[12:].any()
  images = np.concatenate([b["image"] for b in batches])
  masks = np.concatenate([b["mask"] for b in batches])
  assert (masks[~valid] == config.dataset.ignore_label).all()
  # Independent read of the split with TFDS, normalised by hand.
  expected = [(ex["image"].astype(np.float32) / 255.0 * 2.0 - 1.0, ex["mask"][..., 0])
              for ex in tfds.as_numpy(builder.as_dataset(split="validation"))]
  assert sorted(_digest(i) for i in images[valid]) == sorted(_digest(i) for i, _ in expected)
  by_image = {_digest(i): m for i, m in expected}
  for image, mask in zip(images[valid], masks[valid]):
    np.testing.assert_array_equal(mask, by_image[_digest(image)])


def test_train_stream_is_a_function_of_seed_and_step(config, builder):
  first = pipeline.train_batches(config, builder)
  batches = [next(first) for _ in range(3)]
  again = pipeline.train_batches(config, builder)
  np.testing.assert_array_equal(next(again)["image"], batches[0]["image"])
  resumed = next(pipeline.train_batches(config, builder, start_step=2))
  np.testing.assert_array_equal(resumed["image"], batches[2]["image"])
  np.testing.assert_array_equal(resumed["mask"], batches[2]["mask"])
  config.seed = 1
  other = next(pipeline.train_batches(config, builder))
  assert not np.array_equal(other["image"], batches[0]["image"])
  b = batches[0]
  assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.float32
  assert b["mask"].shape == (8, 32, 32) and b["mask"].dtype == np.int32
  assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
  labels = np.unique(np.concatenate([x["mask"].ravel() for x in batches]))
  assert set(labels.tolist()) <= set(range(6)) | {255}


def _label_image(size=32):
  """A mask and an image whose red channel encodes the mask (class * 40)."""
  rng = np.random.default_rng(0)
  mask = np.zeros((size, size), np.int32)
  for c in range(1, 5):
    y, x = rng.integers(0, size - 10, 2)
    mask[y:y + 10, x:x + 10] = c
  image = np.zeros((size, size, 3), np.uint8)
  image[..., 0] = mask * 40
  return tf.constant(image), tf.constant(mask)


def _aug_config(hflip=True, vflip=True, lo=1.0, hi=1.0):
  from seg_jax import config as config_lib
  aug = config_lib.base_config().dataset.augment
  aug.brightness = aug.contrast = aug.saturation = aug.hue = 0.0
  aug.min_scale, aug.max_scale = lo, hi
  aug.hflip, aug.vflip = hflip, vflip
  return aug


def _decode(out_image, out_mask):
  decoded = np.round((out_image.numpy()[..., 0] + 1.0) * 127.5 / 40).astype(np.int32)
  return decoded, out_mask.numpy()


def _augment(image, mask, seed, **scale):
  aug = _aug_config(lo=scale.get("lo", 1.0), hi=scale.get("hi", 1.0))
  return _decode(*transforms.train_augment(image, mask, tf.constant([seed, 7], tf.int64),
                                           aug=aug, size=32, ignore_label=255))


FLIP_SEEDS = 400  # flips per draw ~ Binomial(400, 1/2): mean 200, sd 10


def _flip_counts(hflip, vflip):
  """Augments one asymmetric example under FLIP_SEEDS per-example seeds (as the pipeline makes
  them: [stream seed, index]) at scale 1 (the crop is then the whole image), checks every
  output is the input in one of its four orientations with image and mask moved together,
  and returns {(h_flipped, v_flipped): count}."""
  image, mask = _label_image()
  m = mask.numpy()
  orientations = {(False, False): m, (True, False): m[:, ::-1], (False, True): m[::-1],
                  (True, True): m[::-1, ::-1]}
  # The example tells its orientations apart (else a flip could go unseen).
  assert len({o.tobytes() for o in orientations.values()}) == 4
  aug = _aug_config(hflip=hflip, vflip=vflip)
  augment = tf.function(lambda seed: transforms.train_augment(image, mask, seed, aug=aug, size=32,
                                                              ignore_label=255))
  counts = {k: 0 for k in orientations}
  for index in range(FLIP_SEEDS):
    decoded, out_mask = _decode(*augment(tf.constant([12345, index], tf.int64)))
    np.testing.assert_array_equal(decoded, out_mask)  # the image moved with the mask
    found = [k for k, o in orientations.items() if np.array_equal(out_mask, o)]
    assert len(found) == 1, f"seed index {index}: output is no flip of the input"
    counts[found[0]] += 1
  return counts


def test_flips_move_image_and_mask_together():
  """Each flip happens about half the time, independently of the other, and moves image and
  mask alike. Bounds are 6 standard deviations: an augmenter that flips never, always, or
  both axes at once (one draw) fails; a correct one passes but with probability ~1e-8."""
  counts = _flip_counts(True, True)
  h = counts[True, False] + counts[True, True]
  v = counts[False, True] + counts[True, True]
  assert 140 <= h <= 260, counts
  assert 140 <= v <= 260, counts
  assert 100 - 52 <= counts[True, True] <= 100 + 52, counts  # sd of Binomial(400, 1/4): 8.7


@pytest.mark.parametrize("hflip,vflip", [(False, False), (True, False), (False, True)])
def test_disabled_flips_never_happen(hflip, vflip):
  counts = _flip_counts(hflip, vflip)
  h = counts[True, False] + counts[True, True]
  v = counts[False, True] + counts[True, True]
  for enabled, n, name in ((hflip, h, "hflip"), (vflip, v, "vflip")):
    if enabled:
      assert 140 <= n <= 260, (name, counts)  # the other flip still works
    else:
      assert n == 0, (name, counts)


DEFAULT_JITTER = {"brightness": 0.15, "contrast": 0.2, "saturation": 0.2, "hue": 0.03}


def _train_view(channels, seed, **jitter):
  """train_augment of a random [32, 32, channels] uint8 image (values away from 0 and 255) at
  scale 1 without flips, so that only colour jitter can change it; returns (numpy reference
  image / 255 * 2 - 1, output)."""
  image = np.random.default_rng(channels).integers(20, 236, (32, 32, channels), dtype=np.uint8)
  aug = _aug_config(hflip=False, vflip=False)
  aug.update(jitter)
  out, _ = transforms.train_augment(tf.constant(image), tf.zeros((32, 32), tf.int32),
                                    tf.constant([seed, 3], tf.int64), aug=aug, size=32,
                                    ignore_label=255)
  return image.astype(np.float32) / 255 * 2 - 1, out.numpy()


def test_colour_jitter_changes_rgb_images():
  for seed in range(8):
    reference, plain = _train_view(3, seed)
    np.testing.assert_allclose(plain, reference, atol=1e-6)  # no jitter: only scaling
    _, jittered = _train_view(3, seed, **DEFAULT_JITTER)
    assert np.abs(jittered - reference).max() > 0.01, seed
    # Brightness alone adds one offset to every pixel, within +-0.15 of the [0, 1] range (the
    # pixels it cannot have pushed out of [0, 1], which are clipped).
    _, brighter = _train_view(3, seed, brightness=0.15)
    unit = (reference + 1) / 2
    delta = ((brighter - reference) / 2)[(unit > 0.15) & (unit < 0.85)]
    assert np.ptp(delta) < 1e-5 and 1e-4 < abs(delta.mean()) <= 0.15 + 1e-6, (seed, delta.mean())


@pytest.mark.parametrize("channels", [1, 4])
def test_colour_jitter_leaves_non_rgb_images_unchanged(channels):
  strong = {"brightness": 0.5, "contrast": 0.5, "saturation": 0.5, "hue": 0.3}
  for seed in range(8):
    reference, out = _train_view(channels, seed, **strong)
    assert out.shape == (32, 32, channels)
    np.testing.assert_allclose(out, reference, atol=1e-6)


def test_scale_crop_keeps_alignment_and_pads_with_ignore():
  image, mask = _label_image()
  agree = []
  for seed in range(6):
    decoded, out_mask = _augment(image, mask, seed, lo=0.6, hi=1.6)
    counted = out_mask != 255
    agree.append((decoded[counted] == out_mask[counted]).mean())
  # Only object borders may differ (bilinear image vs nearest mask).
  assert min(agree) > 0.9
  decoded, out_mask = _augment(image, mask, 0, lo=0.5, hi=0.5)
  assert (out_mask == 255).sum() == 32 * 32 - 16 * 16


def test_out_of_range_label_is_an_error_naming_the_example():
  batch = {"mask": np.zeros((2, 4, 4), np.int32), "id": np.array([b"train_000001", b"train_000002"])}
  batch["mask"][1, 0, 0] = 7
  with pytest.raises(pipeline.DataError, match=r"\[7\] outside \[0, 6\).*train_000002"):
    pipeline._check_labels(batch, 6, 255)
  batch["mask"][1, 0, 0] = 255  # the ignore label is fine
  pipeline._check_labels(batch, 6, 255)


# ---------------------------------------------------------------------------- ResizeShortestEdge

def _detectron2_shape(height, width, shorter, max_longer):
  """detectron2's ResizeShortestEdge.get_output_shape, in exact rational arithmetic (its floats
  round half up the same way away from float error)."""
  from fractions import Fraction
  scale = Fraction(shorter, min(height, width))
  new_h, new_w = height * scale, width * scale
  if max_longer and max(new_h, new_w) > max_longer:
    scale = Fraction(max_longer) / max(new_h, new_w)
    new_h, new_w = new_h * scale, new_w * scale
  return int(new_h + Fraction(1, 2)), int(new_w + Fraction(1, 2))


def test_resize_shortest_edge_gives_detectron2s_shapes_in_tf_and_on_the_host():
  rng = np.random.default_rng(0)
  sizes = rng.integers(8, 900, size=(300, 2)).tolist() + [[100, 100], [37, 1001], [1001, 37]]
  shorter = rng.integers(16, 800, size=len(sizes)).tolist()
  caps = rng.choice([0, 64, 333, 1333], size=len(sizes)).tolist()
  capped = 0
  for (h, w), s, cap in zip(sizes, shorter, caps):
    want = _detectron2_shape(h, w, s, cap)
    rule = transforms.Resize(s, cap)
    assert transforms.resized_shape(h, w, rule) == want, (h, w, s, cap)
    got = transforms.resized_shape(tf.constant(h, tf.int64), tf.constant(w, tf.int64), rule)
    assert (int(got[0]), int(got[1])) == want
    capped += bool(cap) and max(want) == cap and min(want) != s
  assert capped > 30                           # the cap was exercised
  assert transforms.resized_shape(30, 50, transforms.Resize(0, 40)) == (24, 40)  # cap alone
  assert transforms.resized_shape(30, 50, transforms.Resize(0, 0)) == (30, 50)


def test_training_draws_the_shorter_side_from_the_range_and_caps_the_longer():
  """A 40x60 image, shorter side drawn from 20..30, longer side capped at 40, scale 1, crop 64:
  the crop pads the whole resized image, whose extent (the non-ignore pixels) shows the draw."""
  image, mask = tf.ones((40, 60, 1), tf.uint8) * 40, tf.ones((40, 60), tf.int32)
  aug = _aug_config(lo=1.0, hi=1.0)
  augment = tf.function(lambda seed: transforms.train_augment(
      image, mask, seed, aug=aug, size=64, ignore_label=255,
      resize=transforms.Resize(0, 40), resize_range=(20, 30)))
  drawn = set()
  for index in range(60):
    _, out = augment(tf.constant([5, index], tf.int64))
    rows, cols = np.nonzero(out.numpy() != 255)
    shape = (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
    shorter = shape[0]
    assert 20 <= shorter <= 30
    # Draws of 27..30 all hit the cap (60 px wide at 27+ would pass 40): 27 x 40.
    assert shape == _detectron2_shape(40, 60, shorter, 40), shape
    assert shape[1] <= 40
    drawn.add(shorter)
  assert drawn == set(range(20, 28))   # 60 uniform draws over 20..30 hit every outcome
