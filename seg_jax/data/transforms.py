"""Augmentations applied jointly to an image and its mask (TensorFlow, in tf.data).

Images arrive as uint8 or uint16 of any size and leave as float32 model input
(`to_unit_range(x)` mapped by the model's input normalisation: to [-1, 1], or
ImageNet's mean and std; `image_io.NORMALIZATIONS`): training views are random crops of a fixed
size, eval views are whole images padded onto a fixed canvas.

All randomness is stateless: every example gets its own seed, so the augmented
stream is a pure function of (config.seed, position in the stream).

A "mask" here is a label map `[H, W]` or a stack of them `[H, W, K]`: every
geometric transform treats each channel as labels (nearest resampling, padding
with the ignore label). Instance tasks pack the semantic mask and the instance
masks into one stack (`pack_instances`), so that one transform moves them all
alike, and read boxes off the transformed masks (`unpack_instances`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import ml_collections
import numpy as np
import tensorflow as tf

from seg_jax.data import image_io


def to_unit_range(image: tf.Tensor) -> tf.Tensor:
  """uint8/uint16 -> float32 in [0, 1], by the type's range (as `image_io.to_unit_range`)."""
  if image.dtype == tf.uint8 or image.dtype == tf.uint16:
    return tf.cast(image, tf.float32) / float(image.dtype.max)
  raise TypeError(f"expected a uint8 or uint16 image, got {image.dtype!r}")


def unit_to_model_range(image: tf.Tensor, normalization: str = image_io.DEFAULT_NORMALIZATION
                        ) -> tf.Tensor:
  """[0, 1] -> the model's input (`image_io.NORMALIZATIONS`): the arithmetic of
  `image_io.normalize` (inference), so training, eval and prediction see bit-identical inputs."""
  return image_io.unit_to_model_input(image, normalization)


def denormalize_image(image: np.ndarray, normalization: str = image_io.DEFAULT_NORMALIZATION
                      ) -> np.ndarray:
  """Inverse of the normalisation on the host, for pictures: model input -> uint8."""
  unit = image_io.model_input_to_unit(image, normalization)
  return np.clip(np.round(unit * 255.0), 0, 255).astype(np.uint8)


class Resize(NamedTuple):
  """detectron2's ResizeShortestEdge: the shorter side to `shorter` (0 = as it is); then, where
  the longer side would exceed `max_longer` (0 = no cap), the longer side to `max_longer`
  instead. Aspect ratio kept. `shorter` may be a scalar tensor (a training draw)."""
  shorter: Any = 0
  max_longer: int = 0

  def __bool__(self) -> bool:
    return bool(self.max_longer) or not (isinstance(self.shorter, int) and self.shorter == 0)


def eval_resize(dataset: ml_collections.ConfigDict) -> Resize:
  """The deterministic resize of eval and predict: dataset.resize, capped by dataset.max_longer_side."""
  return Resize(int(dataset.resize), int(dataset.max_longer_side))


def resized_shape(height, width, rule: Resize):
  """(height, width) after `rule`, rounded half up, each at least 1.

  Integer arithmetic, so that tf (in the pipeline) and Python ints (eval canvas
  sizes computed on the host) give the same numbers. Works on both.
  """
  if isinstance(height, tf.Tensor):
    as_int = lambda v: tf.cast(v, height.dtype)
    short, long_ = tf.minimum(height, width), tf.maximum(height, width)
    shorter = tf.where(as_int(rule.shorter) > 0, as_int(rule.shorter), short)
    where, maximum = tf.where, tf.maximum
  else:
    as_int = int
    short, long_ = min(height, width), max(height, width)
    shorter = rule.shorter or short
    where, maximum = (lambda c, a, b: a if c else b), max
  numerator, denominator = shorter, short
  if rule.max_longer:
    cap = as_int(rule.max_longer)
    capped = long_ * shorter > cap * short
    numerator, denominator = where(capped, cap, shorter), where(capped, long_, short)
  return (maximum((height * numerator + denominator // 2) // denominator, 1),
          maximum((width * numerator + denominator // 2) // denominator, 1))


def resize_shorter_side(image, mask, rule: Resize):
  """Image bilinear, mask nearest, resized by `rule` (an empty rule leaves them unchanged)."""
  if not rule:
    return image, mask
  shape = tf.shape(mask, out_type=tf.int64)
  new_h, new_w = resized_shape(shape[0], shape[1], rule)
  size = tf.cast(tf.stack([new_h, new_w]), tf.int32)
  image = tf.image.resize(image, size, method="bilinear")
  mask = _resize_labels(mask, size)
  return image, mask


def _resize_labels(mask, size):
  """Nearest-neighbour resize of a label map [H, W] or a stack [H, W, K]."""
  if mask.shape.rank == 2:
    return tf.image.resize(mask[..., None], size, method="nearest")[..., 0]
  return tf.image.resize(mask, size, method="nearest")


def _label_paddings(mask, paddings):
  """`paddings` of the two spatial axes, extended by no padding on a stack's channel axis."""
  return paddings + [[0, 0]] * (mask.shape.rank - 2)


def pad_to_canvas(image, mask, canvas: tuple[int, int], *, ignore_label: int):
  """Fits an eval example onto a fixed `canvas` (H, W): downscale if larger, then pad.

  An image larger than the canvas in either side is first downscaled (aspect
  kept; image bilinear, mask nearest) so that it fits. Padding goes to the
  bottom and right: zeros in the image (black, as the training crops pad) and
  `ignore_label` in the mask, so padded pixels never count in metrics.
  Returns float image [H, W, C] and int32 mask [H, W] of static shape.
  """
  ch, cw = canvas
  shape = tf.shape(mask, out_type=tf.int64)
  h, w = shape[0], shape[1]
  too_big = tf.logical_or(h > ch, w > cw)
  # Height-limited if h/w >= ch/cw; integer products avoid float ties.
  height_limited = h * cw >= w * ch
  fit_h = tf.where(height_limited, tf.constant(ch, tf.int64), tf.maximum(h * cw // w, 1))
  fit_w = tf.where(height_limited, tf.maximum(w * ch // h, 1), tf.constant(cw, tf.int64))
  new_hw = tf.cast(tf.where(too_big, tf.stack([fit_h, fit_w]), tf.stack([h, w])), tf.int32)
  image = tf.cond(too_big, lambda: tf.image.resize(image, new_hw, method="bilinear"),
                  lambda: tf.cast(image, tf.float32))
  mask = tf.cond(too_big, lambda: _resize_labels(mask, new_hw), lambda: mask)
  pad_h, pad_w = ch - new_hw[0], cw - new_hw[1]
  image = tf.pad(image, [[0, pad_h], [0, pad_w], [0, 0]])
  mask = tf.pad(tf.cast(mask, tf.int32) - ignore_label,
                _label_paddings(mask, [[0, pad_h], [0, pad_w]])) + ignore_label
  channels = image.shape[-1]
  return (tf.ensure_shape(image, [ch, cw, channels]),
          tf.ensure_shape(mask, [ch, cw] + mask.shape.as_list()[2:]))


def random_scale_crop(image, mask, seed, *, size: int, min_scale: float, max_scale: float,
                      ignore_label: int):
  """Rescales by a random factor, then takes a random `size`x`size` crop.

  Image bilinear, mask nearest. Where the scaled image is smaller than the crop,
  the image is padded with zeros and the mask with `ignore_label`, so padding
  never counts in the loss.
  """
  seeds = tf.random.experimental.stateless_split(seed, 3)
  scale = tf.random.stateless_uniform([], seeds[0], min_scale, max_scale)
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  new_hw = tf.cast(tf.round(tf.stack([h, w]) * scale), tf.int32)
  image = tf.image.resize(image, new_hw, method="bilinear")
  mask = _resize_labels(mask, new_hw)
  # Pad (mask + 1) with zeros so that padding becomes ignore_label after the shift back.
  pad_h = tf.maximum(size - new_hw[0], 0)
  pad_w = tf.maximum(size - new_hw[1], 0)
  offset = tf.random.stateless_uniform([2], seeds[1], 0, 1)
  top = tf.cast(tf.cast(pad_h, tf.float32) * offset[0], tf.int32)
  left = tf.cast(tf.cast(pad_w, tf.float32) * offset[1], tf.int32)
  paddings = [[top, pad_h - top], [left, pad_w - left]]
  image = tf.pad(image, paddings + [[0, 0]])
  shifted = tf.pad(tf.cast(mask, tf.int32) + 1, _label_paddings(mask, paddings))
  mask = tf.where(shifted == 0, ignore_label, shifted - 1)
  labels = mask[..., None] if mask.shape.rank == 2 else mask
  stacked = tf.concat([image, tf.cast(labels, tf.float32)], axis=-1)
  channels, label_channels = image.shape[-1], labels.shape[-1]
  stacked = tf.image.stateless_random_crop(stacked, [size, size, channels + label_channels],
                                           seeds[2])
  labels = tf.cast(stacked[..., channels:], tf.int32)
  return stacked[..., :channels], labels[..., 0] if mask.shape.rank == 2 else labels


def random_flips(image, mask, seed, *, horizontal: bool, vertical: bool):
  draws = tf.random.stateless_uniform([2], seed)
  if horizontal:
    flip = draws[0] < 0.5
    image = tf.cond(flip, lambda: image[:, ::-1], lambda: image)
    mask = tf.cond(flip, lambda: mask[:, ::-1], lambda: mask)
  if vertical:
    flip = draws[1] < 0.5
    image = tf.cond(flip, lambda: image[::-1], lambda: image)
    mask = tf.cond(flip, lambda: mask[::-1], lambda: mask)
  return image, mask


def color_jitter(image, seed, *, brightness: float, contrast: float, saturation: float,
                 hue: float):
  """Photometric jitter of a float RGB image in [0, 1]; the mask is unaffected.

  Only 3-channel images are jittered: for grey or multi-band images the
  photometric meaning of these operations is unclear, so they pass unchanged.
  """
  if image.shape[-1] != 3:
    return image
  seeds = tf.random.experimental.stateless_split(seed, 4)
  x = image
  if brightness:
    x = tf.image.stateless_random_brightness(x, brightness, seeds[0])
  if contrast:
    x = tf.image.stateless_random_contrast(x, 1 - contrast, 1 + contrast, seeds[1])
  if saturation:
    x = tf.image.stateless_random_saturation(x, 1 - saturation, 1 + saturation, seeds[2])
  if hue:
    x = tf.image.stateless_random_hue(x, hue, seeds[3])
  return tf.clip_by_value(x, 0.0, 1.0)


def train_augment(image, mask, seed, *, aug: ml_collections.ConfigDict, size: int,
                  ignore_label: int, resize: Resize = Resize(),
                  resize_range: tuple[int, int] = (0, 0),
                  normalization: str = image_io.DEFAULT_NORMALIZATION):
  """Training view of one example: returns (float32 model input [size, size, C], int32 mask).

  `image` is uint8 or uint16 [H, W, C] of any size. Optional resize (`resize`; with a
  `resize_range` (lo, hi), the shorter side is drawn uniformly from lo..hi instead, as
  detectron2's ResizeShortestEdge trains, still capped by `resize.max_longer`), then joint
  random scale-and-crop (padding with ignore_label where the scaled image is smaller than the
  crop) and flips, then colour jitter (RGB only), then the same normalisation as eval.
  """
  seeds = tf.random.experimental.stateless_split(seed, 3)
  image = to_unit_range(image)
  if tuple(resize_range) != (0, 0):
    # Its own stream (folded in), so the other draws stay as without a range.
    shorter = tf.random.stateless_uniform(
        [], tf.random.experimental.stateless_fold_in(seed, 3), resize_range[0],
        resize_range[1] + 1, dtype=tf.int64)
    resize = Resize(shorter, resize.max_longer)
  image, mask = resize_shorter_side(image, mask, resize)
  image, mask = random_scale_crop(image, mask, seeds[0], size=size, min_scale=aug.min_scale,
                                  max_scale=aug.max_scale, ignore_label=ignore_label)
  image, mask = random_flips(image, mask, seeds[1], horizontal=aug.hflip, vertical=aug.vflip)
  image = color_jitter(image, seeds[2], brightness=aug.brightness, contrast=aug.contrast,
                       saturation=aug.saturation, hue=aug.hue)
  return unit_to_model_range(image, normalization), mask


def eval_view(image, mask, *, canvas: tuple[int, int], ignore_label: int,
              resize: Resize = Resize(), normalization: str = image_io.DEFAULT_NORMALIZATION):
  """Eval view of one example: (float32 model input [H, W, C], int32 mask [H, W]).

  Optional resize (`eval_resize`), then `pad_to_canvas`; padding is black
  (0 before normalisation) like the training crops' padding, and `ignore_label` in the mask.
  """
  image = to_unit_range(image)
  image, mask = resize_shorter_side(image, mask, resize)
  image, mask = pad_to_canvas(image, mask, canvas, ignore_label=ignore_label)
  return unit_to_model_range(image, normalization), mask


# ---------------------------------------------------------------------------- instances

def pad_instances(instance_masks, classes, max_instances: int):
  """Pads (or cuts) `[N, H, W]` masks and `[N]` classes to `max_instances`; padding has class 0.

  Returns (masks uint8 [M, H, W], classes int32 [M], N). Callers check N <= M
  on the host, where the error can name the example.
  """
  count = tf.shape(classes)[0]
  masks = tf.cast(instance_masks[:max_instances], tf.uint8)
  classes = tf.cast(classes[:max_instances], tf.int32)
  missing = max_instances - tf.shape(classes)[0]
  masks = tf.pad(masks, [[0, missing], [0, 0], [0, 0]])
  classes = tf.pad(classes, [[0, missing]])
  return (tf.ensure_shape(masks, [max_instances] + instance_masks.shape.as_list()[1:]),
          tf.ensure_shape(classes, [max_instances]), count)


def pack_instances(mask, instance_masks, crowd=None):
  """Semantic mask [H, W] and instance masks [M, H, W] -> one label stack int32 [H, W, 1 + M]
  (with a crowd region [H, W], [H, W, 2 + M]: it is channel 1)."""
  extra = [] if crowd is None else [tf.cast(crowd, tf.int32)[..., None]]
  return tf.concat([tf.cast(mask, tf.int32)[..., None], *extra,
                    tf.transpose(tf.cast(instance_masks, tf.int32), [1, 2, 0])], axis=-1)


def boxes_from_masks(instance_masks):
  """Tight boxes float32 [M, 4] (y0, x0, y1, x1; y1/x1 exclusive) of bool masks [M, H, W];
  zeros for an empty mask."""
  def extent(occupied):                                   # [M, L] bool -> first, last + 1
    length = tf.shape(occupied)[1]
    as_int = tf.cast(occupied, tf.int32)
    first = tf.argmax(as_int, axis=1, output_type=tf.int32)
    last = length - tf.argmax(as_int[:, ::-1], axis=1, output_type=tf.int32)
    return first, last
  rows = tf.reduce_any(instance_masks, axis=2)
  cols = tf.reduce_any(instance_masks, axis=1)
  y0, y1 = extent(rows)
  x0, x1 = extent(cols)
  present = tf.reduce_any(rows, axis=1)
  boxes = tf.cast(tf.stack([y0, x0, y1, x1], axis=1), tf.float32)
  return tf.where(present[:, None], boxes, 0.0)


def unpack_instances(stack, classes, *, with_crowd: bool = False):
  """Inverse of `pack_instances` after transforms: {'mask', 'instance_masks', 'boxes', 'classes'}
  (and 'crowd' uint8 [H, W] `with_crowd`).

  An instance with no pixel left (cropped away) gets class 0, the padding
  class; boxes are re-read from the transformed masks, so they stay tight.
  Padding of a crop (ignore label in every channel) belongs to no instance and no crowd.
  """
  first = 2 if with_crowd else 1
  instance_masks = tf.transpose(stack[..., first:], [2, 0, 1]) == 1
  present = tf.reduce_any(instance_masks, axis=[1, 2])
  out = {"mask": stack[..., 0], "instance_masks": tf.cast(instance_masks, tf.uint8),
         "boxes": boxes_from_masks(instance_masks),
         "classes": tf.where(present, tf.cast(classes, tf.int32), 0)}
  if with_crowd:
    out["crowd"] = tf.cast(stack[..., 1] == 1, tf.uint8)
  return out
