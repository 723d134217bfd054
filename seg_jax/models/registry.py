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


def _detector(config: ml_collections.ConfigDict) -> nn.Module:
  """Mask R-CNN, or Faster R-CNN (no mask head); K = dataset.num_classes - 1 object classes."""
  from seg_jax.models.detection.mask_rcnn import MaskRCNN
  m, det = config.model, config.detection
  return MaskRCNN(
      num_classes=config.dataset.num_classes - 1, with_masks=m.name == "mask_rcnn",
      backbone=m.backbone, width=m.width, stem=m.backbone_stem, norm=m.norm,
      norm_groups=m.norm_groups, fpn_features=det.fpn_features,
      anchor_sizes=tuple((float(s),) for s in det.anchor_sizes),
      aspect_ratios=tuple(float(r) for r in det.aspect_ratios),
      rpn_pre_nms_topk=det.rpn_pre_nms_topk, rpn_post_nms_topk=det.rpn_post_nms_topk,
      rpn_nms_threshold=det.rpn_nms_threshold, rpn_num_samples=det.rpn_num_samples,
      roi_num_samples=det.roi_num_samples, roi_positive_fraction=det.roi_positive_fraction,
      canonical_size=det.canonical_size, box_head_hidden=det.box_head_hidden,
      mask_head_features=det.mask_head_features, mask_size=det.mask_size,
      score_threshold=det.score_threshold, nms_threshold=det.nms_threshold,
      detections_per_image=det.detections_per_image, dtype=jnp.dtype(config.dtype))


MODELS: dict[str, Callable[[ml_collections.ConfigDict], nn.Module]] = {
    "unet": _unet, "deeplabv3plus": _deeplabv3plus, "mask_rcnn": _detector,
    "faster_rcnn": _detector}


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  if config.model.name not in MODELS:
    raise ValueError(f"unknown model {config.model.name!r}; allowed: {', '.join(MODELS)}")
  return MODELS[config.model.name](config)


def input_divisor(config: ml_collections.ConfigDict) -> int:
  """The model's input height and width must be multiples of this."""
  if config.model.name == "deeplabv3plus":
    return resnet.input_divisor(config.model.output_stride, config.model.backbone_stem)
  if config.model.name in config_lib.DETECTION_MODELS:
    return resnet.input_divisor(32, config.model.backbone_stem)  # the FPN's ResNet: stride 32
  return unet.input_divisor(config.model.depth, config.model.backbone, config.model.backbone_stem)
