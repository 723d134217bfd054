"""3D U-Net for volumes (CT, MRI): the U-Net of `unet.py` over three spatial axes.

Input `[N, D, H, W, C]`; output `[N, D, H, W, num_logits]` float32. Built from the shared
layers (`layers.ConvNormAct` with `rank=3`, `layers.LearnedUpsample2x` with per-axis factors),
like MONAI's `UNet` and nnU-Net's: each level is two 3x3x3 conv-norm-ReLU layers (or a residual
unit), a level goes down by a strided 3x3x3 convolution (no pooling), and up by a learned
transposed convolution (as a 1x1x1 conv and depth-to-space), with the skip concatenated.

`strides` gives each downsampling's stride per axis (D, H, W), so anisotropic scans (thick
slices) keep their depth early: e.g. ((1, 2, 2), (2, 2, 2), (2, 2, 2)). Empty: 2 on every axis
at each of `depth` levels; a (1, 1, 1) entry is a level at the same resolution, as MONAI's
bottom unit. The input's D, H, W must be multiples of the product of the strides along each
axis (`input_multiples`).

`first_strides` is the first unit's stride. (1, 1, 1), the default, is nnU-Net's layout: a
full-resolution level of the first width, and a 1x1x1 head. MONAI's `UNet` strides its first
unit instead, so its top level works at half the input and a learned upsampling to the logits
ends the decoder; `configs/unet3d.py:monai` is that network (channels 16-128 at strides 2, 4, 8,
8), about an eighth of the default's FLOPs at 48^3.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from seg_jax import registry
from seg_jax.models import layers


def level_strides(depth: int, strides: tuple) -> tuple[tuple[int, int, int], ...]:
  """The (D, H, W) stride of each downsampling: `strides` if given, else 2 everywhere."""
  if strides:
    return tuple(tuple(int(v) for v in s) for s in strides)
  return ((2, 2, 2),) * depth


def input_multiples(depth: int, strides: tuple, first_strides: tuple = (1, 1, 1)
                    ) -> tuple[int, int, int]:
  """D, H and W of the input must be multiples of these (the product of the strides per axis,
  the first unit's included)."""
  per_level = (tuple(first_strides), *level_strides(depth, strides))
  return tuple(math.prod(s[axis] for s in per_level) for axis in range(3))


class ConvUnit3D(nn.Module):
  """Two 3x3x3 conv-norm layers, the first taking the level's stride, each followed by ReLU.

  With `residual`, the second's ReLU comes after adding a shortcut: identity, or a 1x1x1
  projection when the stride or the channel count changes (MONAI's ResidualUnit with
  subunits=2 does the same, with a 3x3x3 projection).
  """
  features: int
  norm: layers.Norm
  strides: tuple[int, int, int] = (1, 1, 1)
  residual: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    y = layers.ConvNormAct(self.features, norm=self.norm, dtype=self.dtype, rank=3,
                           strides=self.strides, name="conv1")(x, train=train)
    y = layers.ConvNormAct(self.features, norm=self.norm, dtype=self.dtype, rank=3,
                           relu=not self.residual, name="conv2")(y, train=train)
    if not self.residual:
      return y
    shortcut = x
    if self.strides != (1, 1, 1) or x.shape[-1] != self.features:
      shortcut = layers.Conv(self.features, (1, 1, 1), strides=self.strides, dtype=self.dtype,
                             name="shortcut")(x)
    return nn.relu(y + shortcut)


class UNet3D(nn.Module):
  """3D U-Net returning per-voxel logits (see the module docstring)."""
  num_logits: int = 2
  width: int = 16                 # channels at the first level, doubled per level
  max_width: int = 320            # cap on any level's channels (nnU-Net's 320)
  depth: int = 4                  # number of downsamplings (when `strides` is empty)
  strides: tuple = ()             # per downsampling, its (D, H, W) stride; () = 2 x depth
  norm: str = "instance"          # instance | group | batch | none
  norm_groups: int = 8            # groups of group norm
  residual: bool = False          # residual units (MONAI's num_res_units=2 analogue)
  first_strides: tuple = (1, 1, 1)  # the first unit's stride; (2, 2, 2): MONAI's layout
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    first_strides = tuple(self.first_strides)
    multiples = input_multiples(self.depth, self.strides, first_strides)
    if x.ndim != 5 or any(size % m for size, m in zip(x.shape[1:4], multiples)):
      raise ValueError(f"UNet3D needs [N, D, H, W, C] with D, H, W multiples of {multiples}, "
                       f"got {x.shape}")
    x = x.astype(self.dtype)
    norm = layers.Norm(kind=self.norm, groups=self.norm_groups, dtype=self.dtype)
    block_type = functools.partial(ConvUnit3D, residual=self.residual)
    widths = level_widths(self.width, self.max_width, len(level_strides(self.depth, self.strides)))
    strides = level_strides(self.depth, self.strides)
    skips = []
    x = block_type(widths[0], norm=norm, strides=first_strides, dtype=self.dtype,
                   name="down0")(x, train=train)
    for level, stride in enumerate(strides, start=1):
      skips.append(x)
      x = block_type(widths[level], norm=norm, strides=stride, dtype=self.dtype,
                     name=f"down{level}" if level < len(strides) else "bottom")(x, train=train)
    for level in reversed(range(len(strides))):
      x = layers.LearnedUpsample2x(widths[level], dtype=self.dtype, factors=strides[level],
                                   name=f"upsample{level}")(x)
      x = jnp.concatenate([skips[level], x], axis=-1)
      x = block_type(widths[level], norm=norm, dtype=self.dtype, name=f"up{level}")(x, train=train)
    if first_strides == (1, 1, 1):
      logits = layers.Conv(self.num_logits, (1, 1, 1), dtype=self.dtype, name="head")(x)
    else:  # back to the input's size straight into the logits, as MONAI's top up-layer
      logits = layers.LearnedUpsample2x(self.num_logits, dtype=self.dtype, factors=first_strides,
                                        name="head")(x)
    return logits.astype(jnp.float32)


def level_widths(width: int, max_width: int, downsamplings: int) -> list[int]:
  """Channels of each level, from the full-resolution one to the bottom."""
  return [min(width * 2 ** level, max_width) for level in range(downsamplings + 1)]


def _check(config) -> None:
  m = config.model
  registry.check_int("model.width", m.width)
  registry.check_int("model.max_width", m.max_width)
  registry.check_int("model.depth", m.depth)
  strides = m.strides
  if strides and (not isinstance(strides, (tuple, list)) or any(
      not _is_stride(s) for s in strides)):
    registry.fail("model.strides", strides,
                  "must be () or one (D, H, W) tuple of positive ints per downsampling")
  if not _is_stride(m.first_strides):
    registry.fail("model.first_strides", m.first_strides, "must be a (D, H, W) tuple of "
                  "positive ints: (1, 1, 1), or MONAI's (2, 2, 2)")
  if not isinstance(m.residual, bool):
    registry.fail("model.residual", m.residual, "must be True or False")
  widths = level_widths(m.width, m.max_width, len(level_strides(m.depth, tuple(strides))))
  layers.check_norm(m, {f"level {i} channels": w for i, w in enumerate(widths)})
  patch = config.dataset.get("patch_size")
  if patch is not None:
    multiples = input_multiples(m.depth, tuple(strides), tuple(m.first_strides))
    if len(patch) != 3 or any(p % q for p, q in zip(patch, multiples)):
      registry.fail("dataset.patch_size", patch, f"must be (D, H, W), multiples of {multiples} "
                    "(the product of model.first_strides and model.strides per axis)")


def _is_stride(s) -> bool:
  return (isinstance(s, (tuple, list)) and len(s) == 3
          and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in s))


ENTRY = registry.register_model(registry.ModelEntry(
    name="unet3d", module=UNet3D,
    defaults=registry.field_defaults(UNet3D, exclude=("num_logits", "dtype")),
    task="volumetric", check=_check,
    description="3D U-Net for volumes: strided-conv encoder, per-axis strides, residual units"))
