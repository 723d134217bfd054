"""Model name -> linen module built from the config."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from seg_jax import config as config_lib
from seg_jax.models.unet import UNet


def _unet(config: ml_collections.ConfigDict) -> nn.Module:
  m = config.model
  return UNet(num_logits=config_lib.num_logits(config), width=m.width, depth=m.depth,
              norm=m.norm, norm_groups=m.norm_groups, upsample=m.upsample,
              dropout=m.dropout, dtype=jnp.dtype(config.dtype))


MODELS: dict[str, Callable[[ml_collections.ConfigDict], nn.Module]] = {"unet": _unet}


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  if config.model.name not in MODELS:
    raise ValueError(f"unknown model {config.model.name!r}; allowed: {', '.join(MODELS)}")
  return MODELS[config.model.name](config)
