"""XLA flags seg_jax sets for its programs; import and call before jax is imported.

This module imports nothing from jax on purpose: XLA reads XLA_FLAGS once,
when the backend starts.
"""

import os

# XLA:CPU's YNNPACK fusions for dots and reductions (benchmarks/train_step.py on a 2-core
# Xeon, medians of alternating runs): U-Net default config 176 ms with plain XLA, 133 ms with
# these; with YNN's eltwise fusions added as well it was 168 ms, Mask R-CNN 321 instead of
# 279 ms, DeepLabv3+ 183 instead of 139 ms. YNN's eltwise fusions are left out: they cannot fuse a
# broadcast, so every per-channel scale and shift (batch norm, biases) was first written out at
# the activation's full size. The gradients are the same (tests/test_xla_flags.py). Only the
# CPU backend reads it.
YNN_FUSIONS = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"


def set_default_xla_flags() -> None:
  """Adds YNN_FUSIONS to XLA_FLAGS unless the user set a ynn flag or SEG_JAX_PLAIN_XLA=1."""
  flags = os.environ.get("XLA_FLAGS", "")
  if os.environ.get("SEG_JAX_PLAIN_XLA") or "ynn_fusion" in flags:
    return
  os.environ["XLA_FLAGS"] = f"{flags} {YNN_FUSIONS}".strip()
