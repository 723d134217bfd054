"""Model name -> linen module built from the config."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from seg_jax import config as config_lib
from seg_jax.models import resnet
from seg_jax.models import unet
from seg_jax.models.deeplab import DeepLabV3Plus


def _unet(config: ml_collections.ConfigDict) -> nn.Module:
  m = config.model
  return unet.UNet(num_logits=config_lib.num_logits(config), width=m.width, depth=m.depth,
                   norm=m.norm, norm_groups=m.norm_groups, upsample=m.upsample,
                   dropout=m.dropout, dtype=jnp.dtype(config.dtype), backbone=m.backbone,
                   stem=m.backbone_stem)


def _deeplabv3plus(config: ml_collections.ConfigDict) -> nn.Module:
  m = config.model
  return DeepLabV3Plus(
      num_logits=config_lib.num_logits(config), backbone=m.backbone, width=m.width,
      output_stride=m.output_stride, stem=m.backbone_stem, aspp_features=m.aspp_features,
      aspp_rates=tuple(m.aspp_rates), image_pooling=m.aspp_image_pooling,
      low_level_features=m.decoder_low_level_features, low_level=m.decoder_low_level,
      decoder_features=m.decoder_features,
      dropout=m.dropout, norm=m.norm, norm_groups=m.norm_groups, dtype=jnp.dtype(config.dtype))


MODELS: dict[str, Callable[[ml_collections.ConfigDict], nn.Module]] = {
    "unet": _unet, "deeplabv3plus": _deeplabv3plus}


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  if config.model.name not in MODELS:
    raise ValueError(f"unknown model {config.model.name!r}; allowed: {', '.join(MODELS)}")
  return MODELS[config.model.name](config)


def input_divisor(config: ml_collections.ConfigDict) -> int:
  """The model's input height and width must be multiples of this."""
  if config.model.name == "deeplabv3plus":
    return resnet.input_divisor(config.model.output_stride, config.model.backbone_stem)
  return unet.input_divisor(config.model.depth, config.model.backbone, config.model.backbone_stem)
