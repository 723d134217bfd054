"""The model and dataset registries: what `model.name` and `dataset.name` may be.

A model family or a dataset owns its config. Its module registers an entry
(`register_model`, `register_dataset`) that gives its default keys, how to
build or prepare it, its input multiple and its own checks; `seg_jax/config.py`
adds those keys under `config.model` / `config.dataset` and runs the checks.
The built-in entries register when `seg_jax.models` and `seg_jax.data.catalog`
are imported (`seg_jax.config` imports both); a project or a test registers its
own the same way, from its own files.

This module is a leaf: it imports nothing of seg_jax, so every component can
register without an import cycle.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import ml_collections

TASKS = ("semantic", "instance", "volumetric")


class ConfigError(ValueError):
  """A config key is unknown or has a bad value; the message is one line."""


def fail(key: str, value: Any, why: str) -> None:
  """Raises ConfigError for `config.<key>=<value>` with the reason `why`."""
  raise ConfigError(f"config.{key}={value!r}: {why}")


def _no_check(config: ml_collections.ConfigDict) -> None:
  del config


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """A model family.

  `module` is called with `config.model`'s keys (all but the run keys `name`, `init_from`
  and `input_normalization`),
  which are exactly `defaults`' keys and named as the module's fields, plus
  what the run decides: the compute `dtype` and, by `task`, `num_logits`
  (semantic: one per class, or one for BCE) or `num_classes` (instance: object
  classes, background excluded). `fixed` adds module arguments that are not
  config keys (Faster R-CNN is Mask R-CNN with `with_masks=False`).
  """
  name: str
  module: Callable[..., Any]
  defaults: Mapping[str, Any]
  task: str = "semantic"
  # config.model -> the input's height and width must be multiples of this, and why (in errors)
  input_multiple: Callable[[ml_collections.ConfigDict], int] = lambda model: 1
  input_multiple_reason: Callable[[ml_collections.ConfigDict], str] | None = None
  # config -> raises ConfigError (use `fail`) for a bad value of this model's keys
  check: Callable[[ml_collections.ConfigDict], None] = _no_check
  fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # keys that change inference only (thresholds, budgets of kept detections): a workdir's
  # model may be used with other values of these
  inference_keys: tuple[str, ...] = ()
  # config.model -> the '/'-joined path of the pretrained backbone's parameters in the model
  # ('' = none): the parameter group that optimizer.backbone_* keys address
  backbone: Callable[[ml_collections.ConfigDict], str] = lambda model: ""
  description: str = ""


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
  """A dataset: where its examples come from and what its labels mean.

  `prepare(config, data_dir)` returns a prepared TFDS builder (generated, or
  read from its cache) and the class names. Stored examples hold the features
  named by `feature_keys` (image, mask, id); `label_table(config)`, if given,
  maps stored mask values to class ids; `decode(example, max_instances)`, if
  given, replaces the standard decoding (instance datasets with their own
  stored layout). `num_classes`: the class counts it can give (empty = any).
  """
  name: str
  defaults: Mapping[str, Any]
  prepare: Callable[[ml_collections.ConfigDict, str | None], tuple[Any, list[str]]]
  num_classes: tuple[int, ...] = ()
  default_num_classes: int | None = None
  eval_split: str = "validation"
  has_instances: bool = False
  # volumes (CT, MRI): `prepare` returns a `seg_jax.data.volumes.VolumeSet` instead of a TFDS
  # builder, and the volumetric task trains on its patches and evaluates whole cases
  volumetric: bool = False
  # config -> None: sets keys the data decides (decathlon: num_classes from dataset.json), before
  # the model is built
  configure: Callable[[ml_collections.ConfigDict], None] | None = None
  feature_keys: tuple[str, str, str] = ("image", "mask", "id")
  label_table: Callable[[ml_collections.ConfigDict], Any] | None = None
  decode: Callable[[dict, int], dict] | None = None
  # prepared builder -> what the data determines: 'num_classes' (with background),
  # 'max_objects' ({split: most objects in one of its images}) and, where the labels have their
  # own ids, 'category_ids' (class c is category_ids[c - 1]). With it, num_classes and
  # max_instances may be 0 = "from the data" (`pipeline.resolve_config`).
  facts: Callable[[Any], dict[str, Any]] | None = None
  # (prepared builder, split) -> what scoring in the dataset's own terms needs (coco_json:
  # its `EvalReference`: the eval JSON, original image ids, sizes and category ids)
  eval_reference: Callable[[Any, str], Any] | None = None
  check: Callable[[ml_collections.ConfigDict], None] = _no_check
  description: str = ""


_MODELS: dict[str, ModelEntry] = {}
_DATASETS: dict[str, DatasetEntry] = {}


def register_model(entry: ModelEntry) -> ModelEntry:
  """Adds (or replaces, by name) a model family; returns it."""
  if entry.task not in TASKS:
    raise ValueError(f"model {entry.name}: task must be one of {', '.join(TASKS)}")
  reserved = {"name", "init_from", "input_normalization"} & set(entry.defaults)
  if reserved:
    raise ValueError(f"model {entry.name}: {', '.join(sorted(reserved))} are run keys")
  _MODELS[entry.name] = entry
  return entry


def register_dataset(entry: DatasetEntry) -> DatasetEntry:
  """Adds (or replaces, by name) a dataset; returns it."""
  _DATASETS[entry.name] = entry
  return entry


def input_multiple_reason(entry: ModelEntry, model_config: ml_collections.ConfigDict) -> str:
  """Why the input must be a multiple of `entry.input_multiple(model_config)`, for messages."""
  if entry.input_multiple_reason is not None:
    return entry.input_multiple_reason(model_config)
  return f"the input multiple of {entry.name}"


def model_names() -> tuple[str, ...]:
  return tuple(_MODELS)


def dataset_names() -> tuple[str, ...]:
  return tuple(_DATASETS)


def model_entry(name: str) -> ModelEntry:
  """The entry of `model.name`; ConfigError (one line, the names there are) if unknown."""
  if name not in _MODELS:
    fail("model.name", name, f"unknown model; models: {', '.join(_MODELS)}")
  return _MODELS[name]


def dataset_entry(name: str) -> DatasetEntry:
  """The entry of `dataset.name`; ConfigError (one line, the names there are) if unknown."""
  if name not in _DATASETS:
    fail("dataset.name", name, f"unknown dataset; datasets: {', '.join(_DATASETS)}")
  return _DATASETS[name]


def models_with_key(key: str) -> list[str]:
  """Names of the model families that have `key` among their keys."""
  return [name for name, entry in _MODELS.items() if key in entry.defaults]


def datasets_with_key(key: str) -> list[str]:
  """Names of the datasets that have `key` among their keys."""
  return [name for name, entry in _DATASETS.items() if key in entry.defaults]


def field_defaults(module: type, *, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
  """{field: default} of a linen module's dataclass fields (a model entry's `defaults`), less
  flax's own (`parent`, `name`) and `exclude` (what the run decides: `num_logits`, `dtype`)."""
  skip = {"parent", "name", *exclude}
  out = {}
  for field in dataclasses.fields(module):
    if field.name in skip or not field.init:
      continue
    if field.default is dataclasses.MISSING:
      raise ValueError(f"{module.__name__}.{field.name} has no default; exclude it or give one")
    out[field.name] = field.default
  return out


def check_choice(key: str, value: Any, allowed: tuple) -> None:
  if value not in allowed:
    fail(key, value, f"must be one of {', '.join(map(str, allowed))}")


def check_int(key: str, value: Any, *, minimum: int = 1) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    fail(key, value, "must be a positive integer" if minimum == 1 else f"must be an integer >= {minimum}")


def check_fraction(key: str, value: Any, *, closed: bool = True) -> None:
  """value in [0, 1] (closed) or [0, 1)."""
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
      0 <= value <= 1 if closed else 0 <= value < 1)
  if not ok:
    fail(key, value, "must be in [0, 1]" if closed else "must be in [0, 1)")
