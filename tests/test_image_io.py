"""Reading users' files: every format the folder dataset and predict accept, and every bad file."""

import io
import struct
import zlib

import numpy as np
from PIL import Image
import pytest
import tifffile

from seg_jax.data import image_io


def _save(path, array, **kwargs):
  Image.fromarray(array).save(path, **kwargs)
  return str(path)


def _png16_rgb(path, array):
  """A 16-bit RGB PNG written by hand (PIL cannot write one): IHDR, one IDAT, IEND."""
  height, width, _ = array.shape
  raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
         + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
  path.write_bytes(png)
  return str(path)


def test_reads_8bit_rgb_grey_and_drops_alpha(tmp_path):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
  rgba = np.concatenate([rgb, np.full((5, 7, 1), 9, np.uint8)], -1)
  grey = rng.integers(0, 256, (5, 7), dtype=np.uint8)
  np.testing.assert_array_equal(image_io.read_image(_save(tmp_path / "a.png", rgb)), rgb)
  np.testing.assert_array_equal(image_io.read_image(_save(tmp_path / "b.png", rgba)), rgb)
  np.testing.assert_array_equal(image_io.read_image(_save(tmp_path / "c.png", grey)), grey[..., None])
  jpeg = image_io.read_image(_save(tmp_path / "d.jpg", rgb, quality=95))
  assert jpeg.shape == (5, 7, 3) and jpeg.dtype == np.uint8


def test_reads_16bit_png_and_tiff_exactly(tmp_path):
  rng = np.random.default_rng(1)
  rgb16 = rng.integers(0, 65536, (4, 6, 3), dtype=np.uint16)
  grey16 = rng.integers(0, 65536, (4, 6), dtype=np.uint16)
  got = image_io.read_image(_png16_rgb(tmp_path / "rgb16.png", rgb16))
  assert got.dtype == np.uint16
  np.testing.assert_array_equal(got, rgb16)
  got = image_io.read_image(_save(tmp_path / "g16.png", grey16))
  np.testing.assert_array_equal(got, grey16[..., None])
  tifffile.imwrite(tmp_path / "rgb16.tif", rgb16, photometric="rgb", compression="zlib")
  np.testing.assert_array_equal(image_io.read_image(str(tmp_path / "rgb16.tif")), rgb16)
  bands = rng.integers(0, 65536, (5, 4, 6), dtype=np.uint16)  # 5-band, bands first
  tifffile.imwrite(tmp_path / "bands.tif", bands, planarconfig="separate", photometric="minisblack")
  np.testing.assert_array_equal(image_io.read_image(str(tmp_path / "bands.tif")),
                                np.moveaxis(bands, 0, -1))
  np.testing.assert_allclose(image_io.to_unit_range(rgb16), rgb16 / 65535.0, rtol=1e-6)


def test_reads_grey_16bit_and_palette_labels(tmp_path):
  labels = np.arange(35, dtype=np.uint8).reshape(5, 7) % 4
  np.testing.assert_array_equal(image_io.read_label(_save(tmp_path / "l.png", labels)), labels)
  palette = Image.fromarray(labels, mode="P")
  palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9] + [0] * 756)
  palette.save(tmp_path / "p.png")
  assert Image.open(tmp_path / "p.png").mode == "P"
  np.testing.assert_array_equal(image_io.read_label(str(tmp_path / "p.png")), labels)
  wide = (labels.astype(np.uint16) * 300)
  np.testing.assert_array_equal(image_io.read_label(_save(tmp_path / "w.png", wide)), wide)
  tifffile.imwrite(tmp_path / "l.tif", labels)
  np.testing.assert_array_equal(image_io.read_label(str(tmp_path / "l.tif")), labels)


def _bad_files(tmp_path):
  good = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  png = io.BytesIO()
  Image.fromarray(good).save(png, format="PNG")
  jpg = io.BytesIO()
  Image.fromarray(good).save(jpg, format="JPEG")
  files = {
      "empty.png": (b"", "empty file"),
      "truncated.png": (png.getvalue()[:len(png.getvalue()) // 2], "truncated or corrupt"),
      "truncated.jpg": (jpg.getvalue()[:len(jpg.getvalue()) // 2], "truncated or corrupt"),
      "text.png": (b"this is not an image, just text\n" * 4, "not an image"),
      "text.tif": (b"this is not an image, just text\n" * 4, "not a readable TIFF"),
  }
  out = {}
  for name, (data, why) in files.items():
    (tmp_path / name).write_bytes(data)
    out[str(tmp_path / name)] = why
  return out


def test_bad_files_raise_errors_naming_the_file(tmp_path):
  for path, why in _bad_files(tmp_path).items():
    for read in (image_io.read_image, image_io.read_label):
      with pytest.raises(image_io.ImageError) as info:
        read(path)
      assert str(info.value).startswith(path + ": ") and why in str(info.value), str(info.value)
  with pytest.raises(image_io.ImageError, match="no such file"):
    image_io.read_image(str(tmp_path / "missing.png"))


def test_decompression_bomb_refused_from_header(tmp_path):
  # A valid PNG header announcing 100000 x 100000 pixels, with almost no data.
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b""))
  path = tmp_path / "bomb.png"
  path.write_bytes(bomb)
  with pytest.raises(image_io.ImageError, match=r"bomb.png: 100000x100000 .* exceeds the limit"):
    image_io.read_image(str(path))
  small = _save(tmp_path / "small.png", np.zeros((20, 20), np.uint8))
  with pytest.raises(image_io.ImageError, match="exceeds the limit of 399"):
    image_io.read_label(small, max_pixels=399)


def test_rgb_label_refused(tmp_path):
  path = _save(tmp_path / "rgb_mask.png", np.zeros((4, 4, 3), np.uint8))
  with pytest.raises(image_io.ImageError, match="rgb_mask.png: label images must be single-channel"):
    image_io.read_label(path)


def test_convert_channels_promotes_grey_and_reduces_rgb_like_pil(tmp_path):
  rng = np.random.default_rng(3)
  rgb = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
  grey = image_io.convert_channels(rgb, 1)
  pil_grey = np.asarray(Image.fromarray(rgb).convert("L"))
  assert grey.shape == (6, 9, 1) and grey.dtype == np.uint8
  assert np.abs(grey[..., 0].astype(int) - pil_grey).max() <= 1  # PIL rounds in fixed point
  g16 = rng.integers(0, 65536, (4, 5, 1), dtype=np.uint16)
  np.testing.assert_array_equal(image_io.convert_channels(g16, 3), np.concatenate([g16] * 3, -1))
  assert image_io.convert_channels(rgb, 0) is rgb and image_io.convert_channels(rgb, 3) is rgb
  with pytest.raises(image_io.ImageError, match="bands.tif: 5 channels cannot be converted to 3"):
    image_io.convert_channels(np.zeros((2, 2, 5), np.uint16), 3, path="bands.tif")


def test_input_normalizations_by_name_and_by_workdir_record(tmp_path):
  """normalize() against the formulas written out here; TF's pipeline arithmetic gives the same
  bits; model.json records the config's choice, and that record normalises alike."""
  import json
  import tensorflow as tf
  from seg_jax import config as config_lib
  from seg_jax import workdir as workdir_lib
  from seg_jax.data import transforms
  rng = np.random.default_rng(0)
  rgb8 = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
  rgb16 = rng.integers(0, 65536, (4, 5, 3), dtype=np.uint16)
  x = rgb8.astype(np.float64) / 255
  np.testing.assert_allclose(image_io.normalize(rgb8), x * 2 - 1, rtol=1e-6, atol=1e-6)
  imagenet = (x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  np.testing.assert_allclose(image_io.normalize(rgb8, "imagenet"), imagenet, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(image_io.normalize(rgb16, "imagenet"),
                             (rgb16 / 65535.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225],
                             rtol=1e-5, atol=1e-5)
  for name in image_io.NORMALIZATIONS:
    pipeline = transforms.unit_to_model_range(transforms.to_unit_range(tf.constant(rgb8)), name)
    np.testing.assert_array_equal(pipeline.numpy(), image_io.normalize(rgb8, name))
    np.testing.assert_array_equal(
        transforms.denormalize_image(image_io.normalize(rgb8, name), name), rgb8)
  with pytest.raises(ValueError, match="3 channels"):
    image_io.normalize(rgb8[..., :1], "imagenet")

  config = config_lib.base_config("deeplabv3plus")
  config.model.input_normalization = "imagenet"
  workdir_lib.write(str(tmp_path), config, class_names=["a", "b"], channels=3)
  record = workdir_lib.read_model_info(str(tmp_path))["input_normalization"]
  assert record["name"] == "imagenet" and record["mean"] == [0.485, 0.456, 0.406]
  np.testing.assert_array_equal(image_io.normalize(rgb8, record),
                                image_io.normalize(rgb8, "imagenet"))
  # a workdir written before the choice existed records the [-1, 1] formula without a name
  old = {k: v for k, v in image_io.NORMALIZATIONS["minus_one_to_one"].items() if k != "name"}
  np.testing.assert_array_equal(image_io.normalize(rgb8, json.loads(json.dumps(old))),
                                image_io.normalize(rgb8))
  config.model.input_normalization = "imagenet_rgb"
  with pytest.raises(config_lib.ConfigError, match="input_normalization='imagenet_rgb'"):
    config_lib.validate(config)
