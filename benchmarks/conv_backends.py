"""The same train step with XLA's and with oneDNN's convolutions, timed in one process.

  python benchmarks/conv_backends.py --config=configs/unet.py [--config.key=value ...] [--steps=15]

Both steps are compiled from one config and one initial state, differing only in
`config.conv_backend`, and are run alternately, one step each in turn, so that a machine whose
speed drifts (a shared VM) slows both alike. Prints one JSON line: the median step time of
each, their ratio, and the first step's loss of each (the same function, so they agree to
float rounding). Synthetic data as in train_step.py.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from seg_jax import host_memory  # before jax is imported; SEG_JAX_REUSE_HOST_MEMORY=1 to use
from seg_jax import xla_flags  # SEG_JAX_PLAIN_XLA=1 for plain XLA

xla_flags.set_default_xla_flags()
host_memory.keep_freed_memory()

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from benchmarks import harness
from benchmarks import synthetic_data
from seg_jax import parallel
from seg_jax import train
from seg_jax.ops import onednn

_CONFIG = config_flags.DEFINE_config_file("config", "configs/unet.py", "Experiment config.")
_STEPS = flags.DEFINE_integer("steps", 15, "Timed steps of each backend after 3 warm-up steps.")


def main(_):
  config = _CONFIG.value
  mesh, model, tx, schedule = harness.build(config)
  batch = parallel.host_batch_to_global(synthetic_data.batch(config), mesh)
  runs, losses = {}, {}
  for backend in ("xla", "onednn"):
    backend_config = config.copy_and_resolve_references()
    backend_config.conv_backend = backend
    step = jax.jit(lambda s, b, c=backend_config: train.train_step(
        s, b, model=model, tx=tx, schedule=schedule, config=c), donate_argnums=0)
    state = train.create_train_state(config, model, tx, mesh)
    compiled = step.lower(state, batch).compile()
    holder = {"state": state}

    def run(compiled=compiled, holder=holder):
      holder["state"], metrics = compiled(holder["state"], batch)
      return float(metrics["loss"])

    runs[backend], losses[backend] = run, run()
  times = {backend: [] for backend in runs}
  for i in range(3 + _STEPS.value):
    for backend, run in runs.items():
      t0 = time.perf_counter()
      run()
      if i >= 3:
        times[backend].append(time.perf_counter() - t0)
  ms = {backend: float(np.median(t)) * 1e3 for backend, t in times.items()}
  print(json.dumps({
      "benchmark": "conv_backends", "model": config.model.name, "batch_size": config.batch_size,
      "image_size": config.dataset.image_size, "width": config.model.width,
      "xla_step_ms": round(ms["xla"], 1), "onednn_step_ms": round(ms["onednn"], 1),
      "speedup": round(ms["xla"] / ms["onednn"], 3),
      "first_loss": {backend: round(loss, 6) for backend, loss in losses.items()},
      "onednn": onednn.version(), "jax": jax.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "cpu_count": os.cpu_count()}))


if __name__ == "__main__":
  app.run(main)
