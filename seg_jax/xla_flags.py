"""XLA flags seg_jax sets for its programs; import and call before jax is imported.

This module imports nothing from jax on purpose: XLA reads XLA_FLAGS once,
when the backend starts.
"""

import os

# XLA:CPU's YNNPACK fusions for dots, elementwise ops and reductions: U-Net
# train steps run 1.3-1.5x faster on a 2-core Xeon (benchmarks/train_step.py:
# default config 267 -> 204 ms, batch 16 depth 3 501 -> 326 ms), with the same
# gradients (tests/test_xla_flags.py). Only the CPU backend reads it.
YNN_FUSIONS = "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce"


def set_default_xla_flags() -> None:
  """Adds YNN_FUSIONS to XLA_FLAGS unless the user set a ynn flag or SEG_JAX_PLAIN_XLA=1."""
  flags = os.environ.get("XLA_FLAGS", "")
  if os.environ.get("SEG_JAX_PLAIN_XLA") or "ynn_fusion" in flags:
    return
  os.environ["XLA_FLAGS"] = f"{flags} {YNN_FUSIONS}".strip()
