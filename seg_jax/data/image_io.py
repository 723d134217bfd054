"""Reading users' image and label files, with errors that name the file.

Host-side only. Used by the folder dataset builder and by `--mode=predict`.

- `read_image(path)` -> uint8 or uint16 array [H, W, C] (C = 1 grey, 3 RGB, or
  more TIFF bands). PNG/JPEG/BMP go through PIL, except 16-bit colour PNGs,
  which PIL reduces to 8 bits and TensorFlow decodes exactly; TIFF goes
  through tifffile (8/16-bit, any number of bands, compressed). An alpha
  channel is dropped and palette images are expanded to RGB.
- `read_label(path)` -> int32 array [H, W] of class ids: a single-channel
  PNG/TIFF (8 or 16 bit) holds the ids; a palette PNG holds them as palette
  indices (its colours are ignored). An RGB label image is refused: colours
  are not class ids.
- `convert_channels(image, channels)` promotes grey to RGB or reduces RGB to
  grey, as the folder dataset stores images (predict must do the same).
- `to_unit_range(image)` scales 8/16-bit values to [0, 1]; the model's input
  is that mapped by the model's `input_normalization` (`NORMALIZATIONS`):
  to [-1, 1], or by ImageNet's mean and std (the pipeline computes the same
  in TF with `unit_to_model_input`). `normalize(image, normalization)` does
  both for inference, given the name or the record in a workdir's model.json.

Every failure raises `ImageError` naming the file: empty file, truncated or
undecodable data, a non-image with an image extension, a header announcing
more than `max_pixels` pixels (a decompression bomb), or an unusable mode.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from seg_jax.data.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# 4 x PIL's default bomb limit: a 16000x16000 satellite tile still opens.
DEFAULT_MAX_PIXELS = 4 * 89_478_485


class ImageError(DataError):
  """An image or label file cannot be used; the message names the file."""


def _fail(path: str, why: str):
  raise ImageError(f"{path}: {why}")


def _is_tiff(path: str) -> bool:
  return os.path.splitext(path)[1].lower() in (".tif", ".tiff")


def _check_file(path: str) -> None:
  if not os.path.isfile(path):
    _fail(path, "no such file")
  if os.path.getsize(path) == 0:
    _fail(path, "empty file (0 bytes)")


def _check_pixels(path: str, height: int, width: int, max_pixels: int) -> None:
  if height * width > max_pixels:
    _fail(path, f"{width}x{height} = {height * width} pixels exceeds the limit of {max_pixels} "
                "(a decompression bomb or a tile too large to read whole)")


def _read_tiff(path: str, max_pixels: int) -> np.ndarray:
  import tifffile
  try:
    with tifffile.TiffFile(path) as tif:
      page = tif.pages[0]
      shape = page.shape
      # Planar (bands-first) pages: the two largest axes are the image.
      if len(shape) == 3 and page.planarconfig == tifffile.PLANARCONFIG.SEPARATE:
        _check_pixels(path, shape[1], shape[2], max_pixels)
        array = np.moveaxis(page.asarray(), 0, -1)
      else:
        _check_pixels(path, shape[0], shape[1], max_pixels)
        array = page.asarray()
  except ImageError:
    raise
  except Exception as e:  # tifffile raises many types for damaged files
    _fail(path, f"not a readable TIFF ({type(e).__name__}: {e})")
  return array


def _png_header(path: str) -> tuple[int, int] | None:
  """(bit depth, colour type) from a PNG's IHDR chunk, or None if not a PNG."""
  with open(path, "rb") as f:
    head = f.read(26)
  if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n":
    return None
  return head[24], head[25]


def _open_pil(path: str, max_pixels: int) -> Image.Image:
  try:
    # Our limit replaces PIL's (checked on the header, before any decoding).
    pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
      image = Image.open(path)
    finally:
      Image.MAX_IMAGE_PIXELS = pil_limit
    _check_pixels(path, image.height, image.width, max_pixels)
    image.load()
  except ImageError:
    raise
  except Image.UnidentifiedImageError:
    _fail(path, "not an image file (unrecognised format)")
  except (OSError, SyntaxError, ValueError) as e:
    _fail(path, f"truncated or corrupt image ({e})")
  return image


def _as_channels_last(array: np.ndarray) -> np.ndarray:
  return array[..., None] if array.ndim == 2 else array


def _check_dtype(path: str, array: np.ndarray) -> np.ndarray:
  if array.dtype == np.uint8 or array.dtype == np.uint16:
    return array
  if np.issubdtype(array.dtype, np.integer) and array.size and 0 <= array.min() and array.max() <= 65535:
    return array.astype(np.uint16)
  _fail(path, f"pixel type {array.dtype} is not supported (use 8- or 16-bit unsigned images)")


def read_image(path: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """The image as uint8/uint16 [H, W, C]; alpha dropped, palettes expanded."""
  _check_file(path)
  if _is_tiff(path):
    array = _as_channels_last(_read_tiff(path, max_pixels))
    if array.ndim != 3:
      _fail(path, f"expected a 2-D image with optional bands, got shape {array.shape}")
    if array.shape[-1] in (2, 4):  # grey+alpha, RGBA
      array = array[..., :-1]
    return _check_dtype(path, array)

  header = _png_header(path)
  image = _open_pil(path, max_pixels)
  if header is not None and header[0] == 16 and header[1] in (2, 6):
    # 16-bit colour: PIL keeps only 8 bits of each channel.
    import tensorflow as tf
    array = tf.io.decode_png(open(path, "rb").read(), channels=3, dtype=tf.uint16).numpy()
    return array
  if image.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBA", "RGBX", "1"):
    image = image.convert("RGB")
  elif image.mode == "LA":
    image = image.convert("L")
  return _check_dtype(path, _as_channels_last(np.asarray(image)))


def read_label(path: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Class ids as int32 [H, W] from a single-channel or palette label image."""
  _check_file(path)
  if _is_tiff(path):
    array = _read_tiff(path, max_pixels)
  else:
    image = _open_pil(path, max_pixels)
    if image.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
      _fail(path, f"label images must be single-channel class ids or a palette PNG, got mode "
                  f"{image.mode} (colours are not class ids)")
    array = np.asarray(image)  # palette images give their indices
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim != 2:
    _fail(path, f"label images must be single-channel class ids, got shape {array.shape}")
  if not np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
    _fail(path, f"label pixel type {array.dtype} is not an integer class id")
  return array.astype(np.int32)


def to_unit_range(image: np.ndarray) -> np.ndarray:
  """uint8/uint16 -> float32 in [0, 1] (by the type's range, not the image's)."""
  return image.astype(np.float32) / float(np.iinfo(image.dtype).max)


# What a model sees: pixels scaled by their type's range (not the image's) to [0, 1], then by the
# model's `input_normalization`: to [-1, 1], or ImageNet's per-channel mean and std (RGB), which
# weights trained on ImageNet expect. Recorded in each workdir (WORKDIR/model.json) for use
# outside seg_jax.
_DTYPE_MAX = {"uint8": 255, "uint16": 65535}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = {
    "minus_one_to_one": {"name": "minus_one_to_one", "formula": "x / dtype_max * 2 - 1",
                         "range": [-1.0, 1.0], "dtype_max": _DTYPE_MAX},
    "imagenet": {"name": "imagenet", "formula": "(x / dtype_max - mean) / std",
                 "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "channels": 3,
                 "dtype_max": _DTYPE_MAX},
}
DEFAULT_NORMALIZATION = "minus_one_to_one"
NORMALIZATION = NORMALIZATIONS[DEFAULT_NORMALIZATION]


def normalization_name(normalization: str | dict | None) -> str:
  """The name of a normalisation given by name or by its record in a workdir's model.json
  (None, or a record written before there was a choice: the default)."""
  if isinstance(normalization, dict):
    normalization = normalization.get("name", DEFAULT_NORMALIZATION)
  name = normalization or DEFAULT_NORMALIZATION
  if name not in NORMALIZATIONS:
    raise ValueError(f"unknown input normalization {name!r}; known: {', '.join(NORMALIZATIONS)}")
  return name


def unit_to_model_input(unit, normalization: str | dict | None = DEFAULT_NORMALIZATION):
  """[0, 1] pixels [..., C] -> the model's input. Plain arithmetic, so that numpy (inference) and
  TensorFlow (the pipeline) compute bit-identical values."""
  name = normalization_name(normalization)
  if name == "minus_one_to_one":
    return unit * 2.0 - 1.0
  if unit.shape[-1] != 3:
    raise ValueError(f"input normalization 'imagenet' needs RGB images (3 channels), got "
                     f"{unit.shape[-1]}")
  mean = np.asarray(IMAGENET_MEAN, np.float32)
  std = np.asarray(IMAGENET_STD, np.float32)
  return (unit - mean) / std


def model_input_to_unit(x: np.ndarray, normalization: str | dict | None = DEFAULT_NORMALIZATION
                        ) -> np.ndarray:
  """The inverse of `unit_to_model_input`, in numpy (for pictures)."""
  x = np.asarray(x, np.float32)
  if normalization_name(normalization) == "minus_one_to_one":
    return (x + 1.0) / 2.0
  return x * np.asarray(IMAGENET_STD, np.float32) + np.asarray(IMAGENET_MEAN, np.float32)


def normalize(image: np.ndarray, normalization: str | dict | None = DEFAULT_NORMALIZATION
              ) -> np.ndarray:
  """uint8/uint16 pixels -> float32 model input, by `normalization` (a name of NORMALIZATIONS,
  or the `input_normalization` record of a workdir's model.json)."""
  return unit_to_model_input(to_unit_range(image), normalization).astype(np.float32)


def convert_channels(image: np.ndarray, channels: int, *, path: str = "image") -> np.ndarray:
  """[H, W, C] -> [H, W, channels]: grey promoted to RGB, RGB reduced to grey.

  Grey -> RGB replicates; RGB -> grey is ITU-R 601-2 luma (as PIL's mode 'L'),
  rounded, in the image's own dtype. 0 or an equal count leaves the image
  unchanged; any other conversion raises ImageError naming `path`.
  """
  have = image.shape[-1]
  if channels in (0, have):
    return image
  if have == 1 and channels == 3:
    return np.repeat(image, 3, axis=-1)
  if have == 3 and channels == 1:
    luma = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return np.round(luma).astype(image.dtype)[..., None]
  _fail(path, f"{have} channels cannot be converted to {channels} (only grey <-> RGB)")
