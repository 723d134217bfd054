"""Augmentations applied jointly to an image and its mask (TensorFlow, in tf.data).

All randomness is stateless: every example gets its own seed, so the augmented
stream is a pure function of (config.seed, position in the stream).
"""

from __future__ import annotations

import ml_collections
import numpy as np
import tensorflow as tf


def normalize_image(image: tf.Tensor) -> tf.Tensor:
  """Pixel values in [0, 255] (any dtype) -> float32 in [-1, 1]."""
  return tf.cast(image, tf.float32) / 127.5 - 1.0


def denormalize_image(image: np.ndarray) -> np.ndarray:
  """Inverse of `normalize_image` on the host: float [-1, 1] -> uint8."""
  return np.clip(np.round((np.asarray(image, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


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
  mask = tf.image.resize(mask[..., None], new_hw, method="nearest")[..., 0]
  # Pad (mask + 1) with zeros so that padding becomes ignore_label after the shift back.
  pad_h = tf.maximum(size - new_hw[0], 0)
  pad_w = tf.maximum(size - new_hw[1], 0)
  offset = tf.random.stateless_uniform([2], seeds[1], 0, 1)
  top = tf.cast(tf.cast(pad_h, tf.float32) * offset[0], tf.int32)
  left = tf.cast(tf.cast(pad_w, tf.float32) * offset[1], tf.int32)
  paddings = [[top, pad_h - top], [left, pad_w - left]]
  image = tf.pad(image, paddings + [[0, 0]])
  shifted = tf.pad(tf.cast(mask, tf.int32) + 1, paddings)
  mask = tf.where(shifted == 0, ignore_label, shifted - 1)
  stacked = tf.concat([image, tf.cast(mask, tf.float32)[..., None]], axis=-1)
  channels = image.shape[-1]
  stacked = tf.image.stateless_random_crop(stacked, [size, size, channels + 1], seeds[2])
  return stacked[..., :channels], tf.cast(stacked[..., channels], tf.int32)


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
  """Photometric jitter of a float image in [0, 255]; the mask is unaffected."""
  seeds = tf.random.experimental.stateless_split(seed, 4)
  x = image / 255.0
  if brightness:
    x = tf.image.stateless_random_brightness(x, brightness, seeds[0])
  if contrast:
    x = tf.image.stateless_random_contrast(x, 1 - contrast, 1 + contrast, seeds[1])
  if x.shape[-1] == 3:
    if saturation:
      x = tf.image.stateless_random_saturation(x, 1 - saturation, 1 + saturation, seeds[2])
    if hue:
      x = tf.image.stateless_random_hue(x, hue, seeds[3])
  return tf.clip_by_value(x, 0.0, 1.0) * 255.0


def train_augment(image_uint8, mask, seed, *, aug: ml_collections.ConfigDict, size: int,
                  ignore_label: int):
  """Joint scale-crop and flips of image+mask, then colour jitter; returns (float image, int32 mask)."""
  seeds = tf.random.experimental.stateless_split(seed, 3)
  image = tf.cast(image_uint8, tf.float32)
  image, mask = random_scale_crop(image, mask, seeds[0], size=size, min_scale=aug.min_scale,
                                  max_scale=aug.max_scale, ignore_label=ignore_label)
  image, mask = random_flips(image, mask, seeds[1], horizontal=aug.hflip, vertical=aug.vflip)
  image = color_jitter(image, seeds[2], brightness=aug.brightness, contrast=aug.contrast,
                       saturation=aug.saturation, hue=aug.hue)
  return normalize_image(image), mask
