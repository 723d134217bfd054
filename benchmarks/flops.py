"""Analytic FLOP counts of the models, to cross-check XLA's cost analysis (which, on GPU, leaves
cuDNN convolutions out). A multiply-add is 2 FLOPs; a train step is counted as 3x the forward
pass (forward, input gradient, weight gradient), the usual convention for model-FLOPs utilisation."""

from __future__ import annotations


def conv_flops(n: int, h: int, w: int, c_in: int, c_out: int, k: int) -> int:
  """One stride-1 'SAME' k x k convolution over [n, h, w, c_in] -> [n, h, w, c_out]."""
  return 2 * n * h * w * c_in * c_out * k * k


def unet_forward_flops(batch: int, size: int, channels: int, width: int, depth: int,
                       num_logits: int) -> int:
  """Convolutions of seg_jax's classic U-Net (models/unet.py), forward; norms, pools and
  activations (a few % of the total) are left out."""
  total, c, s = 0, channels, size
  widths = [width * 2 ** level for level in range(depth + 1)]
  for level in range(depth + 1):                   # encoder levels and the bottleneck
    f = widths[level]
    total += conv_flops(batch, s, s, c, f, 3) + conv_flops(batch, s, s, f, f, 3)
    c = f
    if level < depth:
      s //= 2
  for level in reversed(range(depth)):             # decoder
    f = widths[level]
    total += conv_flops(batch, s, s, c, 4 * f, 1)  # learned 2x upsampling (1x1 to 4*f)
    s *= 2
    total += conv_flops(batch, s, s, 2 * f, f, 3) + conv_flops(batch, s, s, f, f, 3)
    c = f
  return total + conv_flops(batch, s, s, c, num_logits, 1)
