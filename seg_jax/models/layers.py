"""Building blocks shared by the segmentation models (channels last: NHWC, and NDHWC for volumes)."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from seg_jax import registry
from seg_jax.models import batch_norm
from seg_jax.ops import conv as conv_ops

NORMS = ("batch", "group", "instance", "none")
# A backbone's batch norm with its running statistics, scale and bias held fixed (detectron2's
# FrozenBN; `model.frozen_backbone_norm`): not a choice of model.norm, as only loaded
# statistics make sense frozen.
FROZEN_BATCH = "frozen_batch"
UPSAMPLINGS = ("transpose", "resize")

# Every convolution of every model: flax's Conv (same parameters and names), computed by
# seg_jax/ops/conv.py, which runs oneDNN's kernels on a single CPU device.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_ops.conv_general_dilated)


def make_norm(kind: str, *, train: bool, groups: int = 8, dtype: Any = jnp.float32,
              relu: bool = False) -> nn.Module | None:
  """A normalisation layer by name: 'batch', 'group', 'instance' (group norm with one channel per
  group, as MONAI and nnU-Net use on volumes) or 'none' (None). `relu` fuses the ReLU
  after it: only batch norm takes it (`Norm` applies it separately for the others).

  Batch norm needs no `axis_name`: under `jax.jit` with the batch sharded over
  the mesh, the batch mean is a reduction over the *global* batch, so the
  statistics are already averaged across every device and host. It is flax's batch norm with a
  hand-written gradient (batch_norm.py); `relu=True` fuses the ReLU after it into it.
  """
  if kind in ("batch", FROZEN_BATCH):
    return batch_norm.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                dtype=dtype, relu=relu, frozen=kind == FROZEN_BATCH)
  if relu:
    raise ValueError(f"only batch norm fuses the ReLU; use Norm(...)(x, relu=True) for {kind!r}")
  if kind == "group":
    return nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=dtype)
  if kind == "instance":
    return nn.GroupNorm(num_groups=None, group_size=1, epsilon=1e-5, dtype=dtype)
  if kind == "none":
    return None
  raise ValueError(f"unknown norm {kind!r}; allowed: {', '.join(NORMS)}")


@dataclasses.dataclass(frozen=True)
class Norm:
  """A model's normalisation, made once from its config keys (`norm`, `norm_groups`, the compute
  dtype) and handed to its blocks. Called inside a module's compact method, it adds the layer to
  that module (named BatchNorm_0, GroupNorm_0, ... by flax, as before)."""
  kind: str = "batch"       # batch | group | instance | none | frozen_batch
  groups: int = 8           # group norm's groups
  dtype: Any = jnp.float32

  @property
  def conv_bias(self) -> bool:
    """Whether a conv followed by this norm needs a bias of its own (only without a norm)."""
    return self.kind == "none"

  def __call__(self, x: jax.Array, *, train: bool, relu: bool = False) -> jax.Array:
    """norm(x), or relu(norm(x)) (batch norm computes both in one op); 'none' is the identity."""
    if self.kind in ("batch", FROZEN_BATCH):
      return make_norm(self.kind, train=train, dtype=self.dtype, relu=relu)(x)
    layer = make_norm(self.kind, train=train, groups=self.groups, dtype=self.dtype)
    y = x if layer is None else layer(x)
    return nn.relu(y) if relu else y


class ConvNormAct(nn.Module):
  """Conv (optionally dilated or strided) -> norm -> ReLU over the `rank` spatial axes (2: images,
  3: volumes). The conv has no bias when a norm follows; `strides` is one int or one per axis."""
  features: int
  kernel_size: int = 3
  norm: Norm = Norm()
  dilation: int = 1
  dtype: Any = jnp.float32
  rank: int = 2
  strides: int | tuple[int, ...] = 1
  relu: bool = True

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = Conv(self.features, (self.kernel_size,) * self.rank, strides=self.strides,
             kernel_dilation=self.dilation, use_bias=self.norm.conv_bias, dtype=self.dtype)(x)
    return self.norm(x, train=train, relu=self.relu)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 stride-2 max pooling of [N, H, W, C] with even H and W.

  The same function as `nn.max_pool(x, (2, 2), strides=(2, 2))`, written as a
  reshape and a max so that its gradient is elementwise; XLA:CPU's
  reduce-window gradient (select-and-scatter) is several times slower.
  """
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
  """ResNet's stem pooling, as torchvision's `nn.MaxPool2d(3, stride=2, padding=1)`: one row and
  column of padding on every side that never wins the max (-inf, not zero, so a window at the
  border takes the largest real value even when all are negative). XLA's 'SAME' would pad 0
  before and 1 after on even sides and shift every output by one pixel."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def depth_to_space(x: jax.Array, block: int | tuple[int, ...] = 2) -> jax.Array:
  """[N, *S, prod(b)*C] -> [N, *(b*S), C] for any number of spatial axes S, with factor b per axis
  (one int: the same on every axis). 2D: channel index (i*b + j)*C + c goes to offset (i, j);
  in general the offsets are the channel's row-major index over the factors."""
  n, *spatial, c = x.shape
  factors = (block,) * len(spatial) if isinstance(block, int) else tuple(block)
  out_c = c // math.prod(factors)
  rank = len(spatial)
  x = x.reshape(n, *spatial, *factors, out_c)
  # interleave: (n, s0, f0, s1, f1, ..., c)
  order = [0] + [axis for i in range(rank) for axis in (1 + i, 1 + rank + i)] + [1 + 2 * rank]
  x = x.transpose(order)
  return x.reshape(n, *(s * f for s, f in zip(spatial, factors)), out_c)


def upsample_bilinear(x: jax.Array, factors: tuple[int, ...]) -> jax.Array:
  """Bilinear upsampling of [N, *spatial, C] by an integer factor per spatial axis, with
  half-pixel centres and edge clamping: `jax.image.resize(..., method="bilinear")` to
  factor x the size (torch's align_corners=False), to float rounding.

  Computed as two-tap blends of shifted slices, interleaved by a reshape, rather than
  jax.image.resize's products with [in, out] weight matrices: with dynamic sizes (export) those
  become TFLite BATCH_MATMULs whose shapes UNSORTED_SEGMENT_PROD computes with segment id -1
  for dropped dimensions, which tf2onnx 1.17 counts into the last segment (its ScatterND wraps
  -1), so the ONNX reshapes fail. Slices, blends and a reshape convert exactly; they are also
  O(output) where the weight matrices are O(input x output).
  """
  for axis, factor in enumerate(factors, start=1):
    if factor == 1:
      continue
    first = jax.lax.slice_in_dim(x, 0, 1, axis=axis)
    last = jax.lax.slice_in_dim(x, x.shape[axis] - 1, x.shape[axis], axis=axis)
    edged = jnp.concatenate([first, x, last], axis=axis)  # edged[j] = x[clamp(j - 1)]
    size = x.shape[axis]
    shifted = [jax.lax.slice_in_dim(edged, k, k + size, axis=axis) for k in range(3)]
    phases = []
    for phase in range(factor):
      # Output f*q + phase samples the input at q + offset: between q - 1 and q, or q and q + 1.
      offset = (phase + 0.5) / factor - 0.5
      if offset < 0:
        phases.append(shifted[0] * -offset + shifted[1] * (1 + offset))
      else:
        phases.append(shifted[1] * (1 - offset) + shifted[2] * offset)
    stacked = jnp.stack(phases, axis=axis + 1)
    x = stacked.reshape(*x.shape[:axis], size * factor, *x.shape[axis + 1:])
  return x


class LearnedUpsample2x(nn.Module):
  """Learned 2x upsampling: the function of a 2x2 stride-2 transposed convolution.

  A 2x2/2 transposed conv writes each input pixel into its own 2x2 output block
  with no overlap, so it equals a 1x1 conv to 4*C channels followed by
  depth-to-space. XLA's gradient of the transposed conv is its slowest
  convolution path on CPU and GPU (see shared/MEASURED.md: 6.8 s vs 0.29 s in
  PyTorch on [8,128,128,64]); the 1x1 form runs as a plain matmul.
  `tests/test_models.py` checks equality with `nn.ConvTranspose`.
  """
  features: int
  dtype: Any = jnp.float32
  # upsampling factor per spatial axis: (2, 2) for images; volumes give three (anisotropic: (1, 2, 2))
  factors: tuple[int, ...] = (2, 2)

  @nn.compact
  def __call__(self, x):
    x = Conv(math.prod(self.factors) * self.features, (1,) * len(self.factors), dtype=self.dtype,
             name="conv")(x)
    return depth_to_space(x, self.factors)


class ResizeUpsample2x(nn.Module):
  """Bilinear 2x resize followed by a 3x3 conv (checkerboard-free upsampling)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, h, w, c = x.shape
    x = jax.image.resize(x, (n, 2 * h, 2 * w, c), method="bilinear")
    return Conv(self.features, (3, 3), dtype=self.dtype, name="conv")(x)


def make_upsample(kind: str, features: int, dtype: Any = jnp.float32, name: str | None = None
                  ) -> nn.Module:
  if kind == "transpose":
    return LearnedUpsample2x(features=features, dtype=dtype, name=name)
  if kind == "resize":
    return ResizeUpsample2x(features=features, dtype=dtype, name=name)
  raise ValueError(f"unknown upsampling {kind!r}; allowed: {', '.join(UPSAMPLINGS)}")


def check_norm(model_config, widths: dict[str, int]) -> None:
  """ConfigError unless `model.norm` is known and, for group norm, `model.norm_groups` divides
  every channel count in `widths` ({description: channels})."""
  registry.check_choice("model.norm", model_config.norm, NORMS)
  registry.check_int("model.norm_groups", model_config.norm_groups)
  if model_config.norm == "group":
    for key, value in widths.items():
      if value % model_config.norm_groups:
        registry.fail("model.norm_groups", model_config.norm_groups, f"must divide {key}={value}")
