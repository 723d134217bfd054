"""DeepLabv3+ (Chen et al., 2018): atrous ResNet, ASPP, and a decoder fusing low-level features.

Encoder: a ResNet at output stride 16 or 8 (`seg_jax/models/resnet.py`).
ASPP on its last map: a 1x1 conv, one 3x3 conv per atrous rate, and image
pooling (global average -> 1x1 conv -> broadcast), concatenated and projected.
Decoder: the ASPP output upsampled bilinearly to stride 4, concatenated with
stage 1's features (`low_level="c2"`) reduced by a 1x1 conv, two 3x3 convs, a
1x1 classifier, and a bilinear upsampling to the input size. With
`low_level="c1"` the decoder fuses the stem's stride-2 map instead, for finer
masks on small images (on the shapes dataset it did not help: the stem's
map is one conv deep).

The atrous rates are taken as given: DeepLab's (6, 12, 18) are for output
stride 16 on ~513 px crops; double them for stride 8, and scale them down
with the feature map for small images (the rates must stay below the map's
size to see anything but padding).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from seg_jax import registry
from seg_jax.models import layers
from seg_jax.models import resnet


class ASPP(nn.Module):
  """Atrous spatial pyramid pooling."""
  features: int = 256
  rates: Sequence[int] = (6, 12, 18)
  image_pooling: bool = True
  dropout: float = 0.0
  norm: layers.Norm = layers.Norm()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    conv = lambda kernel, dilation=1, name=None: layers.ConvNormAct(
        features=self.features, kernel_size=kernel, norm=self.norm, dtype=self.dtype,
        dilation=dilation, name=name)
    branches = [conv(1, name="conv1x1")(x, train=train)]
    for rate in self.rates:
      branches.append(conv(3, rate, name=f"atrous{rate}")(x, train=train))
    if self.image_pooling:
      pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
      pooled = conv(1, name="image_pool")(pooled, train=train)
      branches.append(jnp.broadcast_to(pooled, x.shape[:3] + (self.features,)))
    y = conv(1, name="project")(jnp.concatenate(branches, axis=-1), train=train)
    return nn.Dropout(self.dropout, deterministic=not train)(y)


class DeepLabV3Plus(nn.Module):
  """DeepLabv3+ returning float32 logits [N, H, W, num_logits] at the input size.

  H and W must be multiples of `resnet.input_divisor(output_stride, stem)`.
  """
  num_logits: int = 1
  backbone: str = "resnet50"      # a ResNet (resnet.RESNETS)
  width: int = 64                 # the ResNet's stage-1 width (64 in the standard networks)
  output_stride: int = 16         # stride of the last map: 8 | 16 (atrous last stages) | 32;
                                  # with stem small_stride2: 4 | 8 | 16
  stem: str = "imagenet"          # imagenet (7x7/2 + max pool) | small | small_stride2
  aspp_features: int = 256
  aspp_rates: Sequence[int] = (6, 12, 18)  # atrous rates of the 3x3 ASPP branches
  image_pooling: bool = True      # the ASPP's global-average branch
  low_level_features: int = 48    # channels of the fused low-level map after its 1x1 conv
  low_level: str = "c2"           # the map the decoder fuses: c2 (stride 4, as in the paper) |
                                  # c1 (stride 2: finer masks on small images)
  decoder_features: int = 256
  dropout: float = 0.0            # after the ASPP
  norm: str = "batch"
  norm_groups: int = 8
  frozen_backbone_norm: bool = False  # the backbone's batch norms keep their loaded statistics,
                                      # scale and bias (detectron2's FrozenBN): small batches
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    divisor = resnet.input_divisor(self.output_stride, self.stem)
    if x.shape[1] % divisor or x.shape[2] % divisor:
      raise ValueError(f"DeepLabv3+ at output stride {self.output_stride} needs H and W "
                       f"divisible by {divisor}, got {x.shape[1:3]}")
    features = resnet.ResNet(arch=self.backbone, width=self.width,
                             output_stride=self.output_stride, stem=self.stem, norm=self.norm,
                             norm_groups=self.norm_groups,
                             frozen_norm=self.frozen_backbone_norm, dtype=self.dtype,
                             name="backbone")(x, train=train)
    norm = layers.Norm(kind=self.norm, groups=self.norm_groups, dtype=self.dtype)
    y = ASPP(features=self.aspp_features, rates=tuple(self.aspp_rates),
             image_pooling=self.image_pooling, dropout=self.dropout, norm=norm, dtype=self.dtype,
             name="aspp")(features["c5"], train=train)
    conv = lambda f, k, name: layers.ConvNormAct(features=f, kernel_size=k, norm=norm,
                                                 dtype=self.dtype, name=name)
    low = conv(self.low_level_features, 1, "low_level")(features[self.low_level], train=train)
    # Bilinear (half-pixel centres) by the maps' stride ratios, which H, W divisible by `divisor`
    # make integers: layers.upsample_bilinear, so that ONNX export converts the resizes.
    strides = resnet.feature_strides(self.output_stride, self.stem)
    factor = strides["c5"] // strides[self.low_level]
    y = layers.upsample_bilinear(y, (factor, factor))
    y = jnp.concatenate([y, low], axis=-1)
    y = conv(self.decoder_features, 3, "decoder1")(y, train=train)
    y = conv(self.decoder_features, 3, "decoder2")(y, train=train)
    logits = layers.Conv(self.num_logits, (1, 1), dtype=self.dtype, name="head")(y)
    factor = strides[self.low_level]
    return layers.upsample_bilinear(logits.astype(jnp.float32), (factor, factor))


LOW_LEVELS = ("c1", "c2")


def _check(config) -> None:
  m = config.model
  resnet.check_backbone(m, widths={f"model.{k}": m[k] for k in (
      "aspp_features", "low_level_features", "decoder_features")})
  strides = resnet.output_strides(m.stem)
  if m.output_stride not in strides:
    registry.fail("model.output_stride", m.output_stride,
                  f"must be one of {', '.join(map(str, strides))} with model.stem={m.stem!r}")
  registry.check_choice("model.low_level", m.low_level, LOW_LEVELS)
  rates = m.aspp_rates
  if (not isinstance(rates, (tuple, list))
      or any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in rates)):
    registry.fail("model.aspp_rates", rates, "must be a tuple of integers >= 1, e.g. (6, 12, 18)")
  for key in ("aspp_features", "low_level_features", "decoder_features"):
    registry.check_int(f"model.{key}", m[key])
  if not isinstance(m.image_pooling, bool):
    registry.fail("model.image_pooling", m.image_pooling, "must be True or False")
  registry.check_fraction("model.dropout", m.dropout, closed=False)


ENTRY = registry.register_model(registry.ModelEntry(
    name="deeplabv3plus", module=DeepLabV3Plus,
    defaults=registry.field_defaults(DeepLabV3Plus, exclude=("num_logits", "dtype")),
    input_multiple=lambda m: resnet.input_divisor(m.output_stride, m.stem),
    input_multiple_reason=lambda m: (f"the input multiple of deeplabv3plus at "
                                     f"model.output_stride={m.output_stride}"),
    check=_check,
    backbone=lambda m: "backbone",
    description="DeepLabv3+ on an atrous ResNet"))
