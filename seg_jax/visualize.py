"""Host-side pictures: class palettes, mask overlays and image | truth | prediction panels."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image


def palette(num_classes: int, ignore_label: int = 255) -> np.ndarray:
  """uint8 [max(num_classes, ignore_label + 1), 3]: black background, distinct hues, white ignore."""
  size = max(num_classes, ignore_label + 1)
  colors = np.zeros((size, 3), np.uint8)
  golden = 0.618033988749895  # golden-ratio hue steps keep neighbouring ids far apart
  for c in range(1, num_classes):
    hue = (c * golden) % 1.0
    value = 1.0 if (c // 7) % 2 == 0 else 0.7  # alternate brightness for many classes
    colors[c] = np.round(np.array(colorsys.hsv_to_rgb(hue, 0.85, value)) * 255)
  if ignore_label < size:
    colors[ignore_label] = 255
  return colors


def colorize(mask: np.ndarray, num_classes: int, ignore_label: int = 255) -> np.ndarray:
  """int [H, W] class ids -> uint8 [H, W, 3] colours."""
  colors = palette(num_classes, ignore_label)
  return colors[np.clip(mask, 0, len(colors) - 1)]


def overlay(image: np.ndarray, mask: np.ndarray, num_classes: int, *, alpha: float = 0.5,
            ignore_label: int = 255) -> np.ndarray:
  """Blends class colours over a uint8 [H, W, 3] image; background (0) stays unblended."""
  image = image if image.shape[-1] == 3 else np.repeat(image[..., :1], 3, axis=-1)
  color = colorize(mask, num_classes, ignore_label).astype(np.float32)
  out = image.astype(np.float32)
  blend = (mask > 0)[..., None]
  out = np.where(blend, (1 - alpha) * out + alpha * color, out)
  return np.round(out).astype(np.uint8)


def panels(images: np.ndarray, truths: np.ndarray, predictions: np.ndarray, num_classes: int, *,
           ignore_label: int = 255, scale: int = 1) -> np.ndarray:
  """One row per example: image | ground-truth overlay | prediction overlay.

  images uint8 [N, H, W, C]; truths and predictions int [N, H, W]. Returns
  uint8 [N*(H+2), 3*(W+2), 3] with a 2-pixel white grid, upscaled by `scale`.
  """
  rows = []
  for image, truth, pred in zip(images, truths, predictions):
    image = image if image.shape[-1] == 3 else np.repeat(image[..., :1], 3, axis=-1)
    cells = [image, overlay(image, truth, num_classes, ignore_label=ignore_label),
             overlay(image, pred, num_classes, ignore_label=ignore_label)]
    cells = [np.pad(c, ((1, 1), (1, 1), (0, 0)), constant_values=255) for c in cells]
    rows.append(np.concatenate(cells, axis=1))
  grid = np.concatenate(rows, axis=0)
  return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def write_png(path: str, image: np.ndarray) -> None:
  Image.fromarray(image).save(path)
