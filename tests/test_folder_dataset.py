"""Folder dataset: every accepted format read back exactly, every bad file reported at once, caching, batches."""

import os
import re
import struct
import zlib

import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds
import tifffile

from seg_jax import config as config_lib
from seg_jax import metrics
from seg_jax.data import pipeline
from seg_jax.data.builders import folder
from seg_jax.data.errors import DataError
from tests.conftest import tiny_config

K = 3          # classes in the test folders
IGNORE = 255


def _png16_rgb(path, array):
  """A 16-bit RGB PNG written by hand (PIL cannot write one)."""
  height, width, _ = array.shape
  raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
                   + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _mask(rng, h, w, *, ignore=True):
  mask = rng.integers(0, K, (h, w)).astype(np.uint8)
  if ignore:
    mask[: h // 4, : w // 4] = IGNORE
  return mask


def _palette_png(path, mask):
  image = Image.fromarray(mask, mode="P")
  image.putpalette([v for c in range(256) for v in (c, 255 - c, (7 * c) % 256)])
  image.save(path)


def _write_good_folder(root):
  """Eight pairs in every accepted format; returns {stem: (expected RGB uint16 image, mask)}.

  Expected images are what the dataset must store with channels=3: grey
  replicated to RGB, alpha dropped, and 8-bit scaled by 257 (one image is 16-bit).
  """
  rng = np.random.default_rng(0)
  (root / "images").mkdir(parents=True)
  (root / "masks").mkdir()
  expected = {}

  def keep(stem, image, mask):
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, axis=-1)
    image = image.astype(np.uint16) * (257 if image.dtype == np.uint8 else 1)
    expected[stem] = (image, mask.astype(np.int32))

  rgb = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)             # 8-bit RGB, palette mask
  Image.fromarray(rgb).save(root / "images" / "rgb8.png")
  mask = _mask(rng, 40, 48)
  _palette_png(root / "masks" / "rgb8.png", mask)
  keep("rgb8", rgb, mask)

  grey16 = rng.integers(0, 65536, (33, 47), dtype=np.uint16)           # 16-bit grey PNG
  Image.fromarray(grey16).save(root / "images" / "grey16.png")
  mask = _mask(rng, 33, 47)
  Image.fromarray(mask).save(root / "masks" / "grey16.png")
  keep("grey16", grey16, mask)

  rgba = rng.integers(0, 256, (36, 30, 4), dtype=np.uint8)              # RGBA: alpha dropped
  Image.fromarray(rgba).save(root / "images" / "rgba.png")
  mask = _mask(rng, 36, 30, ignore=False)
  tifffile.imwrite(root / "masks" / "rgba.tif", mask)                   # TIFF mask
  keep("rgba", rgba[..., :3], mask)

  tif16 = rng.integers(0, 65536, (28, 52, 3), dtype=np.uint16)          # 16-bit RGB TIFF
  tifffile.imwrite(root / "images" / "tif16.tiff", tif16, photometric="rgb")
  mask = _mask(rng, 28, 52)
  Image.fromarray(mask.astype(np.uint16)).save(root / "masks" / "tif16.png")  # 16-bit mask
  keep("tif16", tif16, mask)

  rgb16 = rng.integers(0, 65536, (20, 24, 3), dtype=np.uint16)          # 16-bit RGB PNG
  _png16_rgb(root / "images" / "rgb16.png", rgb16)
  mask = _mask(rng, 20, 24)
  _palette_png(root / "masks" / "rgb16.png", mask)
  keep("rgb16", rgb16, mask)

  for i, (h, w) in enumerate([(32, 32), (45, 38), (26, 61)]):           # more 8-bit RGB, grey masks
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(image).save(root / "images" / f"plain{i}.png")
    mask = _mask(rng, h, w)
    Image.fromarray(mask).save(root / "masks" / f"plain{i}.png")
    keep(f"plain{i}", image, mask)

  (root / "classes.txt").write_text("background\nleaf\nstem\n")
  return expected


@pytest.fixture(scope="module")
def good(tmp_path_factory):
  root = tmp_path_factory.mktemp("good")
  expected = _write_good_folder(root)
  (root / "splits").mkdir()
  (root / "splits" / "train.txt").write_text("rgb8\ngrey16\nrgba\nplain0\nplain1  # comment\n\n")
  (root / "splits" / "validation.txt").write_text("tif16\nrgb16\nplain2\n")
  return root, expected


@pytest.fixture(scope="module")
def good_data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds_folder"))


def _prepare(root, data_dir, **kwargs):
  kwargs = {"num_classes": K, "ignore_label": IGNORE, **kwargs}
  return folder.prepare_folder(str(root), data_dir=data_dir, **kwargs)


def test_every_format_is_stored_exactly(good, good_data_dir):
  root, expected = good
  builder, names = _prepare(root, good_data_dir, channels=3)
  assert names == ["background", "leaf", "stem"]
  assert builder.info.features["image"].shape == (None, None, 3)
  seen = {}
  for split, stems in (("train", {"rgb8", "grey16", "rgba", "plain0", "plain1"}),
                       ("validation", {"tif16", "rgb16", "plain2"})):
    examples = list(tfds.as_numpy(builder.as_dataset(split=split)))
    assert {e["id"].decode() for e in examples} == stems
    seen.update({e["id"].decode(): e for e in examples})
  for stem, (image, mask) in expected.items():
    assert seen[stem]["image"].dtype == np.uint16
    np.testing.assert_array_equal(seen[stem]["image"], image, err_msg=stem)
    np.testing.assert_array_equal(seen[stem]["mask"][..., 0], mask, err_msg=stem)


def test_split_by_fraction_is_seeded_disjoint_and_complete():
  stems = [f"img{i:03d}" for i in range(50)]
  a = folder.split_by_fraction(stems, seed=3, validation_fraction=0.2, test_fraction=0.1)
  b = folder.split_by_fraction(list(reversed(stems)), seed=3, validation_fraction=0.2,
                               test_fraction=0.1)
  assert a == b                                   # depends on the set of stems, not its order
  assert [len(a[s]) for s in ("train", "validation", "test")] == [35, 10, 5]
  everything = a["train"] + a["validation"] + a["test"]
  assert sorted(everything) == stems              # complete and disjoint
  other = folder.split_by_fraction(stems, seed=4, validation_fraction=0.2, test_fraction=0.1)
  assert other["validation"] != a["validation"]
  tiny = folder.split_by_fraction(stems[:3], seed=0, validation_fraction=0.1, test_fraction=0.0)
  assert len(tiny["validation"]) == 1 and "test" not in tiny  # a non-zero fraction gets >= 1


def test_folder_without_splits_uses_the_seeded_fractions(tmp_path):
  _write_good_folder(tmp_path)
  scan = folder.scan_folder(str(tmp_path), num_classes=K, ignore_label=IGNORE, channels=3,
                            split_seed=1, validation_fraction=0.25, test_fraction=0.0)
  expected = folder.split_by_fraction(sorted(scan.sizes), seed=1, validation_fraction=0.25,
                                      test_fraction=0.0)
  assert {s: [e.stem for e in v] for s, v in scan.splits.items()} == expected
  assert len(expected["validation"]) == 2 and len(expected["train"]) == 6


def _bomb_png(path):
  """A valid PNG header announcing 100000 x 100000 pixels, with almost no data."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0))
                   + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b""))


def test_every_problem_is_reported_in_one_error_and_nothing_is_built(tmp_path):
  rng = np.random.default_rng(1)
  root = tmp_path / "bad"
  (root / "images").mkdir(parents=True)
  (root / "masks").mkdir()
  (root / "splits").mkdir()

  def pair(stem, h=20, w=24, channels=3, mask=None):
    shape = (h, w, channels) if channels > 1 else (h, w)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / "images" / f"{stem}.png")
    Image.fromarray(_mask(rng, h, w) if mask is None else mask).save(root / "masks" / f"{stem}.png")

  for i in range(4):
    pair(f"fine{i}")                                                   # these are sound
  pair("zero")
  (root / "images" / "zero.png").write_bytes(b"")                      # zero-byte image
  pair("trunc")
  data = (root / "images" / "trunc.png").read_bytes()
  (root / "images" / "trunc.png").write_bytes(data[: len(data) // 2])  # truncated PNG
  Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / "images" / "cut.jpg")
  data = (root / "images" / "cut.jpg").read_bytes()
  (root / "images" / "cut.jpg").write_bytes(data[: len(data) // 2])    # truncated JPEG
  Image.fromarray(_mask(rng, 20, 24)).save(root / "masks" / "cut.png")
  pair("notimage")
  (root / "images" / "notimage.png").write_text("this is not a picture")  # non-image, image name
  pair("bomb")
  _bomb_png(root / "images" / "bomb.png")                              # decompression bomb
  pair("sizes", h=20, w=24)
  Image.fromarray(_mask(rng, 10, 12)).save(root / "masks" / "sizes.png")  # mask of another size
  pair("labels", mask=np.full((20, 24), 7, np.uint8))                   # labels out of range
  pair("greyone", channels=1)                                          # grey among RGB images
  pair("rgbmask")
  Image.fromarray(rng.integers(0, 3, (20, 24, 3), dtype=np.uint8)).save(root / "masks" / "rgbmask.png")
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / "lonely.png")  # no mask
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "masks" / "orphan.png")      # no image
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / "twice.jpg")   # two images
  pair("twice")
  (root / "splits" / "train.txt").write_text("fine0\nfine1\nghost\n")  # unknown stem
  (root / "splits" / "validation.txt").write_text("fine2\nfine1\n")    # fine1 in two splits
  (root / "splits" / "val.txt").write_text("fine3\n")                  # unknown split file
  (root / "classes.txt").write_text("a\nb\n")                          # 2 names, 3 classes
  (root / "images" / "README.md").write_text("notes")                  # skipped, not a problem

  data_dir = tmp_path / "tfds"
  with pytest.raises(DataError) as info:
    _prepare(root, str(data_dir))
  message = str(info.value)
  summary, *lines = message.splitlines()
  expected = {
      "images/zero.png": "empty", "images/trunc.png": "truncated", "images/cut.jpg": "truncated",
      "images/notimage.png": "not an image",
      "images/bomb.png": "exceeds", "masks/sizes.png": "10", "masks/labels.png": "[7]",
      "images/greyone.png": "1 channels", "masks/rgbmask.png": "colours are not class ids",
      "images/lonely.png": "no mask", "masks/orphan.png": "no image", "twice": "share the stem",
      "splits/train.txt": "ghost", "splits/validation.txt": "'fine1' is also listed",
      "splits/val.txt": "unknown split file", "classes.txt": "2 class names",
  }
  for name, why in expected.items():
    hits = [line for line in lines if name in line and why in line]
    assert hits, f"{name} ({why}) not reported in:\n{message}"
  assert len(lines) == len(expected)  # one line per problem, no follow-on problems
  assert f"{len(lines)} problems" in summary and "nothing was built" in summary
  assert not any("fine0" in line and "fine1" not in line for line in lines)
  assert "README" not in message
  assert not (data_dir / "seg_folder").exists()


def test_empty_and_missing_folders(tmp_path):
  (tmp_path / "images").mkdir()
  (tmp_path / "masks").mkdir()
  with pytest.raises(DataError, match="empty dataset"):
    folder.scan_folder(str(tmp_path), num_classes=K, ignore_label=IGNORE)
  with pytest.raises(DataError, match="no such folder"):
    folder.scan_folder(str(tmp_path / "nope"), num_classes=K, ignore_label=IGNORE)
  os.rmdir(tmp_path / "masks")
  with pytest.raises(DataError, match="masks: missing folder"):
    folder.scan_folder(str(tmp_path), num_classes=K, ignore_label=IGNORE)


def test_cache_is_reused_rechecked_and_invalidated(good, good_data_dir, monkeypatch, tmp_path):
  root, _ = good
  builder, _ = _prepare(root, good_data_dir, channels=3)
  # A second start reads the cache: no file is scanned again.
  monkeypatch.setattr(folder, "scan_folder", lambda *a, **k: pytest.fail("scanned again"))
  again, _ = _prepare(root, good_data_dir, channels=3)
  assert str(again.data_dir) == str(builder.data_dir)
  # The cached label values are checked against a new num_classes, naming the masks.
  with pytest.raises(DataError, match=r"masks/rgb8.png: label values \[2\] outside \[0, 2\)"):
    _prepare(root, good_data_dir, channels=3, num_classes=2)
  monkeypatch.undo()

  # Change one mask (same size, new content): a new cache, with the new content.
  copy = tmp_path / "copy"
  expected = _write_good_folder(copy)
  first, _ = _prepare(copy, good_data_dir, channels=3)
  new_mask = np.zeros_like(expected["plain0"][1], np.uint8)
  Image.fromarray(new_mask).save(copy / "masks" / "plain0.png")
  second, _ = _prepare(copy, good_data_dir, channels=3)
  assert str(second.data_dir) != str(first.data_dir)
  examples = {e["id"].decode(): e for split in second.info.splits
              for e in tfds.as_numpy(second.as_dataset(split=split))}
  np.testing.assert_array_equal(examples["plain0"]["mask"][..., 0], new_mask)


def _stored(builder) -> dict[str, dict]:
  """{stem: example} over every split of a prepared builder."""
  return {e["id"].decode(): e for split in builder.info.splits
          for e in tfds.as_numpy(builder.as_dataset(split=split))}


def test_cache_is_rebuilt_when_a_pair_is_added_or_removed(good_data_dir, monkeypatch, tmp_path):
  """Adding or removing a pair gives a new cache holding exactly the pairs on disk; a file
  outside images/, masks/, splits/ and classes.txt leaves the cache as it is."""
  root = tmp_path / "grows"
  expected = _write_good_folder(root)
  first, _ = _prepare(root, good_data_dir, channels=3)
  assert set(_stored(first)) == set(expected)

  # Not part of the dataset: the same cache, read without scanning a file.
  (root / "notes.txt").write_text("taken on tuesday\n")
  with monkeypatch.context() as m:
    m.setattr(folder, "scan_folder", lambda *a, **k: pytest.fail("scanned again"))
    same, _ = _prepare(root, good_data_dir, channels=3)
  assert str(same.data_dir) == str(first.data_dir)

  # Added: a ninth pair, stored as written.
  rng = np.random.default_rng(7)
  image = rng.integers(0, 256, (21, 27, 3), dtype=np.uint8)
  mask = rng.integers(0, K, (21, 27)).astype(np.uint8)
  Image.fromarray(image).save(root / "images" / "added.png")
  Image.fromarray(mask).save(root / "masks" / "added.png")
  added, _ = _prepare(root, good_data_dir, channels=3)
  assert str(added.data_dir) != str(first.data_dir)
  stored = _stored(added)
  assert set(stored) == set(expected) | {"added"}
  np.testing.assert_array_equal(stored["added"]["image"], image.astype(np.uint16) * 257)
  np.testing.assert_array_equal(stored["added"]["mask"][..., 0], mask)

  # Removed: that pair and one of the original ones go; neither is in the new cache.
  for stem in ("added", "plain1"):
    os.remove(root / "images" / f"{stem}.png")
    os.remove(root / "masks" / f"{stem}.png")
  removed, _ = _prepare(root, good_data_dir, channels=3)
  assert str(removed.data_dir) not in (str(first.data_dir), str(added.data_dir))
  assert set(_stored(removed)) == set(expected) - {"plain1"}

  # Removing only a mask is a problem found before anything is built, not a stale cache read.
  os.remove(root / "masks" / "plain2.png")
  with pytest.raises(DataError, match=r"plain2"):
    _prepare(root, good_data_dir, channels=3)


def _folder_config(root, data_dir):
  c = config_lib.with_dataset(tiny_config(data_dir), "folder")
  c.dataset.root = str(root)
  c.dataset.num_classes = K
  c.dataset.channels = 3
  c.batch_size = 4
  c.dataset.shuffle_buffer = 8
  return c


def test_train_batch_and_padded_eval_batches_count_only_real_pixels(good, good_data_dir):
  root, expected = good
  config = _folder_config(root, good_data_dir)
  builder, _ = pipeline.prepare_dataset(config)
  batch = next(pipeline.train_batches(config, builder))
  assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["mask"].shape == (4, 32, 32) and batch["mask"].dtype == np.int32
  assert -1 <= batch["image"].min() and batch["image"].max() <= 1
  assert set(np.unique(batch["mask"]).tolist()) <= {0, 1, 2, IGNORE}

  # Validation: tif16 28x52, rgb16 20x24, plain2 26x61 -> one canvas of 32x64.
  assert pipeline.eval_canvas(config, builder, "validation") == (32, 64)
  batches = list(pipeline.eval_batches(config, builder, "validation"))
  assert len(batches) == 1 and batches[0]["image"].shape == (4, 32, 64, 3)
  b = batches[0]
  assert b["valid"].tolist().count(True) == 3

  # A fixed "prediction" over the canvas; its confusion matrix must equal an
  # independent count over each image's own pixels at native size.
  yy, xx = np.mgrid[:32, :64]
  prediction = np.broadcast_to((yy + 2 * xx) % K, (4, 32, 64))
  got = metrics.confusion_matrix(prediction, b["mask"], num_classes=K, ignore_label=IGNORE,
                                 valid=b["valid"])
  want = np.zeros((K, K), np.int64)
  for stem in ("tif16", "rgb16", "plain2"):
    mask = expected[stem][1]
    h, w = mask.shape
    keep = mask != IGNORE
    np.add.at(want, (mask[keep], prediction[0, :h, :w][keep]), 1)
  np.testing.assert_array_equal(np.asarray(got), want)

  # Pixels equal image_io's mapping of the stored 16-bit values, x / 65535 * 2 - 1.
  image, mask = expected["tif16"]
  i = next(i for i in range(3) if (b["mask"][i, :28, :52] == mask).all())
  np.testing.assert_array_equal(b["image"][i, :28, :52], image.astype(np.float32) / 65535.0 * 2.0 - 1.0)
  assert (b["mask"][i, 28:] == IGNORE).all() and (b["mask"][i, :, 52:] == IGNORE).all()
  assert (b["image"][i, 28:] == -1).all() and (b["image"][i, :, 52:] == -1).all()  # black padding


def _resize_axis_weights(src, dst):
  """[dst, src] bilinear interpolation matrix with half-pixel centres, edges clamped."""
  centres = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
  lo = np.floor(centres).astype(int)
  hi = np.minimum(lo + 1, src - 1)
  frac = centres - lo
  weights = np.zeros((dst, src))
  weights[np.arange(dst), lo] += 1 - frac
  weights[np.arange(dst), hi] += frac
  return weights


def _nearest(mask, h, w):
  """Nearest-neighbour resize with half-pixel centres: output pixel i takes source pixel
  floor((i + 0.5) * src / dst)."""
  rows = np.minimum(np.floor((np.arange(h) + 0.5) * mask.shape[0] / h).astype(int), mask.shape[0] - 1)
  cols = np.minimum(np.floor((np.arange(w) + 0.5) * mask.shape[1] / w).astype(int), mask.shape[1] - 1)
  return mask[rows][:, cols]


@pytest.mark.parametrize("shorter,sizes,canvas", [
    (40, {"tif16": (40, 74), "rgb16": (40, 48), "plain2": (40, 94)}, (64, 96)),   # upsampled
    (16, {"tif16": (16, 30), "rgb16": (16, 19), "plain2": (16, 38)}, (32, 64)),   # downsampled
])
def test_resize_sets_the_shorter_side_and_the_eval_canvas_of_a_folder(good, good_data_dir,
                                                                      shorter, sizes, canvas):
  """dataset.resize: each validation image and mask at its resized size (numpy bilinear, not
  antialiased, and nearest-neighbour resizes written here), on a canvas from the resized sizes."""
  root, expected = good
  config = _folder_config(root, good_data_dir)
  config.dataset.resize = shorter
  builder, _ = pipeline.prepare_dataset(config)

  resized = {}
  for stem in ("tif16", "rgb16", "plain2"):        # 28x52, 20x24, 26x61
    h, w = expected[stem][1].shape
    scale = shorter / min(h, w)
    resized[stem] = (int(np.floor(h * scale + 0.5)), int(np.floor(w * scale + 0.5)))
  assert resized == sizes
  # Largest resized height and width, rounded up to eval_pad_multiple=32 (natively 32x64).
  assert canvas == tuple(-(-max(size[k] for size in sizes.values()) // 32) * 32 for k in (0, 1))
  assert pipeline.eval_canvas(config, builder, "validation") == canvas
  batches = list(pipeline.eval_batches(config, builder, "validation"))
  assert len(batches) == 1 and batches[0]["image"].shape == (4, *canvas, 3)
  b = batches[0]
  assert b["valid"].tolist() == [True, True, True, False]

  found = set()
  for i in range(3):
    for stem, (h, w) in resized.items():
      image, mask = expected[stem]
      want_mask = _nearest(mask, h, w)
      if (b["mask"][i, :h, :w] == want_mask).mean() < 0.9:
        continue
      found.add(stem)
      np.testing.assert_array_equal(b["mask"][i, :h, :w], want_mask, err_msg=stem)
      assert (b["mask"][i, h:] == IGNORE).all() and (b["mask"][i, :, w:] == IGNORE).all()
      unit = image.astype(np.float64) / 65535.0
      want_image = np.einsum("yh,hwc,xw->yxc", _resize_axis_weights(unit.shape[0], h), unit,
                             _resize_axis_weights(unit.shape[1], w)) * 2 - 1
      np.testing.assert_allclose(b["image"][i, :h, :w], want_image, atol=2e-5, err_msg=stem)
      assert (b["image"][i, h:] == -1).all() and (b["image"][i, :, w:] == -1).all()
  assert found == set(resized)


def test_grey_16bit_folder_builds_a_one_channel_model_and_evaluates(tmp_path):
  """channels inferred as 1: the model is initialised for 1 input channel and eval runs end to end."""
  from seg_jax import train
  rng = np.random.default_rng(5)
  root = tmp_path / "grey"
  (root / "images").mkdir(parents=True)
  (root / "masks").mkdir()
  for i in range(6):
    h, w = 24 + 4 * i, 40 - 2 * i
    Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)).save(root / "images" / f"g{i}.png")
    Image.fromarray(_mask(rng, h, w)).save(root / "masks" / f"g{i}.png")
  config = _folder_config(root, str(tmp_path / "tfds"))
  config.dataset.channels = 0
  config.dataset.validation_fraction = 0.34
  config.model.width = 4
  trainer = train.Trainer(config, str(tmp_path / "workdir"))
  assert trainer.channels == 1 and trainer.class_names == ["class_0", "class_1", "class_2"]
  state = trainer.initial_state()
  in_channels = [k.shape[2] for k in jax.tree.leaves(state.params) if k.ndim == 4]
  assert in_channels.count(1) == 1  # the first conv sees one channel; no other conv has 1
  scores, visuals = trainer.evaluate(train.model_variables(state), "validation")
  assert visuals["image"].shape[-1] == 1 and visuals["valid"].sum() == 2
  assert 0 <= scores["pixel_accuracy"] <= 1
  trainer.checkpoints.close()


@pytest.mark.parametrize("key, value, message", [
    ("root", "", "dataset.root='': dataset.name='folder' needs the data folder"),
    ("validation_fraction", 0.7, "sum < 1"),
    ("eval_size", (64, 0), "must be (0, 0)"),
    ("eval_size", (64, 70), "divisible by 4 (2**model.depth=4)"),
    ("channels", -1, "integer >= 0"),
])
def test_config_checks_the_dataset_keys(key, value, message):
  from seg_jax import config as config_lib
  c = _folder_config("/some/folder", "")
  c.dataset.test_fraction = 0.4
  c.dataset.validation_fraction = 0.1
  config_lib.validate(c)
  c.dataset[key] = value
  with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
    config_lib.validate(c)
