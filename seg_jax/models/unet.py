"""U-Net (Ronneberger et al., 2015): encoder-decoder with concatenated skips."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from seg_jax import registry
from seg_jax.models import layers
from seg_jax.models import resnet


class DoubleConv(nn.Module):
  """Two 3x3 conv-norm-ReLU layers: one U-Net level."""
  features: int
  norm: layers.Norm = layers.Norm()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    for i in range(2):
      x = layers.ConvNormAct(features=self.features, kernel_size=3, norm=self.norm,
                             dtype=self.dtype, name=f"conv{i + 1}")(x, train=train)
    return x


class UNet(nn.Module):
  """U-Net returning per-pixel logits.

  Input `[N, H, W, C]`; output `[N, H, W, num_logits]` in float32
  (num_logits = number of classes, or 1 for binary tasks).

  Classic encoder (`backbone=""`): H and W divisible by 2**depth; level i has
  `width * 2**i` channels; 2x2 max pooling down, learned or resize upsampling
  up, skips concatenated.

  ResNet encoder (`backbone="resnet34"`, ...; `width` is then the ResNet's
  stage-1 width, 64 in the standard networks): the ResNet's maps c1..c4
  (strides 2, 4, 8, 16 with the imagenet or small stem) are the skips of a
  decoder from c5 (stride 32), with `width * stride / 4` channels at each
  stride (256, 128, 64, 32, 16 for width 64, as in
  segmentation_models_pytorch), and a last upsampling to the input size
  without a skip. H and W divisible by c5's stride.
  """
  num_logits: int = 1
  width: int = 32                 # channels at the first level, doubled per level
  depth: int = 4                  # number of 2x downsamplings (classic encoder)
  norm: str = "batch"             # batch | group | none
  norm_groups: int = 8            # groups of group norm
  upsample: str = "transpose"     # transpose (learned 2x2/2) | resize (bilinear + 3x3 conv)
  dropout: float = 0.0            # at the bottleneck and after each decoder level
  dtype: Any = jnp.float32
  backbone: str = ""              # '' = the classic encoder, or a ResNet (resnet.RESNETS)
  stem: str = "imagenet"          # the ResNet's stem (resnet.STEMS)
  frozen_backbone_norm: bool = False  # ResNet encoder: its batch norms as loaded (FrozenBN)

  @nn.compact
  def __call__(self, x, *, train: bool):
    divisor = input_divisor(self.depth, self.backbone, self.stem)
    if x.shape[1] % divisor or x.shape[2] % divisor:
      raise ValueError(f"this U-Net needs H and W divisible by {divisor}, got {x.shape[1:3]}")
    x = x.astype(self.dtype)
    norm = layers.Norm(kind=self.norm, groups=self.norm_groups, dtype=self.dtype)
    block = lambda features, name: DoubleConv(features=features, norm=norm, dtype=self.dtype,
                                              name=name)
    if self.backbone:
      x, skips, widths = self._resnet_encoder(x, train)
    else:
      skips = []
      for level in range(self.depth):
        x = block(self.width * 2 ** level, f"down{level}")(x, train=train)
        skips.append(x)
        x = layers.max_pool_2x2(x)
      x = block(self.width * 2 ** self.depth, "bottom")(x, train=train)
      widths = [self.width * 2 ** level for level in range(self.depth)]
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    for level in reversed(range(len(widths))):
      features = widths[level]
      x = layers.make_upsample(self.upsample, features, self.dtype, name=f"upsample{level}")(x)
      if skips[level] is not None:
        x = jnp.concatenate([skips[level], x], axis=-1)
      x = block(features, f"up{level}")(x, train=train)
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    logits = layers.Conv(self.num_logits, (1, 1), dtype=self.dtype, name="head")(x)
    return logits.astype(jnp.float32)

  def _resnet_encoder(self, x, train):
    """The bottom map (c5), a skip per decoder level (stride 2**level; None where the ResNet has
    no map of that stride) and the decoder widths."""
    natural = resnet.output_strides(self.stem)[-1]
    features = resnet.ResNet(arch=self.backbone, width=self.width, output_stride=natural,
                             stem=self.stem, norm=self.norm, norm_groups=self.norm_groups,
                             frozen_norm=self.frozen_backbone_norm,
                             dtype=self.dtype, name="encoder")(x, train=train)
    by_stride = {stride: features[name]
                 for name, stride in resnet.feature_strides(natural, self.stem).items()}
    levels = natural.bit_length() - 1                    # log2: upsamplings back to stride 1
    skips = [by_stride.get(2 ** level) for level in range(levels)]
    widths = [max(self.width * 2 ** level // 4, 8) for level in range(levels)]
    return features["c5"], skips, widths


def input_divisor(depth: int, backbone: str = "", stem: str = "imagenet") -> int:
  """H and W of the input must be multiples of this."""
  if backbone:
    return resnet.input_divisor(resnet.output_strides(stem)[-1], stem)
  return 2 ** depth


def _check(config) -> None:
  m = config.model
  registry.check_int("model.width", m.width)
  registry.check_int("model.depth", m.depth)
  registry.check_choice("model.upsample", m.upsample, layers.UPSAMPLINGS)
  if m.backbone not in ("", *resnet.RESNETS):
    registry.fail("model.backbone", m.backbone, f"must be '' or one of {', '.join(resnet.RESNETS)}")
  if m.backbone:
    resnet.check_backbone(m)
  else:
    layers.check_norm(m, {"model.width": m.width})
    if m.frozen_backbone_norm:
      registry.fail("model.frozen_backbone_norm", m.frozen_backbone_norm,
                    "needs a ResNet encoder (model.backbone)")
  registry.check_fraction("model.dropout", m.dropout, closed=False)


ENTRY = registry.register_model(registry.ModelEntry(
    name="unet", module=UNet, defaults=registry.field_defaults(UNet, exclude=("num_logits", "dtype")),
    input_multiple=lambda m: input_divisor(m.depth, m.backbone, m.stem),
    backbone=lambda m: "encoder" if m.backbone else "",
    input_multiple_reason=lambda m: (f"the input multiple of a U-Net with a {m.backbone} encoder"
                                     if m.backbone else f"2**model.depth={2 ** m.depth}"),
    check=_check,
    description="U-Net: the classic encoder, or a ResNet encoder (model.backbone)"))
