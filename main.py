"""seg_jax entry point.

  python main.py --config=configs/unet.py --workdir=runs/unet [--config.key=value ...] [--mode=train|eval]

User errors (unknown config key, bad value, bad data, NaN loss) end with a
one-line message on stderr and a non-zero exit code, not a traceback.
"""

import os
import sys

# Keep TensorFlow (used only for input pipelines) off the accelerators and quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_GCE_CHECK", "true")

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from seg_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/unet.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and pictures.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (resumes automatically) or eval.")
flags.mark_flags_as_required(["config", "workdir"])


def _fail(message: str, code: int = 2) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  try:
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    _fail(str(e))
  if config.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.compilation_cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  logging.info("JAX devices: %d (%s), processes: %d", jax.device_count(),
               jax.devices()[0].platform, jax.process_count())

  # Imported after flag parsing so that `--help` and config errors are instant.
  from seg_jax import train
  from seg_jax.data import pipeline
  try:
    if _MODE.value == "train":
      train.train_and_evaluate(config, _WORKDIR.value)
    else:
      train.evaluate(config, _WORKDIR.value)
  except (pipeline.DataError, train.NonFiniteError, FileNotFoundError) as e:
    _fail(str(e), code=1)


if __name__ == "__main__":
  app.run(main)
