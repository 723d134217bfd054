"""RoIAlign with the sampling rules of torchvision/detectron2, and its FPN multi-level form.

Semantics of `roi_align` (those of torchvision's `roi_align` kernel, which
detectron2's `ROIAlign` calls), per RoI, per axis (y shown; x is the same):

- Feature coordinates: `start = y0 * spatial_scale - o`, `end = y1 * spatial_scale - o`,
  with `o = 0.5` when `aligned` (a feature value sits at the centre of its
  pixel, so input pixel centre y maps to feature coordinate `y*scale - 0.5`) and
  `o = 0` otherwise (the legacy Mask R-CNN convention). RoI size
  `size = end - start`; when not `aligned`, `size = max(size, 1)`.
- `oh` bins of size `bin = size / oh`; in bin p, `g` samples at
  `start + p * bin + (i + 0.5) * bin / g`, i = 0..g-1, where `g = sampling_ratio`
  if it is > 0, else the adaptive `ceil(size / oh)` (see below).
- Each sample is a bilinear interpolation of the feature map: a sample with
  `y < -1` or `y > H` (or the same for x) reads 0; otherwise y is clamped to
  `>= 0`, and a sample at or beyond row `H - 1` reads row `H - 1`.
- The output is the mean over the `g_y * g_x` samples of a bin. A bin with no
  sample (adaptive `g = 0` for an empty RoI) is 0.

Static shapes: the number of samples per bin must be known when tracing. With
`sampling_ratio > 0` it is. Adaptive sampling (`sampling_ratio <= 0`, detectron2's
default for FPN models) needs `max_sampling_ratio`: every RoI gets that many
sample slots per bin and axis, of which only the first `ceil(size / oh)` count;
a RoI that would need more samples than `max_sampling_ratio` uses
`max_sampling_ratio` evenly spaced ones (the only departure from torchvision,
and none at all for FPN pooling where RoIs are 14-28 feature pixels per side,
i.e. at most 4 samples for 7 bins, except for the clamped largest boxes).

Two implementations, same results (the bilinear weights factor into a y part
and an x part, which both exploit):

- `method="dense"`: per RoI, a `[oh, H]` and a `[ow, W]` interpolation matrix
  (each row holds a bin's averaged bilinear weights), and
  `out = A_y @ F @ A_x^T` as one `[R*oh, H] x [H, W*C]` matrix product plus a
  per-RoI `[ow, W]` product. Costs `R * oh * H * W * C` multiply-adds but is
  only matrix products (forward and backward): fastest for small maps, e.g.
  on CPU for a 32 x 32 map it was 2-3x faster than the gather.
- `method="gather"`: each bin gathers the `(2 g)^2` feature pixels its
  samples touch and sums them with the products of the per-axis weights.
  Memory and work `R * oh * ow * (2 g)^2 * C`, independent of the map size
  (the backward pass is the matching scatter-add): the choice for large maps.
- `method="auto"` (default) takes "dense" when the map (for
  `multilevel_roi_align`: all levels together) has at most
  `DENSE_MAX_PIXELS` cells.

Multi-level pooling: "gather" flattens all FPN levels into one
`[N, sum(H_l * W_l), C]` array and gathers each RoI from its own level's slice
with that level's scale, so it costs the same as one level; "dense" sums the
per-level products with the interpolation rows of RoIs on other levels zeroed.

Gradients flow to the features (the exact adjoint of the above) and also to
the boxes, through the bilinear weights (torchvision returns none for boxes;
detach proposals if, as in Mask R-CNN, they must not receive any).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp


# Implementations of `roi_align`; "auto" picks by map size (module docstring).
METHODS = ("auto", "dense", "gather")

# Largest map (H * W cells, all levels together for `multilevel_roi_align`) that
# "auto" pools with "dense". Its cost grows with H * W, the gather's does not.
# Forward / forward+backward in ms, 2 images, C=64, 128 RoIs of 7x7, sampling 2,
# min of 5 runs on a 2-core CPU shared with other jobs (so +-50%):
#   one 32x32 map:                 dense 41/80    gather 132/180
#   FPN P2-P5 of a 64px image:     dense 44/80    gather 160/216
#   FPN P2-P5 of a 128px image:    dense 159/340  gather 186/216
#   FPN P2-P5 of a 256px image:    dense 357/408  gather 141/192
DENSE_MAX_PIXELS = 1024


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(size, int):
    return size, size
  height, width = size
  return int(height), int(width)


def _axis_weights(start, size, num_bins: int, grid, num_slots: int, extent):
  """Sample rows (or columns) and their weights along one axis.

  Args:
    start, size: float `[R]` RoI start and size in feature pixels.
    num_bins: output bins along the axis (static).
    grid: int `[R]` samples per bin actually used (<= num_slots).
    num_slots: static number of sample slots per bin.
    extent: int `[R]` or int, the feature map's size along the axis.

  Returns:
    `(index, weight)`: int32 and float32 `[R, num_bins, 2 * num_slots]`; for
    each sample slot its low and high neighbour (sample-major). Weights include
    the out-of-range zeroing and the 1/grid of the bin average.
  """
  extent = jnp.asarray(extent, jnp.int32)[..., None, None]
  bin_size = (size / num_bins)[:, None, None]
  grid = grid[:, None, None]
  divisor = jnp.maximum(grid, 1).astype(jnp.float32)
  bins = jnp.arange(num_bins, dtype=jnp.float32)[None, :, None]
  slots = jnp.arange(num_slots, dtype=jnp.float32)[None, None, :]
  coord = start[:, None, None] + bins * bin_size + (slots + 0.5) * bin_size / divisor
  counted = (jnp.arange(num_slots)[None, None, :] < grid) & (coord >= -1.0) & (coord <= extent)
  coord = jnp.maximum(coord, 0.0)
  low = jnp.floor(coord)
  last = (extent - 1).astype(jnp.float32)
  at_edge = low >= last
  low = jnp.where(at_edge, last, low)
  coord = jnp.where(at_edge, last, coord)
  frac = coord - low
  low = jnp.where(counted, low, 0).astype(jnp.int32)  # NaN/inf coordinates: any legal index
  high = jnp.where(at_edge | ~counted, low, low + 1)
  scale = counted.astype(jnp.float32) / divisor
  index = jnp.stack([low, high], axis=-1).reshape(low.shape[0], num_bins, 2 * num_slots)
  weight = jnp.stack([(1.0 - frac) * scale, frac * scale], axis=-1).reshape(index.shape)
  return index, weight


def _sampling(boxes, *, scale, height, width, output_size, sampling_ratio, max_sampling_ratio, aligned):
  """Row and column samples of every RoI: `_axis_weights` for y and for x.

  Args:
    boxes: float32 `[R, 4]` in input pixels.
    scale: float32 `[R]` spatial scale; height, width: int32 `[R]` map size.

  Returns:
    `(rows, row_weight, cols, col_weight)`, `[R, oh, 2 g]` and `[R, ow, 2 g]`.
  """
  out_h, out_w = output_size
  offset = 0.5 if aligned else 0.0
  start = boxes[:, :2] * scale[:, None] - offset
  size = boxes[:, 2:] * scale[:, None] - offset - start
  if not aligned:
    size = jnp.maximum(size, 1.0)
  if sampling_ratio > 0:
    slots = sampling_ratio
    grid = jnp.full(size.shape, sampling_ratio, jnp.int32)
  else:
    slots = max_sampling_ratio
    bins = jnp.asarray([out_h, out_w], jnp.float32)
    # Clip before the int cast: size may be NaN, inf or negative for a broken RoI.
    grid = jnp.clip(jnp.ceil(size / bins), 0, slots)
    grid = jnp.where(jnp.isnan(grid), 0, grid).astype(jnp.int32)
  rows, row_weight = _axis_weights(start[:, 0], size[:, 0], out_h, grid[:, 0], slots, height)
  cols, col_weight = _axis_weights(start[:, 1], size[:, 1], out_w, grid[:, 1], slots, width)
  return rows, row_weight, cols, col_weight


def _gather_pool(flat, base, width, rows, row_weight, cols, col_weight):
  """`[R, oh, ow, C]` from `flat` `[P, C]`; RoI r reads the row-major map at `flat[base[r]:]`."""
  r, out_h, taps_h = rows.shape
  _, out_w, taps_w = cols.shape
  # Per bin, every (row, column) pair its samples touch, and the product weight.
  # Taps last: on CPU this gather + contraction was 2-4x faster than keeping the
  # row and column tap axes apart (a batched dot over thousands of tiny matrices).
  index = (base[:, None, None, None, None] + rows[:, :, None, :, None] * width[:, None, None, None, None]
           + cols[:, None, :, None, :]).reshape(r, out_h, out_w, taps_h * taps_w)
  weight = (row_weight[:, :, None, :, None] * col_weight[:, None, :, None, :]).reshape(index.shape)
  return _weighted_gather(flat, index, weight.astype(flat.dtype))


@jax.custom_vjp
def _weighted_gather(flat, index, weight):
  """`out[..., c] = sum_k weight[..., k] * flat[index[..., k], c]`."""
  return jnp.einsum("rpqk,rpqkc->rpqc", weight, flat[index], precision=jax.lax.Precision.HIGHEST)


def _weighted_gather_forward(flat, index, weight):
  return _weighted_gather(flat, index, weight), (flat, index, weight)


def _weighted_gather_backward(residuals, grad):
  # The adjoint as a scatter-add per tap, in a loop: as one scatter of all the
  # [R, oh, ow, taps, C] products (what differentiating the einsum gives), XLA:CPU fuses
  # the products into the matmul that makes `grad` (the box head's first layer), which
  # then runs 3x slower (benchmarks/profile_step.py); the loop keeps them apart and never
  # holds more than one tap's products. The gather for the weights' gradient is
  # recomputed, and removed by XLA when nothing needs the weights' (the boxes') gradient.
  flat, index, weight = residuals

  def add_tap(k, grad_flat):
    return grad_flat.at[index[..., k]].add(weight[..., k, None] * grad)

  grad_flat = jax.lax.fori_loop(0, index.shape[-1], add_tap, jnp.zeros_like(flat))
  grad_weight = jnp.einsum("rpqkc,rpqc->rpqk", flat[index], grad,
                           precision=jax.lax.Precision.HIGHEST)
  return grad_flat, None, grad_weight


_weighted_gather.defvjp(_weighted_gather_forward, _weighted_gather_backward)


def _interpolation_matrix(index, weight, extent: int):
  """`[R, bins, 2g]` samples -> `[R, bins, extent]` weights summed per feature row."""
  return jnp.sum((index[..., None] == jnp.arange(extent)) * weight[..., None], axis=2)


def _dense_pool(feature, rows, row_weight, cols, col_weight):
  """`[R, oh, ow, C]` from one map `[H, W, C]` as `A_y @ F @ A_x^T` per RoI."""
  h, w, c = feature.shape
  r, out_h, _ = rows.shape
  a_y = _interpolation_matrix(rows, row_weight, h).astype(feature.dtype)
  a_x = _interpolation_matrix(cols, col_weight, w).astype(feature.dtype)
  # Contract H first, as one big matrix product, while the W side is per RoI.
  rows_of = jnp.matmul(a_y.reshape(r * out_h, h), feature.reshape(h, w * c),
                       precision=jax.lax.Precision.HIGHEST).reshape(r, out_h, w, c)
  return jnp.einsum("rpwc,rqw->rpqc", rows_of, a_x, precision=jax.lax.Precision.HIGHEST)


def _check_args(boxes, output_size, sampling_ratio, max_sampling_ratio, method):
  """Validates the static arguments; returns them normalised (hashable, for jit)."""
  if jnp.ndim(boxes) != 3 or jnp.shape(boxes)[-1] != 4:
    raise ValueError(f"boxes must be [N, R, 4] (y0, x0, y1, x1), got shape {jnp.shape(boxes)}")
  output_size = _pair(output_size)
  if min(output_size) < 1:
    raise ValueError(f"output_size must be positive, got {output_size}")
  if int(sampling_ratio) != sampling_ratio:
    raise ValueError(f"sampling_ratio must be an int, got {sampling_ratio!r}")
  sampling_ratio = int(sampling_ratio)
  if sampling_ratio <= 0 and (max_sampling_ratio is None or max_sampling_ratio < 1):
    raise ValueError("adaptive sampling (sampling_ratio <= 0) needs a static max_sampling_ratio >= 1, "
                     f"got {max_sampling_ratio!r}")
  if method not in METHODS:
    raise ValueError(f"unknown roi_align method {method!r}; allowed: {', '.join(METHODS)}")
  return output_size, sampling_ratio, None if sampling_ratio > 0 else int(max_sampling_ratio)


def _use_dense(method: str, num_pixels: int) -> bool:
  return method == "dense" or (method == "auto" and num_pixels <= DENSE_MAX_PIXELS)


def roi_align(features: jax.Array, boxes: jax.Array, *, output_size: int | Sequence[int],
              spatial_scale: float, sampling_ratio: int, aligned: bool = True,
              max_sampling_ratio: int | None = None, method: str = "auto") -> jax.Array:
  """Pools a fixed-size feature patch for every box (semantics in the module docstring).

  Jitted, with every argument after `boxes` static; calling it inside an outer
  `jit` costs nothing extra.

  Args:
    features: `[N, H, W, C]`.
    boxes: `[N, R, 4]` (y0, x0, y1, x1) in input pixels; RoIs of image n pool
      from `features[n]`. Padding RoIs (e.g. zeros) give finite values.
    output_size: `oh` or `(oh, ow)`.
    spatial_scale: feature pixels per input pixel, e.g. 1/16 for stride 16.
    sampling_ratio: samples per bin per axis; <= 0 for adaptive
      `ceil(roi_size / bins)`, which needs `max_sampling_ratio`.
    aligned: half-pixel offset (True for detectron2's ROIAlignV2 / torchvision
      `aligned=True`; False reproduces the original Mask R-CNN).
    max_sampling_ratio: static cap on adaptive samples per bin per axis.
    method: "auto", "dense" or "gather" (same results; see the module docstring).

  Returns:
    `[N, R, oh, ow, C]`, dtype of `features`.
  """
  output_size, sampling_ratio, max_sampling_ratio = _check_args(
      boxes, output_size, sampling_ratio, max_sampling_ratio, method)
  return _roi_align(jnp.asarray(features), jnp.asarray(boxes), output_size=output_size,
                    spatial_scale=float(spatial_scale), sampling_ratio=sampling_ratio, aligned=bool(aligned),
                    max_sampling_ratio=max_sampling_ratio, method=method)


@functools.partial(jax.jit, static_argnames=("output_size", "spatial_scale", "sampling_ratio", "aligned",
                                             "max_sampling_ratio", "method"))
def _roi_align(features, boxes, *, output_size, spatial_scale, sampling_ratio, aligned, max_sampling_ratio,
               method):
  boxes = boxes.astype(jnp.float32)
  if features.ndim != 4 or features.shape[0] != boxes.shape[0]:
    raise ValueError(f"features must be [N, H, W, C] with N = boxes.shape[0]; got {features.shape}, "
                     f"boxes {boxes.shape}")
  n, h, w, c = features.shape
  r = boxes.shape[1]
  per_roi = lambda value, dtype: jnp.full((r,), value, dtype)
  sampling = functools.partial(
      _sampling, scale=per_roi(spatial_scale, jnp.float32), height=per_roi(h, jnp.int32),
      width=per_roi(w, jnp.int32), output_size=output_size, sampling_ratio=sampling_ratio,
      max_sampling_ratio=max_sampling_ratio, aligned=aligned)

  if _use_dense(method, h * w):
    pool = lambda feature, image_boxes: _dense_pool(feature, *sampling(image_boxes))
    return jax.vmap(pool)(features, boxes)
  pool = lambda flat, image_boxes: _gather_pool(flat, per_roi(0, jnp.int32), per_roi(w, jnp.int32),
                                                *sampling(image_boxes))
  return jax.vmap(pool)(features.reshape(n, h * w, c), boxes)


def assign_fpn_levels(boxes: jax.Array, *, min_level: int, max_level: int, canonical_level: int = 4,
                      canonical_size: float = 224.0) -> jax.Array:
  """FPN level each RoI is pooled from (FPN paper, eq. 1), int32 `boxes.shape[:-1]`.

      level = clip(floor(canonical_level + log2(sqrt(area) / canonical_size + 1e-8)),
                   min_level, max_level)

  so a 224 x 224 box (ImageNet size) pools from P4 and each halving of the side
  goes one level down. Empty boxes (area 0) go to `min_level`; the 1e-8 is
  detectron2's guard against log(0).
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  height = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0)
  width = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0)
  side = jnp.sqrt(height * width)
  level = jnp.floor(canonical_level + jnp.log2(side / canonical_size + 1e-8))
  return jnp.clip(level, min_level, max_level).astype(jnp.int32)


def multilevel_roi_align(features: Sequence[jax.Array], boxes: jax.Array, *, min_level: int,
                         output_size: int | Sequence[int], sampling_ratio: int, aligned: bool = True,
                         canonical_level: int = 4, canonical_size: float = 224.0,
                         max_sampling_ratio: int | None = None, method: str = "auto") -> jax.Array:
  """RoIAlign from an FPN: each box pools from the level `assign_fpn_levels` gives it.

  Args:
    features: one `[N, H_l, W_l, C]` map per level, levels `min_level`,
      `min_level + 1`, ...; level l has stride `2**l` (spatial scale `2**-l`).
      E.g. P2-P5 with `min_level=2` (Mask R-CNN pools from P2-P5, not P6).
    boxes: `[N, R, 4]` (y0, x0, y1, x1) in input pixels.
    min_level: the level of `features[0]`.
    output_size, sampling_ratio, aligned, max_sampling_ratio, method: as in `roi_align`.
    canonical_level, canonical_size: as in `assign_fpn_levels`.

  Returns:
    `[N, R, oh, ow, C]`, equal to `roi_align(features[l - min_level], ...,
    spatial_scale=2**-l)` for each box's level l.
  """
  output_size, sampling_ratio, max_sampling_ratio = _check_args(
      boxes, output_size, sampling_ratio, max_sampling_ratio, method)
  return _multilevel_roi_align(
      [jnp.asarray(f) for f in features], jnp.asarray(boxes), min_level=int(min_level),
      output_size=output_size, sampling_ratio=sampling_ratio, aligned=bool(aligned),
      canonical_level=int(canonical_level), canonical_size=float(canonical_size),
      max_sampling_ratio=max_sampling_ratio, method=method)


@functools.partial(jax.jit, static_argnames=("min_level", "output_size", "sampling_ratio", "aligned",
                                             "canonical_level", "canonical_size", "max_sampling_ratio",
                                             "method"))
def _multilevel_roi_align(features, boxes, *, min_level, output_size, sampling_ratio, aligned,
                          canonical_level, canonical_size, max_sampling_ratio, method):
  boxes = boxes.astype(jnp.float32)
  if not features:
    raise ValueError("multilevel_roi_align needs at least one feature level")
  n, _, _, c = features[0].shape
  for f in features:
    if f.ndim != 4 or f.shape[0] != n or f.shape[-1] != c or n != boxes.shape[0]:
      raise ValueError(f"every level must be [N, H_l, W_l, C] with the same N = boxes.shape[0] and C; "
                       f"got {[tuple(f.shape) for f in features]}, boxes {boxes.shape}")
  heights = [f.shape[1] for f in features]
  widths = [f.shape[2] for f in features]
  scales = [2.0 ** -(min_level + i) for i in range(len(features))]
  level = assign_fpn_levels(boxes, min_level=min_level, max_level=min_level + len(features) - 1,
                            canonical_level=canonical_level, canonical_size=canonical_size) - min_level
  table = lambda values, dtype: jnp.asarray(values, dtype)[level]  # [N, R]: the value of each RoI's level
  sampling = functools.partial(_sampling, output_size=output_size, sampling_ratio=sampling_ratio,
                               max_sampling_ratio=max_sampling_ratio, aligned=aligned)

  if _use_dense(method, sum(h * w for h, w in zip(heights, widths))):
    def pool(levels, image_boxes, image_level):
      out = 0
      for i, feature in enumerate(levels):
        r = image_boxes.shape[0]
        rows, row_weight, cols, col_weight = sampling(
            image_boxes, scale=jnp.full((r,), scales[i], jnp.float32),
            height=jnp.full((r,), heights[i], jnp.int32), width=jnp.full((r,), widths[i], jnp.int32))
        on_level = (image_level == i).astype(row_weight.dtype)[:, None, None]
        out = out + _dense_pool(feature, rows, row_weight * on_level, cols, col_weight)
      return out
    return jax.vmap(pool)(features, boxes, level)

  bases = [0]
  for h, w in zip(heights, widths):
    bases.append(bases[-1] + h * w)
  flat = jnp.concatenate([f.reshape(n, -1, c) for f in features], axis=1)

  def gather(image_flat, image_boxes, base, height, width, scale):
    return _gather_pool(image_flat, base, width,
                        *sampling(image_boxes, scale=scale, height=height, width=width))

  return jax.vmap(gather)(flat, boxes, table(bases[:-1], jnp.int32), table(heights, jnp.int32),
                          table(widths, jnp.int32), table(scales, jnp.float32))
