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


def segformer_forward_flops(batch: int, height: int, width: int, channels: int, arch,
                            num_logits: int) -> int:
  """Matmuls and convolutions of SegFormer (models/segformer.py), forward: patch embeddings,
  the attention's projections, key/value reduction convs and its two matmuls (QK^T and the
  weighted sum of values), the Mix-FFN's linears and depth-wise convs, the decoder's linears,
  fuse conv and classifier. `arch`: a `segformer.Variant`. Norms, softmax, GELU and the
  bilinear resizes are left out."""
  from seg_jax.models import segformer  # pylint: disable=import-outside-toplevel
  total, c_in, stride, tokens = 0, channels, 1, []
  for i, (c, depth) in enumerate(zip(arch.hidden_sizes, arch.depths)):
    stride *= segformer.STRIDES[i]
    t = (height // stride) * (width // stride)     # queries
    s = t // arch.sr_ratios[i] ** 2                # reduced keys and values
    k = segformer.PATCH_SIZES[i]
    total += 2 * batch * t * c_in * c * k * k      # overlapping patch embedding
    hidden = c * arch.mlp_ratio
    block = (2 * batch * t * c * c * 2              # query and output projections
             + 2 * batch * s * c * c * 2            # key and value projections
             + 4 * batch * t * s * c                # QK^T and the weighted sum of values
             + 2 * batch * t * hidden * c * 2       # Mix-FFN linears
             + 2 * batch * t * hidden * 9)          # depth-wise 3x3
    if arch.sr_ratios[i] > 1:
      block += 2 * batch * s * c * c * arch.sr_ratios[i] ** 2  # the reduction conv
    total += depth * block
    tokens.append(t)
    c_in = c
  d = arch.decoder_hidden_size
  total += sum(2 * batch * t * c * d for t, c in zip(tokens, arch.hidden_sizes))
  total += 2 * batch * tokens[0] * 4 * d * d + 2 * batch * tokens[0] * d * num_logits
  return total
