"""Sliding-window tiling: where the tiles go, how overlapping tiles are blended, row by row.

Host-side numpy only; `seg_jax/predict.py` runs the model on the tiles (volumes: the
volumetric task, `seg_jax/tasks/volumetric.py`, with the N-D plan and `SlabBlender` below).

A model sees square tiles of `tile_size` pixels, so one compiled function
serves images of every size. Tiles overlap by a fraction of their size; where
they overlap, their per-class probabilities are averaged with weights from a
separable raised-cosine (Hann) window, which falls smoothly towards each tile's
edges. Pixels near a tile edge (where the model saw little context) thus count
least, and the blend shows no seams.

Memory: `RowBandBlender` keeps only one band of `tile_size` rows of weighted
sums ([tile_size, W, K] float32) and hands out rows as soon as no later tile
covers them, so a 4000x4000 image with many classes never needs an
[H, W, K] array.

Conventions: tiles are visited row-major (top to bottom, left to right);
tile (r, c) covers rows ys[r]:ys[r]+tile_size and columns xs[c]:xs[c]+tile_size.
Along an axis shorter than a tile there is one tile, padded by the caller past
the image's end; only its first `length` pixels count.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import numpy as np


def tile_starts(length: int, tile_size: int, overlap: float) -> tuple[int, ...]:
  """First pixels of the tiles along one axis, ascending.

  The first tile starts at 0 and the last ends at `length`; the tiles between
  are spread evenly, so neighbours share at least round(overlap * tile_size)
  pixels (more where the spacing rounds down).
  """
  if length <= tile_size:
    return (0,)
  stride = max(1, tile_size - round(overlap * tile_size))
  gaps = math.ceil((length - tile_size) / stride)
  return tuple(i * (length - tile_size) // gaps for i in range(gaps + 1))


@dataclasses.dataclass(frozen=True)
class TilePlan:
  """Tile positions for one image of `height` x `width` pixels."""
  height: int
  width: int
  tile_size: int
  ys: tuple[int, ...]  # top rows of the tile rows
  xs: tuple[int, ...]  # left columns of the tile columns

  @property
  def num_tiles(self) -> int:
    return len(self.ys) * len(self.xs)

  def positions(self) -> Iterator[tuple[int, int]]:
    """(top, left) of every tile, row-major."""
    for y in self.ys:
      for x in self.xs:
        yield y, x


def plan_tiles(height: int, width: int, tile_size: int, overlap: float) -> TilePlan:
  return TilePlan(height, width, tile_size, tile_starts(height, tile_size, overlap),
                  tile_starts(width, tile_size, overlap))


def blend_window(tile_size: int) -> np.ndarray:
  """float32 [tile_size, tile_size]: separable Hann window, sin^2(pi (i + 0.5) / T).

  Sampled at pixel centres, so it is positive everywhere (a pixel covered by a
  single tile keeps exactly that tile's probabilities) and symmetric (flips
  of a tile get the same weights).
  """
  centres = (np.arange(tile_size, dtype=np.float64) + 0.5) / tile_size
  profile = np.sin(np.pi * centres) ** 2
  return np.outer(profile, profile).astype(np.float32)


def extract_tile(image: np.ndarray, y: int, x: int, tile_size: int) -> np.ndarray:
  """image[y:y+T, x:x+T], reflect-padded past the image's end to [T, T, ...]."""
  tile = image[y:y + tile_size, x:x + tile_size]
  pad_h, pad_w = tile_size - tile.shape[0], tile_size - tile.shape[1]
  if pad_h or pad_w:
    pads = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (tile.ndim - 2)
    tile = np.pad(tile, pads, mode="reflect")
  return tile


class RowBandBlender:
  """Window-weighted average of overlapping tile probabilities, finished band by band.

  Feed tiles in row-major plan order with `add`. When the last tile of tile
  row r arrives, rows ys[r]:ys[r+1] (to the image's end after the last tile
  row) are covered by no later tile; `add` then returns them as
  (first row, float32 [rows, W, K] probabilities). Tile row r lies within
  rows ys[r]:ys[r]+T, so a band of T rows holds everything still open.
  """

  def __init__(self, plan: TilePlan, num_classes: int):
    self.plan = plan
    self._window = blend_window(plan.tile_size)[..., None]
    band_rows = min(plan.tile_size, plan.height)
    self._sums = np.zeros((band_rows, plan.width, num_classes), np.float32)
    self._weights = np.zeros((band_rows, plan.width, 1), np.float32)
    self._top = 0      # image row held in band row 0
    self._count = 0    # tiles added so far

  def add(self, probabilities: np.ndarray) -> tuple[int, np.ndarray] | None:
    """Adds the next tile's [T, T, K] probabilities; returns finished rows, if any."""
    plan = self.plan
    if self._count >= plan.num_tiles:
      raise ValueError(f"all {plan.num_tiles} tiles of the plan were already added")
    row, col = divmod(self._count, len(plan.xs))
    self._count += 1
    y, x = plan.ys[row], plan.xs[col]
    h, w = min(plan.tile_size, plan.height - y), min(plan.tile_size, plan.width - x)
    window = self._window[:h, :w]
    band = slice(y - self._top, y - self._top + h)
    self._sums[band, x:x + w] += probabilities[:h, :w] * window
    self._weights[band, x:x + w] += window
    if col < len(plan.xs) - 1:
      return None
    end = plan.ys[row + 1] if row + 1 < len(plan.ys) else plan.height
    first, self._top = self._top, end
    return first, _release(self._sums, self._weights, end - first)


def _release(sums: np.ndarray, weights: np.ndarray, rows: int) -> np.ndarray:
  """The blended first `rows` rows of a band's running sums and weights; both buffers then move
  up by those rows."""
  finished = sums[:rows] / weights[:rows]
  for buffer in (sums, weights):
    _shift_up(buffer, rows)
  return finished


def _shift_up(buffer: np.ndarray, rows: int) -> None:
  """buffer[:-rows] = buffer[rows:], then zeros below, without a band-sized temporary.

  Copies in chunks of at most `rows` rows, so source and destination of each
  copy never overlap (numpy would otherwise copy the whole source first).
  """
  kept = len(buffer) - rows
  for start in range(0, kept, rows):
    stop = min(start + rows, kept)
    buffer[start:stop] = buffer[start + rows:stop + rows]
  buffer[kept:] = 0


# ---------------------------------------------------------------------------- volumes (N-D)
#
# The same scheme over any number of axes: windows of a fixed shape placed by `tile_starts` along
# every axis and visited in row-major order; the first axis plays the role of the rows above, so
# `SlabBlender` keeps one window-deep slab of sums and hands out finished slabs along it. Volumes
# weight windows with a Gaussian (nnU-Net's and MONAI's importance map) rather than the Hann
# window: with overlap 0.5 a voxel sees several windows and the centre ones dominate.


@dataclasses.dataclass(frozen=True)
class WindowPlan:
  """Window positions over an array of `shape` (its leading axes); `starts[a]`: along axis a."""
  shape: tuple[int, ...]
  window: tuple[int, ...]
  starts: tuple[tuple[int, ...], ...]

  @property
  def num_windows(self) -> int:
    return math.prod(len(s) for s in self.starts)

  def positions(self) -> Iterator[tuple[int, ...]]:
    """First voxel of every window, row-major (last axis fastest)."""
    for index in np.ndindex(*(len(s) for s in self.starts)):
      yield tuple(s[i] for s, i in zip(self.starts, index))


def plan_windows(shape: tuple[int, ...], window: tuple[int, ...], overlap: float) -> WindowPlan:
  return WindowPlan(tuple(shape), tuple(window),
                    tuple(tile_starts(n, w, overlap) for n, w in zip(shape, window)))


def gaussian_window(window: tuple[int, ...], sigma_scale: float = 0.125) -> np.ndarray:
  """float32 `window`-shaped separable Gaussian centred on the window, sigma = sigma_scale *
  size per axis (nnU-Net's 1/8), scaled to a maximum of 1 and floored at its smallest
  positive value so that edge voxels still count (MONAI clamps the same way)."""
  profiles = []
  for size in window:
    centres = np.arange(size, dtype=np.float64) + 0.5 - size / 2
    profiles.append(np.exp(-0.5 * (centres / (sigma_scale * size)) ** 2))
  weights = profiles[0]
  for profile in profiles[1:]:
    weights = np.multiply.outer(weights, profile)
  weights = weights / weights.max()
  return np.maximum(weights, weights[weights > 0].min()).astype(np.float32)


def extract_window(array: np.ndarray, corner: tuple[int, ...], window: tuple[int, ...]
                   ) -> np.ndarray:
  """array[corner:corner + window] over the leading axes, zero-padded past the end (where the
  array is shorter than a window along an axis; the padded part is never blended)."""
  region = array[tuple(slice(c, c + w) for c, w in zip(corner, window))]
  pads = [(0, w - n) for w, n in zip(window, region.shape)] + [(0, 0)] * (array.ndim - len(window))
  return np.pad(region, pads) if any(hi for _, hi in pads) else region


class SlabBlender:
  """Importance-weighted average of overlapping window predictions, finished slab by slab along
  the first axis (the N-D `RowBandBlender`).

  Feed windows in row-major plan order with `add` ([*window, K] probabilities). When the last
  window starting at first-axis position starts[0][i] arrives, positions up to starts[0][i+1]
  (or the end) are covered by no later window; `add` returns them as (first index, float32
  [slab, *shape[1:], K]). Memory: one window-deep slab, never the whole probability volume.
  """

  def __init__(self, plan: WindowPlan, num_classes: int, weights: np.ndarray | None = None):
    self.plan = plan
    self._weights_window = (gaussian_window(plan.window) if weights is None else weights)[..., None]
    depth = min(plan.window[0], plan.shape[0])
    self._sums = np.zeros((depth, *plan.shape[1:], num_classes), np.float32)
    self._weights = np.zeros((depth, *plan.shape[1:], 1), np.float32)
    self._top = 0
    self._count = 0
    self._per_slab = plan.num_windows // len(plan.starts[0])

  def add(self, probabilities: np.ndarray) -> tuple[int, np.ndarray] | None:
    plan = self.plan
    if self._count >= plan.num_windows:
      raise ValueError(f"all {plan.num_windows} windows of the plan were already added")
    slab, within = divmod(self._count, self._per_slab)
    index = np.unravel_index(within, [len(s) for s in plan.starts[1:]])
    corner = (plan.starts[0][slab], *(s[i] for s, i in zip(plan.starts[1:], index)))
    self._count += 1
    extent = tuple(min(w, n - c) for w, n, c in zip(plan.window, plan.shape, corner))
    inside = tuple(slice(0, e) for e in extent)
    target = (slice(corner[0] - self._top, corner[0] - self._top + extent[0]),
              *(slice(c, c + e) for c, e in zip(corner[1:], extent[1:])))
    weights = self._weights_window[inside]
    self._sums[target] += probabilities[inside] * weights
    self._weights[target] += weights
    if within < self._per_slab - 1:
      return None
    end = plan.starts[0][slab + 1] if slab + 1 < len(plan.starts[0]) else plan.shape[0]
    first, self._top = self._top, end
    return first, _release(self._sums, self._weights, end - first)
