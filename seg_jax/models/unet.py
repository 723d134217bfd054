"""U-Net (Ronneberger et al., 2015): encoder-decoder with concatenated skips."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from seg_jax.models import layers


class DoubleConv(nn.Module):
  """Two 3x3 conv-norm-ReLU layers: one U-Net level."""
  features: int
  norm: str
  norm_groups: int
  dtype: Any

  @nn.compact
  def __call__(self, x, *, train: bool):
    for _ in range(2):
      x = layers.ConvNormAct(self.features, 3, self.norm, self.norm_groups, self.dtype)(x, train=train)
    return x


class UNet(nn.Module):
  """U-Net returning per-pixel logits.

  Input `[N, H, W, C]` with H and W divisible by 2**depth; output
  `[N, H, W, num_logits]` in float32 (num_logits = number of classes, or 1
  for binary tasks). Level i has `width * 2**i` channels; 2x2 max pooling down,
  learned or resize upsampling up, skips concatenated.
  """
  num_logits: int
  width: int = 32
  depth: int = 4
  norm: str = "batch"
  norm_groups: int = 8
  upsample: str = "transpose"
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    if x.shape[1] % 2 ** self.depth or x.shape[2] % 2 ** self.depth:
      raise ValueError(f"U-Net of depth {self.depth} needs H and W divisible by "
                       f"{2 ** self.depth}, got {x.shape[1:3]}")
    x = x.astype(self.dtype)
    block = lambda f: DoubleConv(f, self.norm, self.norm_groups, self.dtype)
    skips = []
    for level in range(self.depth):
      x = block(self.width * 2 ** level)(x, train=train)
      skips.append(x)
      x = layers.max_pool_2x2(x)
    x = block(self.width * 2 ** self.depth)(x, train=train)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    for level in reversed(range(self.depth)):
      features = self.width * 2 ** level
      x = layers.make_upsample(self.upsample, features, self.dtype)(x)
      x = jnp.concatenate([skips[level], x], axis=-1)
      x = block(features)(x, train=train)
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    logits = nn.Conv(self.num_logits, (1, 1), dtype=self.dtype, name="head")(x)
    return logits.astype(jnp.float32)
