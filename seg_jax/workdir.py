"""What a workdir holds besides its checkpoints, so that it can be used on its own.

Training writes, next to `checkpoints/`:

  config.json   the resolved config of the run (every key, after overrides)
  model.json    what using the model needs without the training data: the model and task,
                class names, input channels, the input normalisation, the input multiple

`--mode=predict` and `--mode=eval` start from these (`python main.py
--workdir=runs/x --mode=predict --config.predict.input=...`, no `--config`):
main.py then loads this file as the config file with the workdir as its
argument (`get_config`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from seg_jax import config as config_lib
from seg_jax import models
from seg_jax import registry
from seg_jax.data import image_io

CONFIG_FILE = "config.json"
USE_OWN = "eval and predict use the workdir's model: leave out --config and model overrides"
MODEL_FILE = "model.json"


class WorkdirError(OSError):
  """The workdir cannot be created or written, or lacks what a mode needs."""


def write(workdir: str, config: ml_collections.ConfigDict, *, class_names: list[str],
          channels: int, category_ids: list[int] | None = None,
          preprocessing: dict | None = None) -> None:
  """Writes config.json and model.json (call on process 0 only). `category_ids`: the
  dataset's own label ids (coco_json), class c being category_ids[c - 1]. `preprocessing`: how
  a volumetric dataset made its inputs from NIfTI files (target spacing, normalisation)."""
  entry = registry.model_entry(config.model.name)
  info = {
      "model": config.model.name,
      "task": entry.task,
      "dataset": config.dataset.name,
      "num_classes": config.dataset.num_classes,
      "class_names": list(class_names),
      "ignore_label": config.dataset.ignore_label,
      "input_channels": int(channels),
      "input_normalization": image_io.NORMALIZATIONS[config.model.input_normalization],
      "input_multiple": models.input_multiple(config),
      "training_image_size": config.dataset.image_size,
  }
  if preprocessing is not None:
    info["volume_preprocessing"] = preprocessing
  if category_ids is not None:
    info["category_ids"] = [int(c) for c in category_ids]
  write_json(os.path.join(workdir, CONFIG_FILE), config.to_dict())
  write_json(os.path.join(workdir, MODEL_FILE), info)


def write_json(path: str, value: Any) -> None:
  """`value` as JSON at `path`, written under a temporary name and renamed when complete."""
  with open(path + ".partial", "w") as f:
    json.dump(value, f, indent=2, default=_json_default)
    f.write("\n")
  os.replace(path + ".partial", path)


def _json_default(value):
  if isinstance(value, (set, frozenset)):
    return sorted(value)
  raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def has_config(workdir: str) -> bool:
  return os.path.isfile(os.path.join(workdir, CONFIG_FILE))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config from WORKDIR/config.json, with the types of a freshly built config (JSON
  lists back to tuples); WorkdirError if there is none or it cannot be read."""
  saved = _read_json(os.path.join(workdir, CONFIG_FILE))
  try:
    config = config_lib.base_config(saved["model"]["name"], saved["dataset"]["name"])
  except (KeyError, TypeError) as e:
    raise WorkdirError(f"{os.path.join(workdir, CONFIG_FILE)}: not a seg_jax config ({e})") from None
  _assign(config, saved, where=os.path.join(workdir, CONFIG_FILE))
  return config


def _assign(config: ml_collections.ConfigDict, saved: dict, *, where: str, prefix: str = "") -> None:
  for key, value in saved.items():
    name = f"{prefix}{key}"
    if key not in config:
      raise WorkdirError(f"{where}: key {name} is unknown to this version of seg_jax")
    default = config[key]
    if isinstance(default, ml_collections.ConfigDict):
      _assign(default, value, where=where, prefix=f"{name}.")
      continue
    value = models.as_tuples(value)
    with config.ignore_type():
      config[key] = value


def read_model_info(workdir: str) -> dict:
  """WORKDIR/model.json as a dict; WorkdirError if missing."""
  return _read_json(os.path.join(workdir, MODEL_FILE))


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise WorkdirError(f"{path} does not exist: train into this workdir first (a workdir "
                       "trained before seg_jax wrote it needs --config)") from None
  except (OSError, ValueError) as e:
    raise WorkdirError(f"{path} cannot be read: {e}") from None


def check_same_model(config: ml_collections.ConfigDict, workdir: str) -> None:
  """ConfigError (one line) if `config` builds another model than the workdir's: another model,
  other model keys (those that only change inference excepted), or another number of outputs."""
  saved = read_config(workdir)
  if config.model.name != saved.model.name:
    raise config_lib.ConfigError(
        f"config.model.name={config.model.name!r}, but {workdir} holds a {saved.model.name!r}; "
        f"{USE_OWN}")
  free = {"init_from", *registry.model_entry(config.model.name).inference_keys}
  for key in config.model:
    differs = models.as_tuples(config.model[key]) != models.as_tuples(saved.model[key])
    if key not in free and differs:
      raise config_lib.ConfigError(
          f"config.model.{key}={config.model[key]!r}, but the model in {workdir} was trained "
          f"with {saved.model[key]!r}; {USE_OWN}")
  if models.num_logits(config) != models.num_logits(saved) or \
     config.dataset.num_classes != saved.dataset.num_classes:
    raise config_lib.ConfigError(
        f"config.dataset.num_classes={config.dataset.num_classes} (loss {config.loss.name!r}), "
        f"but the model in {workdir} has {saved.dataset.num_classes} classes (loss "
        f"{saved.loss.name!r})")


def get_config(workdir: str) -> ml_collections.ConfigDict:
  """Config-file entry point: `--config=seg_jax/workdir.py:WORKDIR` is the workdir's config."""
  return read_config(os.path.expanduser(workdir))
