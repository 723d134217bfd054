"""ResNet backbones (He et al., 2016) returning multi-scale features, NHWC.

`ResNet(...)(x, train=...)` returns a dict of feature maps, the way
segmentation heads consume a backbone:

  c1: the stem's stride-2 map        c2: stage 1 (stride 4)
  c3: stage 2 (stride 8)             c4: stage 3 (stride 16)
  c5: stage 4 (stride 32)

`output_stride` 16 or 8 keeps the resolution of the last one or two stages
and dilates their 3x3 convolutions instead (atrous convolution, as in
DeepLab), so the receptive field grows as it would have with striding.
`feature_strides()` gives the stride of every map.

Stems: "imagenet" is the standard 7x7/2 conv and 3x3/2 max pool (c1 is the
conv's output); "small" suits small images: a 3x3 conv at full resolution,
2x2 max pool, 3x3 conv (c1), 2x2 max pool. Both put stage 1 at stride 4.
"small_stride2" leaves out the first pool, so that every map has twice the
resolution (c1 at stride 1, stage 1 at 2, natural output stride 16), for
images so small (e.g. 64 px) that a stride-4 decoder blurs their shapes.

Padding is symmetric (k // 2 * dilation), as in torchvision, so a ported
torchvision checkpoint computes the same function; nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from seg_jax import registry
from seg_jax.models import layers

# name -> (block, blocks per stage)
RESNETS = {
    "resnet10": ("basic", (1, 1, 1, 1)),
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}
# Stem name -> its stride (where stage 1 starts).
STEM_STRIDES = {"imagenet": 4, "small": 4, "small_stride2": 2}
STEMS = tuple(STEM_STRIDES)
OUTPUT_STRIDES = (4, 8, 16, 32)
BOTTLENECK_EXPANSION = 4


def output_strides(stem: str) -> tuple[int, ...]:
  """The output strides a ResNet with this stem can have: its natural one, and 2x or 4x less
  by dilating the last one or two stages."""
  natural = STEM_STRIDES[stem] * 8
  return (natural // 4, natural // 2, natural)


def stage_strides_and_dilations(output_stride: int, stem: str = "imagenet"
                                ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Per stage (1..4): the stride of its first block and the dilation of its 3x3 convs."""
  if stem not in STEM_STRIDES:
    raise ValueError(f"unknown stem {stem!r}; allowed: {', '.join(STEMS)}")
  if output_stride not in output_strides(stem):
    raise ValueError(f"output_stride must be one of {output_strides(stem)} with the {stem} stem, "
                     f"got {output_stride}")
  strides, dilations = [1], [1]
  reached, dilation = STEM_STRIDES[stem], 1
  for _ in range(3):
    if reached < output_stride:
      strides.append(2)
      reached *= 2
    else:  # keep the resolution; dilate instead of striding
      strides.append(1)
      dilation *= 2
    dilations.append(dilation)
  return tuple(strides), tuple(dilations)


def feature_strides(output_stride: int = 32, stem: str = "imagenet") -> dict[str, int]:
  """Stride of each feature map that `ResNet` returns."""
  strides, _ = stage_strides_and_dilations(output_stride, stem)
  reached = STEM_STRIDES[stem]
  out = {"c1": reached // 2}
  for i, s in enumerate(strides):
    reached *= s
    out[f"c{i + 2}"] = reached
  return out


def feature_channels(name: str, width: int) -> dict[str, int]:
  """Channels of each feature map of `ResNet(name, width)`."""
  block, _ = RESNETS[name]
  expansion = BOTTLENECK_EXPANSION if block == "bottleneck" else 1
  return {"c1": width, **{f"c{i + 2}": width * 2 ** i * expansion for i in range(4)}}


def _conv(features: int, kernel: int, stride: int = 1, dilation: int = 1, name=None,
          dtype=jnp.float32, use_bias=False) -> nn.Conv:
  pad = kernel // 2 * dilation
  # Flax's default (LeCun normal) kernel init, not torchvision's He fan-out with zero-initialised
  # last norms per block: on the shapes dataset DeepLabv3+ (configs/deeplabv3plus.py) reached
  # validation Dice 0.70 instead of 0.51 after 800 steps, and 0.877 instead of 0.854 after 4000.
  return layers.Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                 kernel_dilation=dilation, use_bias=use_bias, dtype=dtype, name=name)


class _Block(nn.Module):
  """What both residual blocks share: their fields and the shortcut."""
  features: int
  stride: int = 1
  dilation: int = 1
  norm: layers.Norm = layers.Norm()
  dtype: Any = jnp.float32

  def conv(self, features: int, kernel: int, stride: int = 1, dilation: int = 1, name=None):
    return _conv(features, kernel, stride, dilation, dtype=self.dtype,
                 use_bias=self.norm.conv_bias, name=name)

  def add_shortcut(self, x, y, features: int, *, train: bool):
    """relu(shortcut + y): the identity, or a strided 1x1 projection where the shape changes."""
    if self.stride != 1 or x.shape[-1] != features:
      x = self.norm(self.conv(features, 1, self.stride, name="proj")(x), train=train)
    return nn.relu(x + y)


class BasicBlock(_Block):
  """Two 3x3 convs with an identity (or 1x1 projection) shortcut."""

  @nn.compact
  def __call__(self, x, *, train: bool):
    y = self.norm(self.conv(self.features, 3, self.stride, self.dilation)(x), train=train,
                  relu=True)
    y = self.norm(self.conv(self.features, 3, 1, self.dilation)(y), train=train)
    return self.add_shortcut(x, y, self.features, train=train)


class Bottleneck(_Block):
  """1x1 reduce, 3x3 (strided/dilated), 1x1 expand by 4; stride on the 3x3 (ResNet v1.5)."""

  @nn.compact
  def __call__(self, x, *, train: bool):
    out = self.features * BOTTLENECK_EXPANSION
    y = self.norm(self.conv(self.features, 1)(x), train=train, relu=True)
    y = self.norm(self.conv(self.features, 3, self.stride, self.dilation)(y), train=train,
                  relu=True)
    y = self.norm(self.conv(out, 1)(y), train=train)
    return self.add_shortcut(x, y, out, train=train)


class ResNet(nn.Module):
  """ResNet-10/18/34/50/101 without the classifier; returns {'c1', ..., 'c5'}.

  `width` is stage 1's channel count (64 in the standard networks); stage i
  has width * 2**(i-1) (times 4 at the output of a bottleneck block).
  """
  arch: str = "resnet18"
  width: int = 64
  output_stride: int = 32
  stem: str = "imagenet"
  norm: str = "batch"
  norm_groups: int = 8
  frozen_norm: bool = False   # batch norm only: detectron2's FrozenBN (layers.FROZEN_BATCH)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    if self.arch not in RESNETS:
      raise ValueError(f"unknown backbone {self.arch!r}; allowed: {', '.join(RESNETS)}")
    block_kind, blocks = RESNETS[self.arch]
    block_cls = BasicBlock if block_kind == "basic" else Bottleneck
    strides, dilations = stage_strides_and_dilations(self.output_stride, self.stem)
    if self.frozen_norm and self.norm != "batch":
      raise ValueError(f"frozen_norm freezes batch norm; the norm is {self.norm!r}")
    norm = layers.Norm(kind=layers.FROZEN_BATCH if self.frozen_norm else self.norm,
                       groups=self.norm_groups, dtype=self.dtype)
    norm_relu = lambda y: norm(y, train=train, relu=True)
    bias = norm.conv_bias
    x = x.astype(self.dtype)
    features = {}
    if self.stem == "imagenet":
      x = _conv(self.width, 7, 2, dtype=self.dtype, use_bias=bias, name="stem_conv")(x)
      x = norm_relu(x)
      features["c1"] = x
      x = layers.max_pool_3x3_stride2(x)
    elif self.stem in ("small", "small_stride2"):
      x = _conv(self.width // 2, 3, dtype=self.dtype, use_bias=bias, name="stem_conv1")(x)
      x = norm_relu(x)
      if self.stem == "small":
        x = layers.max_pool_2x2(x)
      x = _conv(self.width, 3, dtype=self.dtype, use_bias=bias, name="stem_conv2")(x)
      x = norm_relu(x)
      features["c1"] = x
      x = layers.max_pool_2x2(x)
    else:
      raise ValueError(f"unknown stem {self.stem!r}; allowed: {', '.join(STEMS)}")
    for stage, (count, stride, dilation) in enumerate(zip(blocks, strides, dilations)):
      for i in range(count):
        # The first block of a stage keeps the previous stage's dilation, as in DeepLab's
        # atrous ResNet (torchvision's replace_stride_with_dilation), to avoid gridding.
        first_dilation = dilations[stage - 1] if stage else dilation
        x = block_cls(features=self.width * 2 ** stage, stride=stride if i == 0 else 1,
                      dilation=first_dilation if i == 0 else dilation, norm=norm,
                      dtype=self.dtype, name=f"stage{stage + 1}_block{i + 1}")(x, train=train)
      features[f"c{stage + 2}"] = x
    return features


def check_backbone(model_config, *, widths: dict[str, int] | None = None) -> None:
  """ConfigError unless model.backbone is a ResNet, model.stem one of STEMS and the norm fits
  its widths (and `widths`, more of the model's channel counts)."""
  m = model_config
  if m.backbone not in RESNETS:
    registry.fail("model.backbone", m.backbone,
                  f"{m.name} needs a ResNet: one of {', '.join(RESNETS)}")
  registry.check_choice("model.stem", m.stem, STEMS)
  registry.check_int("model.width", m.width)
  own = {"model.width": m.width}
  if m.stem in ("small", "small_stride2"):
    own["model.width / 2 (the small stem's first conv)"] = m.width // 2
  layers.check_norm(m, {**own, **(widths or {})})
  frozen = m.get("frozen_backbone_norm", False)
  if not isinstance(frozen, bool):
    registry.fail("model.frozen_backbone_norm", frozen, "must be True or False")
  if frozen and m.norm != "batch":
    registry.fail("model.frozen_backbone_norm", frozen,
                  f"freezes the backbone's batch norms; model.norm is {m.norm!r}")


def input_divisor(output_stride: int, stem: str = "imagenet") -> int:
  """Input H and W must be multiples of this for every stride to divide evenly."""
  return max(feature_strides(output_stride, stem).values())
