"""Standard datasets offline: TFDS catalogue datasets under tfds.testing.mock_data, ADE20K from a written folder.

Each test checks a train batch and an eval batch (shapes, dtypes, label range)
and that the eval masks equal the raw masks mapped by a table written here,
independently of seg_jax.data.standard.
"""

import contextlib
from unittest import mock

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from seg_jax import config as config_lib
from seg_jax.data import pipeline
from seg_jax.data.errors import DataError
from tests.conftest import tiny_config

IGNORE = 255
PET = {2: 0, 1: 1, 3: 2}   # trimap: 1 pet, 2 background, 3 border
CITYSCAPES = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
              25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def _map(raw, table):
  out = np.full(raw.shape, IGNORE, np.int32)
  for value, label in table.items():
    out[raw == value] = label
  return out


def _fake_examples(builder, num_examples, sizes, max_raw):
  """Examples for every feature of `builder`, with image and mask of one size per example.

  (TFDS's own USE_CODE generator draws each image dimension independently, so
  an image and its mask would differ in size.)
  """
  rng = np.random.default_rng(0)
  infos = builder.info.features.get_tensor_info()
  examples = []
  for i in range(num_examples):
    h, w = sizes[i % len(sizes)]
    example = {}
    for name, info in infos.items():
      shape = tuple(d if d is not None else (h, w)[k] for k, d in enumerate(info.shape))
      if info.dtype == tf.string:
        example[name] = f"{name}_{i}".encode()
      elif len(shape) == 3 and shape[-1] == 1:        # a label image
        example[name] = rng.integers(0, max_raw + 1, shape).astype(info.np_dtype)
      elif np.issubdtype(info.np_dtype, np.integer):
        example[name] = rng.integers(0, 2, shape).astype(info.np_dtype)
      else:
        example[name] = rng.uniform(0, 1, shape).astype(info.np_dtype)
    examples.append(example)
  return examples


@contextlib.contextmanager
def _mocked(name, splits, num_examples, sizes, max_raw):
  """tfds.testing.mock_data with consistent sizes; the builder counts as prepared."""
  generated = {}

  def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    examples = generated.setdefault(self.name, _fake_examples(self, num_examples, sizes, max_raw))
    infos = self.info.features.get_tensor_info()
    return tf.data.Dataset.from_generator(
        lambda: iter(examples),
        output_signature={k: tf.TensorSpec(v.shape, v.dtype) for k, v in infos.items()})

  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_dataset_fn=as_dataset), \
      mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True):
    yield generated


def _set_splits(builder, splits, num_examples):
  # USE_CODE mocks know no split sizes; the pipeline needs them to count eval batches.
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=s, shard_lengths=[num_examples], num_bytes=0, filename_template=None)
      for s in splits]))


def _config(data_dir, name, num_classes, **dataset):
  c = config_lib.with_dataset(tiny_config(data_dir), name)
  c.dataset.num_classes = num_classes
  c.dataset.cache = False
  c.batch_size = 4
  c.dataset.shuffle_buffer = 4
  for key, value in dataset.items():
    c.dataset[key] = value
  config_lib.validate(c)
  return c


def _check_batches(config, builder, split, num_classes, canvas):
  train = next(pipeline.train_batches(config, builder))
  assert train["image"].shape == (4, 32, 32, 3) and train["image"].dtype == np.float32
  assert train["mask"].shape == (4, 32, 32) and train["mask"].dtype == np.int32
  assert set(np.unique(train["mask"]).tolist()) <= set(range(num_classes)) | {IGNORE}
  batches = list(pipeline.eval_batches(config, builder, split))
  for b in batches:
    assert b["image"].shape == (4, *canvas, 3) and b["mask"].shape == (4, *canvas)
    assert -1 <= b["image"].min() and b["image"].max() <= 1
  return batches


def _find(batches, expected):
  """The eval example whose top-left region equals `expected` (and is ignore elsewhere)."""
  h, w = expected.shape
  for b in batches:
    for mask, valid in zip(b["mask"], b["valid"]):
      if valid and np.array_equal(mask[:h, :w], expected):
        rest = mask.copy()
        rest[:h, :w] = IGNORE
        return (rest == IGNORE).all()
  return False


def test_oxford_iiit_pet_trimaps(data_dir):
  sizes = [(40, 56), (64, 48), (90, 30), (33, 33)]   # (90, 30) is larger than the canvas
  with _mocked("oxford_iiit_pet", ("train", "test"), 6, sizes, max_raw=5) as generated:
    config = _config(data_dir, "oxford_iiit_pet", 3, eval_split="test", eval_size=(64, 64))
    builder, names = pipeline.prepare_dataset(config)
    _set_splits(builder, ("train", "test"), 6)
    assert names == ["background", "pet", "border"]
    assert pipeline.image_channels(config, builder) == 3
    batches = _check_batches(config, builder, "test", 3, (64, 64))
    assert sum(b["valid"].sum() for b in batches) == 6 and len(batches) == 2
    raw = generated["oxford_iiit_pet"]
    for example in raw:
      mask = example["segmentation_mask"][..., 0]
      if mask.shape[0] <= 64 and mask.shape[1] <= 64:
        assert _find(batches, _map(mask, PET))
    # The example taller than the canvas was downscaled to fit (aspect kept): 64 x 21.
    assert any(((b["mask"][:, :, 21:] == IGNORE).all(axis=(1, 2)) & b["valid"]).any() for b in batches)

    # num_classes=2: the border is ignored.
    config2 = _config(data_dir, "oxford_iiit_pet", 2, eval_split="test", eval_size=(64, 64))
    builder2, names2 = pipeline.prepare_dataset(config2)
    _set_splits(builder2, ("train", "test"), 6)
    assert names2 == ["background", "pet"]
    batches2 = list(pipeline.eval_batches(config2, builder2, "test"))
    mask = raw[0]["segmentation_mask"][..., 0]
    assert _find(batches2, _map(mask, {2: 0, 1: 1}))


def test_cityscapes_label_ids_to_train_ids(data_dir):
  with _mocked("cityscapes", ("train", "validation"), 2, [(1024, 2048)], max_raw=40) as generated:
    config = _config(data_dir, "cityscapes", 19, eval_split="validation")
    builder, names = pipeline.prepare_dataset(config)
    _set_splits(builder, ("train", "validation"), 2)
    assert len(names) == 19 and names[0] == "road" and names[18] == "bicycle"
    # The image size is fixed, so the eval canvas is the native 1024 x 2048.
    assert pipeline.eval_canvas(config, builder, "validation") == (1024, 2048)
    batch = next(pipeline.train_batches(config, builder))
    assert batch["image"].shape == (4, 32, 32, 3)
    assert set(np.unique(batch["mask"]).tolist()) <= set(range(19)) | {IGNORE}
    config.batch_size = 2
    (b,) = list(pipeline.eval_batches(config, builder, "validation"))
    assert b["mask"].shape == (2, 1024, 2048) and b["valid"].all()
    for example in generated["cityscapes"]:
      assert _find([b], _map(example["segmentation_label"][..., 0], CITYSCAPES))
    # With dataset.resize the canvas follows: shorter side 64 -> 64 x 128.
    config.dataset.resize = 64
    assert pipeline.eval_canvas(config, builder, "validation") == (64, 128)
    (small,) = list(pipeline.eval_batches(config, builder, "validation"))
    assert small["image"].shape == (2, 64, 128, 3)


def test_catalogue_dataset_not_prepared_says_how_to_get_it(tmp_path):
  config = _config(str(tmp_path), "oxford_iiit_pet", 3, eval_split="test", eval_size=(64, 64))
  with pytest.raises(DataError, match="oxford_iiit_pet is not prepared in .*dataset.download=True"):
    pipeline.prepare_dataset(config)
  config = _config(str(tmp_path), "cityscapes", 19)
  with pytest.raises(DataError, match="gtFine_trainvaltest.zip"):
    pipeline.prepare_dataset(config)
  with pytest.raises(config_lib.ConfigError, match="dataset.num_classes=6: cityscapes has 19"):
    _config(str(tmp_path), "cityscapes", 6)


def test_ade20k_from_the_challenge_folder(tmp_path):
  rng = np.random.default_rng(2)
  root = tmp_path / "ADEChallengeData2016"
  raw = {}
  for split, sub, n in (("train", "training", 5), ("validation", "validation", 3)):
    (root / "images" / sub).mkdir(parents=True)
    (root / "annotations" / sub).mkdir(parents=True)
    for i in range(n):
      stem = f"ADE_{sub[:5]}_{i:08d}"
      h, w = 30 + 7 * i, 50 - 5 * i
      Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
          root / "images" / sub / f"{stem}.jpg")
      raw[stem] = rng.integers(0, 151, (h, w)).astype(np.uint8)
      Image.fromarray(raw[stem]).save(root / "annotations" / sub / f"{stem}.png")
  config = _config(str(tmp_path / "tfds"), "ade20k", 150, root=str(root))
  builder, names = pipeline.prepare_dataset(config)
  assert len(names) == 150 and names[:3] == ["wall", "building", "sky"] and names[-1] == "flag"
  canvas = pipeline.eval_canvas(config, builder, "validation")
  assert canvas == (64, 64)  # largest validation image 44 x 50, rounded up to 32
  batches = _check_batches(config, builder, "validation", 150, canvas)
  for stem, mask in raw.items():
    if "valid" in stem:
      expected = np.where(mask == 0, IGNORE, mask.astype(np.int32) - 1)  # 0 = other; 1..150 -> 0..149
      assert _find(batches, expected), stem

  # A label above 150 is reported with its file, and nothing is built.
  bad = raw["ADE_valid_00000000"].copy()
  bad[0, 0] = 151
  Image.fromarray(bad).save(root / "annotations" / "validation" / "ADE_valid_00000000.png")
  with pytest.raises(DataError, match=r"ADE_valid_00000000.png: label values \[151\] outside \[0, 151\)"):
    pipeline.prepare_dataset(config)
