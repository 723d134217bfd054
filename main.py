"""seg_jax entry point.

  python main.py --config=configs/unet.py --workdir=runs/unet [--config.key=value ...]
  python main.py --workdir=runs/unet --mode=eval
  python main.py --workdir=runs/unet --mode=predict \
      --config.predict.input='images/*.png' [--config.predict.output=OUT]
  python main.py --workdir=runs/unet --mode=export [--config.export.step=N]

Eval, predict and export take the config the workdir was trained with (WORKDIR/config.json)
when --config is left out; their --config.predict.* (and other) overrides still apply.

Multi-host: the same command on every host, plus --distributed (or
--coordinator_address/--num_processes/--process_id); see README "Running long jobs".

User errors (unknown config key, bad value, bad data, NaN loss) end with a
one-line message on stderr and a non-zero exit code, not a traceback.
"""

import os
import sys

# Keep TensorFlow (used only for input pipelines) off the accelerators and quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_GCE_CHECK", "true")
from seg_jax import host_memory  # before jax is imported
from seg_jax import xla_flags

xla_flags.set_default_xla_flags()
host_memory.keep_freed_memory()  # only with SEG_JAX_REUSE_HOST_MEMORY=1

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from seg_jax import cli
from seg_jax import config as config_lib
from seg_jax import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/unet.py; for --mode=eval/predict/export the "
    "workdir's own config if left out.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and pictures.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "predict", "export"],
                          "train (resumes automatically), eval, predict (config.predict.*), or "
                          "export (ONNX/TFLite/SavedModel/StableHLO in WORKDIR/export).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Multi-host run: call jax.distributed.initialize(). On TPU pods, SLURM, Open MPI and "
    "Kubernetes JAX finds the coordinator and process ids itself; elsewhere give the three "
    "flags below (or JAX_COORDINATOR_ADDRESS in the environment).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (implies --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes).")
flags.mark_flags_as_required(["workdir"])


_fail = cli.fail


class _LibraryChatterFilter:
  """Drops INFO lines of libraries that log every checkpoint write and dataset read."""
  _NOISY = ("/orbax/", "/tensorflow_datasets/", "/jax/_src/xla_bridge")

  def filter(self, record) -> bool:
    return record.levelno > 20 or not any(p in record.pathname for p in self._NOISY)


def main(argv):
  logging.get_absl_handler().addFilter(_LibraryChatterFilter())
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    config = _CONFIG.value
    config_lib.validate(config)
    if _MODE.value != "train" and workdir_lib.has_config(_WORKDIR.value):
      # The training --config, or an override of the workdir's own, must build its model.
      workdir_lib.check_same_model(config, _WORKDIR.value)
  except config_lib.ConfigError as e:
    _fail(str(e))
  except OSError as e:  # ml_collections: the config file could not be loaded
    _fail(" ".join(str(e).split()))
  distributed = cli.distributed_options(_DISTRIBUTED.value, _COORDINATOR.value,
                                        _NUM_PROCESSES.value, _PROCESS_ID.value)
  if distributed is not None:
    # CPU processes need a collectives backend to form one cluster (GPUs/TPUs have their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
      jax.distributed.initialize(**distributed)
    except (ValueError, RuntimeError) as e:  # e.g. no cluster JAX can detect, coordinator gone
      _fail(f"--distributed: jax.distributed.initialize failed: {' '.join(str(e).split())[:300]}")
  if config.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.compilation_cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  logging.info("JAX devices: %d (%s), processes: %d", jax.device_count(),
               jax.devices()[0].platform, jax.process_count())

  # Imported after flag parsing so that `--help` and config errors are instant.
  from seg_jax import export
  from seg_jax import init_from
  from seg_jax import predict
  from seg_jax import train
  from seg_jax.data import pipeline
  try:
    if _MODE.value == "train":
      scalars = train.train_and_evaluate(config, _WORKDIR.value)
      if "preempted_at_step" in scalars:
        print(f"stopped after step {int(scalars['preempted_at_step'])} on request; checkpoint "
              "saved; run the same command again to resume", file=sys.stderr)
    elif _MODE.value == "eval":
      train.evaluate(config, _WORKDIR.value)
    elif _MODE.value == "predict":
      predict.run(config, _WORKDIR.value)
    else:
      export.run(config, _WORKDIR.value)
  except config_lib.ConfigError as e:
    _fail(str(e))
  except (pipeline.DataError, train.NonFiniteError, workdir_lib.WorkdirError, FileNotFoundError,
          init_from.InitFromError, export.ExportError) as e:
    _fail(str(e), code=1)


def _flag_value(argv, name: str) -> str | None:
  """The value of --name=VALUE or --name VALUE in argv (before absl parses it), else None."""
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _with_workdir_config(argv):
  """argv with --config=seg_jax/workdir.py:WORKDIR added for eval/predict/export without --config."""
  if _flag_value(argv, "config") is not None or any(a in ("--help", "-h", "--helpfull")
                                                     for a in argv):
    return argv
  mode, workdir = _flag_value(argv, "mode") or "train", _flag_value(argv, "workdir")
  if mode == "train" or not workdir:
    _fail("--config is required for training (and for --mode=eval/predict/export without --workdir)")
  if not workdir_lib.has_config(workdir):
    _fail(f"{workdir} has no {workdir_lib.CONFIG_FILE}: give the training --config")
  return [argv[0], f"--config={os.path.abspath(workdir_lib.__file__)}:{workdir}", *argv[1:]]


def _parse_flags(argv):
  # A dataset or model chosen on the command line is chosen when the --config file is loaded;
  # a workdir's own config (added by _with_workdir_config) is never rebuilt.
  argv = cli.choose_components_when_loading(argv)
  return cli.parse_flags(_with_workdir_config(argv), choose_components=False)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
