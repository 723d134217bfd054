"""Anchor boxes for each FPN level, as static host-side constants.

Anchors depend only on static shapes (feature-map sizes, strides, sizes, aspect
ratios), so they are computed once in numpy when a model is traced and enter the
jitted program as constants; nothing here runs per step.

Ordering (the contract with the RPN head): for one level with a feature map of
`H x W` cells and `A = len(sizes) * len(aspect_ratios)` anchors per cell, anchor
number `(i * W + j) * A + a` sits at cell row i, column j, and its shape is
`a = s * len(aspect_ratios) + r` for `sizes[s]`, `aspect_ratios[r]`. This is the
order of a head output `[N, H, W, A * k]` reshaped to `[N, H * W * A, k]`.
Levels are concatenated in the order given (P2 first for an FPN).

Shape: an anchor of size `s` and aspect ratio `r = height / width` has area
`s**2`, height `s * sqrt(r)` and width `s / sqrt(r)` (detectron2's convention;
unlike torchvision, corners are not rounded to integers).

Position: the anchors of cell (i, j) are centred at
`((i + offset) * stride, (j + offset) * stride)` in input pixels. The default
offset 0.5 puts them at the centre of the cell's `stride x stride` patch of the
image (detectron2 and torchvision default to 0.0, the patch's top-left corner,
which shifts every anchor by half a stride towards the origin).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
  """The `A` anchors of one cell, centred at the origin: float32 `[A, 4]` (y0, x0, y1, x1)."""
  shapes = []
  for size in sizes:
    for ratio in aspect_ratios:
      if size <= 0 or ratio <= 0:
        raise ValueError(f"anchor sizes and aspect ratios must be positive, got size {size}, ratio {ratio}")
      height = size * math.sqrt(ratio)
      width = size / math.sqrt(ratio)
      shapes.append((-height / 2, -width / 2, height / 2, width / 2))
  return np.asarray(shapes, np.float32).reshape(-1, 4)


def level_anchors(height: int, width: int, *, stride: float, sizes: Sequence[float],
                  aspect_ratios: Sequence[float], offset: float = 0.5) -> np.ndarray:
  """All anchors of one `height x width` feature map: float32 `[height * width * A, 4]`.

  Ordered row-major over cells, anchor shape fastest (see the module docstring).
  """
  centres_y = (np.arange(height, dtype=np.float64) + offset) * stride
  centres_x = (np.arange(width, dtype=np.float64) + offset) * stride
  cy, cx = np.meshgrid(centres_y, centres_x, indexing="ij")
  shifts = np.stack([cy, cx, cy, cx], axis=-1).reshape(-1, 1, 4)
  anchors = shifts + cell_anchors(sizes, aspect_ratios)[None].astype(np.float64)
  return anchors.reshape(-1, 4).astype(np.float32)


def feature_sizes(image_size: tuple[int, int], strides: Sequence[int]) -> list[tuple[int, int]]:
  """Feature-map `(H, W)` of each stride for an image of `image_size` (ceil division).

  Matches a backbone of stride-2 convolutions and poolings with 'SAME' padding;
  a model whose maps differ should pass its own sizes to `multilevel_anchors`.
  """
  return [(-(-image_size[0] // s), -(-image_size[1] // s)) for s in strides]


def multilevel_anchors(level_sizes: Sequence[tuple[int, int]], *, strides: Sequence[float],
                       sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[float],
                       offset: float = 0.5) -> list[np.ndarray]:
  """Anchors of every FPN level: one float32 `[H_l * W_l * A_l, 4]` array per level.

  Args:
    level_sizes: feature-map `(H_l, W_l)` per level, e.g. from `feature_sizes`.
    strides: input pixels per feature cell per level, e.g. (4, 8, 16, 32, 64) for P2-P6.
    sizes: anchor sizes per level, e.g. ((32,), (64,), (128,), (256,), (512,)).
    aspect_ratios: height / width ratios used at every level, e.g. (0.5, 1.0, 2.0).
    offset: cell-centre offset in strides (see the module docstring).

  `np.concatenate(result)` gives the anchors of all levels in the order of a
  head's per-level outputs concatenated P2 first.
  """
  if not len(level_sizes) == len(strides) == len(sizes):
    raise ValueError(f"need one stride and one size list per level: got {len(level_sizes)} levels, "
                     f"{len(strides)} strides, {len(sizes)} size lists")
  return [level_anchors(h, w, stride=s, sizes=level_size, aspect_ratios=aspect_ratios, offset=offset)
          for (h, w), s, level_size in zip(level_sizes, strides, sizes)]


def num_anchors_per_cell(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> int:
  """A, the number of anchors per feature cell (the RPN head's output multiplier)."""
  return len(sizes) * len(aspect_ratios)
