"""Host-side pictures: class palettes, legends, mask overlays, image | truth | prediction panels,
and instances (masks, boxes, class names, scores) drawn on images.

The palette must stay readable from 2 to 150+ classes: class 0 (background)
is black, the ignore label is neutral grey, and every other class gets the
next colour of a fixed sequence chosen by farthest-point sampling in CIELAB
(each new colour is the sRGB colour perceptually farthest from all earlier
ones, black, grey and white). The sequence does not depend on the number of
classes, so class 3 has the same colour in every model; 150 classes stay at
least ~15 CIELAB units (several just-noticeable differences) apart.

Legends (class swatches + names) are drawn with PIL's built-in default font,
so nothing is downloaded.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND_COLOR = (0, 0, 0)
IGNORE_COLOR = (128, 128, 128)
_LEGEND_PAPER = (255, 255, 255)
_LEGEND_INK = (0, 0, 0)
_SWATCH_BORDER = (64, 64, 64)


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
  """uint8-range sRGB [N, 3] -> CIELAB [N, 3] (D65 white)."""
  c = np.asarray(rgb, np.float64) / 255.0
  linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
  to_xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722],
                     [0.0193, 0.1192, 0.9505]])
  xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
  delta = 6 / 29
  f = np.where(xyz > delta ** 3, np.cbrt(xyz), xyz / (3 * delta ** 2) + 4 / 29)
  return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], -1)


@functools.lru_cache(maxsize=1)
def _candidate_colors() -> tuple[np.ndarray, np.ndarray]:
  """A 16-level sRGB grid, without colours too dark to see on black or too pale."""
  levels = np.round(np.linspace(0, 255, 16))
  grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
  lab = _srgb_to_lab(grid)
  keep = (lab[:, 0] >= 30) & (lab[:, 0] <= 90)
  return grid[keep].astype(np.uint8), lab[keep]


@functools.lru_cache(maxsize=8)
def _class_color_sequence(count: int) -> np.ndarray:
  """uint8 [count, 3]: the first `count` colours of the farthest-point sequence."""
  colors, lab = _candidate_colors()
  taken = _srgb_to_lab(np.array([BACKGROUND_COLOR, IGNORE_COLOR, (255, 255, 255)]))
  distance = ((lab[:, None] - taken[None]) ** 2).sum(-1).min(axis=1)
  order = []
  for _ in range(min(count, len(colors))):
    pick = int(np.argmax(distance))  # ties go to the lowest index: deterministic
    order.append(pick)
    distance = np.minimum(distance, ((lab - lab[pick]) ** 2).sum(-1))
  sequence = colors[order]
  # More classes than candidates (thousands): colours repeat.
  return np.resize(sequence, (count, 3)) if count > len(sequence) else sequence


def palette(num_classes: int, ignore_label: int = 255) -> np.ndarray:
  """uint8 [max(num_classes, ignore_label + 1), 3]: black background, distinct classes, grey ignore."""
  size = max(num_classes, ignore_label + 1)
  colors = np.zeros((size, 3), np.uint8)
  colors[0] = BACKGROUND_COLOR
  if num_classes > 1:
    colors[1:num_classes] = _class_color_sequence(num_classes - 1)
  if 0 <= ignore_label < size:
    colors[ignore_label] = IGNORE_COLOR
  return colors


def colorize(mask: np.ndarray, num_classes: int, ignore_label: int = 255) -> np.ndarray:
  """int [H, W] class ids -> uint8 [H, W, 3] colours."""
  colors = palette(num_classes, ignore_label)
  return colors[np.clip(mask, 0, len(colors) - 1)]


def as_rgb(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W, C] -> [H, W, 3]: grey repeated, extra bands dropped."""
  if image.shape[-1] == 3:
    return image
  if image.shape[-1] < 3:
    return np.repeat(image[..., :1], 3, axis=-1)
  return image[..., :3]


def overlay(image: np.ndarray, mask: np.ndarray, num_classes: int, *, alpha: float = 0.5,
            ignore_label: int = 255) -> np.ndarray:
  """Blends class colours over a uint8 [H, W, C] image; background (0) stays unblended."""
  image = as_rgb(image)
  color = colorize(mask, num_classes, ignore_label).astype(np.float32)
  out = image.astype(np.float32)
  blend = (mask > 0)[..., None]
  out = np.where(blend, (1 - alpha) * out + alpha * color, out)
  return np.round(out).astype(np.uint8)


# ---------------------------------------------------------------------------- legends

def classes_present(masks: Sequence[np.ndarray] | np.ndarray, num_classes: int,
                    ignore_label: int = 255) -> list[int]:
  """Sorted class ids occurring in `masks` (ignore_label last if present)."""
  found: set[int] = set()
  for mask in masks if isinstance(masks, (list, tuple)) else [masks]:
    values = np.asarray(mask).ravel()
    counts = np.bincount(np.clip(values, 0, max(num_classes, ignore_label + 1)).astype(np.int64))
    found.update(int(i) for i in np.nonzero(counts)[0])
  ids = sorted(i for i in found if i < num_classes)
  return ids + ([ignore_label] if ignore_label in found else [])


def legend_entries(class_ids: Sequence[int], class_names: Sequence[str] | None, num_classes: int,
                   ignore_label: int = 255) -> list[tuple[str, tuple[int, int, int]]]:
  """(label text, colour) per class id: 'id name', or 'ignore' for the ignore label."""
  colors = palette(num_classes, ignore_label)
  entries = []
  for c in class_ids:
    if c == ignore_label:
      text = "ignore"
    elif class_names is not None and c < len(class_names):
      text = f"{c} {class_names[c]}"
    else:
      text = str(c)
    entries.append((text, tuple(int(v) for v in colors[c])))
  return entries


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
  # PIL's embedded font, scalable when PIL has FreeType (a fixed bitmap font otherwise).
  return ImageFont.load_default(size=size)


def legend_font_size(width: int) -> int:
  """Text height for a legend under a picture `width` pixels wide: readable, not dominant."""
  return int(np.clip(width // 50, 12, 48))


def legend(entries: Sequence[tuple[str, tuple[int, int, int]]], width: int, *,
           font_size: int = 12) -> np.ndarray:
  """uint8 [h, max(width, one column), 3]: swatches and names in columns, on white.

  Each swatch is a square of the exact class colour with a dark grey border
  (so that black and pale swatches show on white paper).
  """
  font = _font(font_size)
  swatch = font_size + 4
  pad = max(4, font_size // 2)
  text_w = max([int(np.ceil(font.getlength(text))) for text, _ in entries] + [1])
  column = swatch + pad + text_w + 2 * pad
  width = max(width, column + pad)
  columns = max(1, min(len(entries), (width - pad) // column))
  rows = -(-len(entries) // columns) if entries else 0
  row_h = swatch + pad
  height = pad + rows * row_h
  picture = Image.new("RGB", (width, height), _LEGEND_PAPER)
  draw = ImageDraw.Draw(picture)
  for i, (text, color) in enumerate(entries):
    row, col = divmod(i, columns)
    x, y = pad + col * column, pad + row * row_h
    draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=tuple(color),
                   outline=_SWATCH_BORDER)
    draw.text((x + swatch + pad, y + swatch // 2), text, fill=_LEGEND_INK, font=font, anchor="lm")
  return np.asarray(picture)


def with_legend(picture: np.ndarray, entries: Sequence[tuple[str, tuple[int, int, int]]], *,
                font_size: int | None = None) -> np.ndarray:
  """The uint8 [H, W, 3] picture with a legend strip below it (white-padded to equal widths)."""
  if not entries:
    return picture
  font_size = font_size or legend_font_size(picture.shape[1])
  strip = legend(entries, picture.shape[1], font_size=font_size)
  if strip.shape[1] > picture.shape[1]:
    picture = np.pad(picture, ((0, 0), (0, strip.shape[1] - picture.shape[1]), (0, 0)),
                     constant_values=255)
  return np.concatenate([picture, strip], axis=0)


# ---------------------------------------------------------------------------- panels

def panels(images: np.ndarray, truths: np.ndarray, predictions: np.ndarray, num_classes: int, *,
           ignore_label: int = 255, scale: int = 1,
           class_names: Sequence[str] | None = None) -> np.ndarray:
  """One row per example: image | ground-truth overlay | prediction overlay.

  images uint8 [N, H, W, C]; truths and predictions int [N, H, W]. Returns
  uint8 [N*(H+2), 3*(W+2), 3] with a 2-pixel white grid, upscaled by `scale`,
  and, given `class_names`, a legend of the classes shown below it.
  """
  rows = []
  for image, truth, pred in zip(images, truths, predictions):
    image = as_rgb(image)
    cells = [image, overlay(image, truth, num_classes, ignore_label=ignore_label),
             overlay(image, pred, num_classes, ignore_label=ignore_label)]
    cells = [np.pad(c, ((1, 1), (1, 1), (0, 0)), constant_values=255) for c in cells]
    rows.append(np.concatenate(cells, axis=1))
  grid = np.concatenate(rows, axis=0)
  grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
  if class_names is None:
    return grid
  shown = classes_present([np.asarray(truths), np.asarray(predictions)], num_classes, ignore_label)
  return with_legend(grid, legend_entries(shown, class_names, num_classes, ignore_label))


def draw_instances(image: np.ndarray, boxes: np.ndarray, classes: np.ndarray, *,
                   num_classes: int, masks: np.ndarray | None = None,
                   scores: np.ndarray | None = None, class_names: Sequence[str] | None = None,
                   scale: int = 1, alpha: float = 0.5) -> np.ndarray:
  """Instances drawn on a uint8 [H, W, C] image, upscaled by `scale`: each mask blended in its
  class colour, its box outlined in that colour, and a label 'name' or 'name 0.93' above it.

  boxes [K, 4] (y0, x0, y1, x1) in pixels of the unscaled image; classes [K] (1..);
  masks [K, H, W] binary. Lower-scored instances are drawn first, so the best ones stay on top.
  """
  colors = palette(num_classes)
  picture = as_rgb(image).astype(np.float32)
  order = np.argsort(scores, kind="stable") if scores is not None else np.arange(len(classes))
  if masks is not None:
    for k in order:
      m = np.asarray(masks[k]).astype(bool)[..., None]
      picture = np.where(m, (1 - alpha) * picture + alpha * colors[classes[k]], picture)
  picture = np.round(picture).astype(np.uint8).repeat(scale, axis=0).repeat(scale, axis=1)
  canvas = Image.fromarray(picture)
  draw = ImageDraw.Draw(canvas)
  font = _font(max(10, 3 * scale))
  for k in order:
    color = tuple(int(v) for v in colors[classes[k]])
    y0, x0, y1, x1 = (float(v) * scale for v in boxes[k])
    draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=color, width=max(1, scale // 2))
    name = (class_names[classes[k]] if class_names is not None and classes[k] < len(class_names)
            else str(int(classes[k])))
    text = name if scores is None else f"{name} {float(scores[k]):.2f}"
    left, top, right, bottom = draw.textbbox((x0, y0), text, font=font, anchor="lb")
    top, bottom = (top, bottom) if top >= 0 else (top - top, bottom - top)  # keep it inside
    draw.rectangle([left, top, right, bottom], fill=color)
    ink = (0, 0, 0) if sum(color) > 382 else (255, 255, 255)
    draw.text((left, bottom), text, fill=ink, font=font, anchor="lb")
  return np.asarray(canvas)


def instance_panels(images: np.ndarray, truths: Sequence[dict], predictions: Sequence[dict], *,
                    num_classes: int, class_names: Sequence[str] | None = None,
                    scale: int = 1) -> np.ndarray:
  """One row per example: image | ground-truth instances | detected instances (with scores).

  `truths[i]` and `predictions[i]` hold the keyword arguments of `draw_instances` (boxes,
  classes, masks, and scores for predictions) of image i. A legend of the classes drawn
  follows, given `class_names`.
  """
  rows, shown = [], set()
  for image, truth, pred in zip(images, truths, predictions):
    plain = as_rgb(image).repeat(scale, axis=0).repeat(scale, axis=1)
    cells = [plain] + [draw_instances(image, num_classes=num_classes, class_names=class_names,
                                      scale=scale, **instances) for instances in (truth, pred)]
    shown.update(int(c) for c in np.concatenate([truth["classes"], pred["classes"]]))
    cells = [np.pad(c, ((2, 2), (2, 2), (0, 0)), constant_values=255) for c in cells]
    rows.append(np.concatenate(cells, axis=1))
  grid = np.concatenate(rows, axis=0)
  if class_names is None:
    return grid
  return with_legend(grid, legend_entries(sorted(shown), class_names, num_classes))


def write_png(path: str, image: np.ndarray) -> None:
  Image.fromarray(image).save(path)


def mid_slices(volume: np.ndarray, spacing) -> list[np.ndarray]:
  """The axial, coronal and sagittal mid-slices of a [D, H, W, ...] volume, with rows repeated
  so that a thick-slice axis (D) is drawn at roughly its physical size."""
  d, h, w = volume.shape[:3]
  repeat = max(1, round(float(spacing[0]) / float(min(spacing[1], spacing[2]))))
  return [volume[d // 2], volume[:, h // 2].repeat(repeat, axis=0),
          volume[:, :, w // 2].repeat(repeat, axis=0)]


def volume_panels(image: np.ndarray, truth: np.ndarray | None, prediction: np.ndarray,
                  num_classes: int, *, spacing=(1.0, 1.0, 1.0), ignore_label: int = 255,
                  class_names: Sequence[str] | None = None) -> np.ndarray:
  """One row per view (axial, coronal, sagittal mid-slice) of a volume: image | truth overlay |
  prediction overlay (no truth: image | prediction overlay).

  image: uint8 [D, H, W, C]; truth, prediction: int [D, H, W]. Each row is as tall as its own
  view (the views' aspect ratios differ: a thick-slice coronal view is taller than the axial
  one), and narrower rows are padded (white) on the right; returns uint8 [rows, cols, 3] with a
  legend given `class_names`.
  """
  views = zip(mid_slices(image, spacing), mid_slices(prediction, spacing),
              mid_slices(truth, spacing) if truth is not None else [None] * 3)
  rows = []
  for image_view, pred_view, truth_view in views:
    rgb = as_rgb(image_view)
    cells = [rgb] + ([] if truth_view is None else
                     [overlay(rgb, truth_view, num_classes, ignore_label=ignore_label)])
    cells.append(overlay(rgb, pred_view, num_classes, ignore_label=ignore_label))
    rows.append(np.concatenate([np.pad(c, ((1, 1), (1, 1), (0, 0)), constant_values=255)
                                for c in cells], axis=1))
  width = max(row.shape[1] for row in rows)
  grid = np.concatenate([np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0)),
                                constant_values=255) for row in rows], axis=0)
  if class_names is None:
    return grid
  shown = classes_present([prediction] + ([] if truth is None else [truth]), num_classes,
                          ignore_label)
  return with_legend(grid, legend_entries(shown, class_names, num_classes, ignore_label))


def window_intensities(image: np.ndarray, low: float = -2.5, high: float = 2.5) -> np.ndarray:
  """float (normalised) intensities -> uint8, clipped to [low, high] (z-scores: +-2.5 sd)."""
  scaled = (np.clip(np.asarray(image, np.float32), low, high) - low) / (high - low)
  return np.round(scaled * 255).astype(np.uint8)
