"""Images/s the training input pipeline delivers to the host (TFDS -> augment -> batch); one JSON line.

  python benchmarks/input_pipeline.py --config=configs/unet.py [--batches=200]

Compare with benchmarks/train_step.py's img_per_s: the pipeline must be
faster than the step it feeds, on the cores it shares with it.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from seg_jax import host_memory  # as main.py does (SEG_JAX_REUSE_HOST_MEMORY=1)

_REUSES_HOST_MEMORY = host_memory.keep_freed_memory()

from absl import app
from absl import flags
from ml_collections import config_flags

from seg_jax import config as config_lib
from seg_jax.data import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", "configs/unet.py", "Experiment config.")
_BATCHES = flags.DEFINE_integer("batches", 200, "Timed batches after a full first epoch.")


def main(_):
  config = _CONFIG.value
  config_lib.validate(config)
  builder = pipeline.get_builder(config)
  batches = pipeline.train_batches(config, builder)
  epoch = config.dataset.num_train // config.batch_size + 1  # fills the in-memory cache
  for _ in range(epoch):
    next(batches)
  t0 = time.perf_counter()
  for _ in range(_BATCHES.value):
    next(batches)
  seconds = time.perf_counter() - t0
  print(json.dumps({"benchmark": "input_pipeline", "dataset": config.dataset.name,
                    "image_size": config.dataset.image_size, "batch_size": config.batch_size,
                    "img_per_s": round(_BATCHES.value * config.batch_size / seconds, 1),
                    "ms_per_batch": round(seconds / _BATCHES.value * 1e3, 2),
                    "reuse_host_memory": _REUSES_HOST_MEMORY, "cpu_count": os.cpu_count()}))


if __name__ == "__main__":
  app.run(main)
