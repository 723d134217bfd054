"""Feature pyramid network (Lin et al., 2017) on a ResNet: P2-P6, one channel width.

`FPN` takes the ResNet maps c2..c5 (strides 4..32) and returns p2..p6:
a 1x1 lateral conv per map, a top-down pathway adding each coarser map
upsampled (nearest) to the next finer one, a 3x3 output conv per level, and
P6 as P5 subsampled by 2 (detectron2's "LastLevelMaxPool": a 1x1 max pool of
stride 2). Level k has stride 2**k; maps of odd size round up (ceil), the way
the stride-2 convolutions of the backbone do.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from seg_jax.models import layers, resnet

LEVELS = (2, 3, 4, 5, 6)


def _upsample_nearest(x: jax.Array, height: int, width: int) -> jax.Array:
  """Nearest-neighbour resize; for an exact 2x it repeats every pixel twice per axis."""
  return jax.image.resize(x, (x.shape[0], height, width, x.shape[-1]), method="nearest")


class FPN(nn.Module):
  """{'c2', ..., 'c5'} -> {'p2', ..., 'p6'}, each with `features` channels."""
  features: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: dict[str, jax.Array]) -> dict[str, jax.Array]:
    conv = lambda k, name: layers.Conv(self.features, (k, k), dtype=self.dtype, name=name)
    laterals = [conv(1, f"lateral{k}")(inputs[f"c{k}"]) for k in (2, 3, 4, 5)]
    merged = [laterals[-1]]
    for lateral in reversed(laterals[:-1]):
      merged.insert(0, lateral + _upsample_nearest(merged[0], *lateral.shape[1:3]))
    out = {f"p{k}": conv(3, f"output{k}")(x) for k, x in zip((2, 3, 4, 5), merged)}
    out["p6"] = out["p5"][:, ::2, ::2]
    return out


class ResNetFPN(nn.Module):
  """A ResNet (natural output stride 32) followed by an FPN: image -> {'p2', ..., 'p6'}."""
  backbone: str = "resnet50"
  width: int = 64
  stem: str = "imagenet"
  norm: str = "batch"
  norm_groups: int = 8
  frozen_norm: bool = False
  features: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    if resnet.STEM_STRIDES[self.stem] != 4:
      raise ValueError(f"the FPN needs a stem of stride 4 (imagenet or small), got {self.stem!r}")
    c = resnet.ResNet(arch=self.backbone, width=self.width, output_stride=32, stem=self.stem,
                      norm=self.norm, norm_groups=self.norm_groups,
                      frozen_norm=self.frozen_norm, dtype=self.dtype,
                      name="backbone")(x, train=train)
    return FPN(features=self.features, dtype=self.dtype, name="fpn")(c)
