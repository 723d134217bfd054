"""The run-level config keys, the assembly of a component's keys into a config, and the checks.

Every experiment config (`configs/*.py`) starts from `base_config(model=...,
dataset=...)`: the run keys documented here (seed, batch, steps, optimiser,
loss, checkpointing, predict, export) and, under `config.model` and `config.dataset`,
the keys of the chosen model family and dataset, which their own modules
define (`seg_jax/registry.py`). `validate(config)` runs before anything is
built: an unknown key (a typo in a config file or in `--config.x=y`) or a bad
value raises `ConfigError` with a one-line message naming the key and why.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable

from flax import traverse_util
import ml_collections
from ml_collections import config_dict

from seg_jax import data  # registers the built-in datasets
from seg_jax.data import image_io
from seg_jax import losses
from seg_jax import models  # registers the built-in models
from seg_jax import registry
from seg_jax.ops import conv as conv_ops

ConfigError = registry.ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "warmup_cosine", "polynomial")
DTYPES = ("float32", "bfloat16")
MATMUL_PRECISIONS = ("default", "high", "highest")  # jax_default_matmul_precision
TTA_MODES = ("none", "hflip", "hvflip")
ON_NONFINITE = ("stop", "skip")
BEST_MODES = ("max", "min")
DEFAULT_MODEL = "unet"
DEFAULT_DATASET = "shapes"


def base_config(model: str = DEFAULT_MODEL, dataset: str = DEFAULT_DATASET
                ) -> ml_collections.ConfigDict:
  """Every key a run of `model` on `dataset` may set, with its default."""
  c = ml_collections.ConfigDict()
  c.seed = 0                        # one seed for init, data order, augmentation, dropout
  c.batch_size = 16                 # global batch over all devices and hosts
  c.num_train_steps = 1000
  c.log_every_steps = 50            # train metrics, progress line, non-finite check
  c.eval_every_steps = 500          # also evaluates after the last step
  c.checkpoint_every_steps = 500    # also saves after the last step
  c.keep_checkpoints = 3            # newest checkpoints kept in WORKDIR/checkpoints
  c.num_eval_visuals = 6            # examples drawn into PNG panels at each eval
  c.dtype = "float32"               # compute dtype; parameters stay float32
  # Precision of float32 matmuls and convolutions: "default" lets accelerators use TF32 or
  # bf16 passes (NVIDIA Ampere+: TF32); "highest" is full float32. CPUs compute float32 anyway.
  c.matmul_precision = "default"
  # Who computes the convolutions: "xla"; "onednn" (float32, on a single CPU device; 1.2-2.5x
  # faster per layer than XLA:CPU's kernels; seg_jax/ops/conv.py); "auto": onednn where it can run.
  c.conv_backend = "auto"
  # A NaN/Inf loss, gradient norm or parameter norm: "stop" ends training naming the
  # step and quantity (nothing is saved); "skip" drops that step's update and counts it.
  c.on_nonfinite = "stop"
  c.max_consecutive_skips = 10      # skip: more non-finite steps in a row than this stops
  c.check_finite_every_steps = 0    # 0 = at every log step; 1 = every step (a host sync each)
  # Persistent XLA compilation cache ('' = off); speeds up a second start.
  c.compilation_cache_dir = "~/.cache/seg_jax/jax_cache"

  # Instance tasks: detections of at least this score are drawn in the eval pictures.
  c.visual_score_threshold = 0.5
  # Write a profiler trace (TensorBoard's profile tab; WORKDIR/plugins/profile) of this many
  # train steps, starting after the first compiled step; 0 = off.
  c.profile_steps = 0

  c.dataset = _dataset_section(dataset)
  c.model = _model_section(model)

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "ce+dice"           # '+'-joined terms from ce, bce, dice, focal
  c.loss.ce_weight = 1.0
  c.loss.bce_weight = 1.0
  c.loss.dice_weight = 1.0
  c.loss.focal_weight = 1.0
  c.loss.class_weights = config_dict.placeholder(tuple)  # per-class CE weights, or None
  c.loss.dice_smooth = 1.0
  c.loss.focal_gamma = 2.0

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"        # sgd (with momentum) | adam | adamw
  c.optimizer.learning_rate = 1e-3  # peak learning rate
  c.optimizer.momentum = 0.9        # sgd
  c.optimizer.nesterov = False      # sgd
  c.optimizer.b1 = 0.9              # adam, adamw
  c.optimizer.b2 = 0.999
  c.optimizer.weight_decay = 0.0    # adamw: decoupled; sgd/adam: added to the gradient (L2)
  c.optimizer.schedule = "warmup_cosine"  # constant | warmup_cosine | polynomial
  c.optimizer.warmup_steps = 0      # linear warm-up (all schedules)
  c.optimizer.end_learning_rate_factor = 0.0  # polynomial/cosine: final lr / peak lr
  c.optimizer.power = 0.9           # polynomial decay power ("poly" schedule of DeepLab)
  c.optimizer.grad_clip_norm = 0.0  # clip by global norm; 0 = off
  # Exponential moving average of the weights, updated after every optimiser update:
  # ema = decay * ema + (1 - decay) * params, starting from the initial params; 0 = off. When
  # on, evaluation, checkpoints' inference weights, eval and predict use the average
  # (train.inference_variables); batch-norm statistics are the trained model's own.
  c.optimizer.ema_decay = 0.0
  # Gradient accumulation (optax.MultiSteps): the mean gradient of this many consecutive train
  # steps (each of batch_size) makes one optimiser update, i.e. an effective batch of
  # accumulate_steps * batch_size. num_train_steps counts batches and must be a multiple; the
  # learning-rate schedule and warmup_steps count optimiser updates (num_train_steps / k of them).
  c.optimizer.accumulate_steps = 1

  # Checkpoints besides the newest keep_checkpoints in WORKDIR/checkpoints.
  c.checkpoint = ml_collections.ConfigDict()
  # Also keep the checkpoint of the best evaluation by this eval scalar (e.g. eval/dice, or
  # eval/mask_AP) in WORKDIR/checkpoints_best; '' = off.
  c.checkpoint.best_metric = ""
  c.checkpoint.best_mode = "max"    # max | min: which value of best_metric is best
  # Which checkpoint --mode=eval and --mode=predict use: latest | best | a step number.
  c.checkpoint.use = "latest"
  # Fine-tuning a pretrained backbone (the model's ResNet; seg_jax/train.make_optimizer): its
  # learning rate is the schedule's times this, and it stays as loaded for the first
  # backbone_frozen_steps steps (its batch-norm statistics too with model.frozen_backbone_norm).
  c.optimizer.backbone_learning_rate_multiplier = 1.0
  c.optimizer.backbone_frozen_steps = 0

  # --mode=predict: segment image files with the newest checkpoint (seg_jax/predict.py).
  c.predict = ml_collections.ConfigDict()
  c.predict.input = ""              # image file, directory, or glob ('**' recurses)
  c.predict.output = ""             # output directory; '' = WORKDIR/predictions
  c.predict.tile_size = 256         # square tiles the model sees (sliding window), pixels
  c.predict.overlap = 0.25          # fraction of a tile shared with its neighbour, in [0, 1)
  c.predict.tta = "none"            # flip test-time augmentation: none | hflip | hvflip
  c.predict.save_probabilities = False  # also write <stem>_probs.npy (float16 [H, W, classes])
  c.predict.batch_size = 4          # tiles per device call (a multiple of the device count)

  # --mode=export: ONNX, TFLite, SavedModel and StableHLO files in WORKDIR/export (seg_jax/export.py).
  c.export = ml_collections.ConfigDict()
  c.export.step = 0                 # checkpoint step to export; 0 = the newest
  c.export.image_size = 0           # TFLite's fixed square input, pixels; 0 = dataset.image_size
  # Inside the exported graphs, smaller images are mirrored up to this size (and every size up to
  # the model's input multiple), then the outputs cropped: predict pads an image smaller than a
  # tile so, and their class ids then match. 0 = predict.tile_size.
  c.export.min_size = 0
  c.export.onnx = True              # False: no model.onnx
  # The int8 TFLite model's Dice (beside the JAX model's) on the first this many images of
  # dataset.eval_split whose size is the TFLite input's; 0 = not measured.
  c.export.dice_images = 64
  c.predict.score_threshold = 0.5   # detectors: detections drawn and in <stem>_instances.png
  return c


# config.dataset keys of every dataset that describe the input pipeline rather than the data
# (with_dataset keeps them); the others are the name, its class count and eval split, and the
# dataset's own keys.
PIPELINE_KEYS = ("data_dir", "ignore_label", "image_size", "max_instances", "resize",
                 "resize_range", "max_longer_side", "eval_size", "eval_pad_multiple",
                 "shuffle_buffer", "cache", "augment")


def _dataset_section(name: str) -> ml_collections.ConfigDict:
  """The input pipeline's keys, for every dataset, and the dataset's own keys."""
  entry = registry.dataset_entry(name)
  d = ml_collections.ConfigDict()
  d.name = name
  d.data_dir = ""           # TFDS data dir; '' = TFDS default (~/tensorflow_datasets)
  # including background (class 0); 0 = from the data (datasets with `facts`)
  d.num_classes = 2 if entry.default_num_classes is None else entry.default_num_classes
  d.ignore_label = 255      # never counts in loss or metrics
  d.image_size = 64         # training crop size (and the shapes dataset's generated size)
  d.eval_split = entry.eval_split
  d.max_instances = 16      # instance tasks: objects per image (padded; more is an error);
                            # 0 = the most any image holds (datasets with `facts`: coco_json)
  d.resize = 0              # 0 = native size; else the shorter side is resized to this
                            # (train and eval) before cropping / padding
  # Training only: the shorter side drawn uniformly from lo..hi per example instead of
  # dataset.resize (detectron2's ResizeShortestEdge); (0, 0) = dataset.resize.
  d.resize_range = (0, 0)
  d.max_longer_side = 0     # after resizing, the longer side is capped at this (0 = no cap)
  # Eval batches images of different sizes by padding each (ignore label) to one canvas per split:
  # (0, 0) = the split's largest (resized) height and width rounded up to eval_pad_multiple;
  # (H, W) = a fixed canvas; larger images are downscaled to fit it (aspect kept).
  d.eval_size = (0, 0)
  d.eval_pad_multiple = 32
  d.shuffle_buffer = 2000
  d.cache = True            # cache decoded examples in memory
  d.augment = ml_collections.ConfigDict()
  d.augment.hflip = True
  d.augment.vflip = True
  d.augment.min_scale = 0.75   # random scale-and-crop: scale factor range
  d.augment.max_scale = 1.25
  d.augment.brightness = 0.15  # colour jitter magnitudes (0 = off); 3-channel images only
  d.augment.contrast = 0.2
  d.augment.saturation = 0.2
  d.augment.hue = 0.03
  for key, value in entry.defaults.items():
    d[key] = value
  return d


def _model_section(name: str) -> ml_collections.ConfigDict:
  """`name`, `init_from` and the model family's own keys (its module's fields)."""
  entry = registry.model_entry(name)
  m = ml_collections.ConfigDict()
  m.name = name
  # Initialise matching parameters (same path and shape) from a local checkpoint before step 0:
  # a workdir, an Orbax checkpoint directory, or an .npz of arrays named by '/'-joined paths.
  # Also a PyTorch checkpoint (.pth, .safetensors, a Hugging Face directory) in a known layout,
  # e.g. torchvision's ResNets (seg_jax/init_from.py). Ignored when the workdir already has a
  # checkpoint (resume wins). Never downloads.
  m.init_from = ""
  # What the model's input is (seg_jax/data/image_io.NORMALIZATIONS): pixels / dtype max, then
  # "minus_one_to_one" (x * 2 - 1) or "imagenet" ((x - mean) / std, RGB; what ImageNet weights
  # expect). A model key because it belongs to the weights; recorded in WORKDIR/model.json.
  m.input_normalization = "minus_one_to_one"
  for key, value in entry.defaults.items():
    m[key] = value
  return m


def with_model(config: ml_collections.ConfigDict, name: str, *, keep_shared: bool = False
               ) -> ml_collections.ConfigDict:
  """A copy of `config` for model `name`: its model keys at their defaults (with `keep_shared`,
  the keys both models have keep `config`'s values), init_from and every other key as in
  `config`."""
  out = ml_collections.ConfigDict(config.to_dict())
  section = _model_section(name)
  for key in section:
    if key in ("init_from", "input_normalization") or (keep_shared and key != "name" and key in config.model):
      section[key] = config.model[key]
  out.model = section
  return out


def with_dataset(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """A copy of `config` for dataset `name`: the pipeline keys (sizes, augmentation, ...) kept,
  and the keys both datasets own (shapes3d's and decathlon's patch sampling: the config's
  choices carry over); the new dataset's other keys, class count and eval split at its
  defaults."""
  out = ml_collections.ConfigDict(config.to_dict())
  section = _dataset_section(name)
  shared = (set(registry.dataset_entry(name).defaults)
            & set(registry.dataset_entry(config.dataset.name).defaults))
  for key in (*PIPELINE_KEYS, *sorted(shared)):
    section[key] = config.dataset[key]
  out.dataset = section
  return out


def config_options(arg: str, *, presets: tuple[str, ...] = ()) -> dict[str, str]:
  """Parses a config file's argument (`--config=configs/unet.py:ARG`): comma-separated
  `dataset=NAME`, `model=NAME` and at most one preset name; ConfigError for anything else."""
  options = {"preset": ""}
  for part in filter(None, (p.strip() for p in (arg or "").split(","))):
    key, _, value = part.partition("=")
    if value and key in ("dataset", "model"):
      options[key] = value
    elif not value and part in presets and not options["preset"]:
      options["preset"] = part
    else:
      allowed = ", ".join(["dataset=NAME", "model=NAME", *presets])
      raise ConfigError(f"config argument {part!r}: not one of {allowed}")
  return options


def apply_options(config: ml_collections.ConfigDict, options: dict[str, str]
                  ) -> ml_collections.ConfigDict:
  """`config` with the dataset and model that `config_options` chose (if any)."""
  if "dataset" in options:
    config = with_dataset(config, options["dataset"])
  if "model" in options:
    config = with_model(config, options["model"])
  return config


def _flat(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return traverse_util.flatten_dict(config.to_dict(), sep=".")


def _fail(key: str, value: Any, why: str) -> None:
  registry.fail(key, value, why)


def _unknown_key(key: str, value: Any, config: ml_collections.ConfigDict,
                 known: Iterable[str]) -> None:
  """ConfigError for an unknown key: whose key it is, if another model's or dataset's, else the
  closest known key."""
  section, _, leaf = key.partition(".")
  others = {"model": registry.models_with_key, "dataset": registry.datasets_with_key}
  if section in others and "." not in leaf:
    owners = [n for n in others[section](leaf) if n != config[section].name]
    if owners:
      _fail(key, value, f"not a key of {section} {config[section].name!r}; it is a key of "
            f"{', '.join(owners)} (choose the {section} when loading the config, "
            f"--config=FILE:{section}={owners[0]})")
  close = difflib.get_close_matches(key, list(known), n=1)
  _fail(key, value, "unknown config key" + (f" (did you mean {close[0]}?)" if close else ""))


def _check_sections(config: ml_collections.ConfigDict) -> None:
  """The model and dataset sections hold the keys of the named model and dataset."""
  for section, entry_of, make in (("model", registry.model_entry, _model_section),
                                  ("dataset", registry.dataset_entry, _dataset_section)):
    name = config[section].name
    entry_of(name)  # ConfigError if unknown
    expected = set(make(name))
    present = set(config[section])
    if present != expected:
      built_for = [n for n in (registry.model_names() if section == "model"
                               else registry.dataset_names()) if set(make(n)) == present]
      if built_for:
        _fail(f"{section}.name", name, f"config.{section} holds the keys of {built_for[0]!r}; "
              f"choose the {section} when loading the config: --config=FILE:{section}={name}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first unknown key or bad value."""
  _check_sections(config)
  known = _flat(base_config(config.model.name, config.dataset.name))
  for key, value in _flat(config).items():  # before the loop below: unknown keys first
    if key not in known:
      _unknown_key(key, value, config, known)
  present = _flat(config)
  for key in known:
    if key not in present:
      _fail(key, None, "missing (the config was built for another version of seg_jax?)")

  def choice(key, allowed):
    value = _get(config, key)
    if value not in allowed:
      _fail(key, value, f"must be one of {', '.join(allowed)}")

  def positive(key, allow_zero=False):
    value = _get(config, key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (value == 0 and not allow_zero):
      _fail(key, value, "must be a number " + (">= 0" if allow_zero else "> 0"))

  choice("optimizer.name", OPTIMIZERS)
  choice("optimizer.schedule", SCHEDULES)
  choice("dtype", DTYPES)
  choice("matmul_precision", MATMUL_PRECISIONS)
  choice("conv_backend", conv_ops.BACKENDS)
  choice("on_nonfinite", ON_NONFINITE)
  choice("predict.tta", TTA_MODES)
  choice("checkpoint.best_mode", BEST_MODES)
  from_data = registry.dataset_entry(config.dataset.name).facts is not None
  for key in ("batch_size", "num_train_steps", "log_every_steps", "eval_every_steps",
              "checkpoint_every_steps", "keep_checkpoints", "dataset.image_size",
              "optimizer.learning_rate"):
    positive(key)
  positive("dataset.num_classes", allow_zero=from_data)
  for key in ("num_eval_visuals", "check_finite_every_steps", "max_consecutive_skips",
              "profile_steps", "optimizer.weight_decay", "optimizer.warmup_steps",
              "optimizer.grad_clip_norm", "loss.dice_smooth", "loss.focal_gamma",
              "dataset.shuffle_buffer", "optimizer.backbone_learning_rate_multiplier"):
    positive(key, allow_zero=True)
  registry.check_int("optimizer.backbone_frozen_steps", config.optimizer.backbone_frozen_steps,
                     minimum=0)
  registry.check_fraction("visual_score_threshold", config.visual_score_threshold)
  if not isinstance(config.model.init_from, str):
    _fail("model.init_from", config.model.init_from, "must be a path (a string)")
  choice("model.input_normalization", tuple(image_io.NORMALIZATIONS))

  model_entry = registry.model_entry(config.model.name)
  dataset_entry = registry.dataset_entry(config.dataset.name)
  model_entry.check(config)
  for key, neutral in (("backbone_learning_rate_multiplier", 1.0), ("backbone_frozen_steps", 0)):
    if config.optimizer[key] != neutral and not model_entry.backbone(config.model):
      _fail(f"optimizer.{key}", config.optimizer[key], f"model {config.model.name} (as "
            "configured) has no pretrained backbone to treat apart")
  _validate_dataset(config, dataset_entry)
  if model_entry.task == "instance":
    if not dataset_entry.has_instances:
      with_instances = [n for n in registry.dataset_names()
                        if registry.dataset_entry(n).has_instances]
      _fail("dataset.name", config.dataset.name, f"model.name={config.model.name!r} needs "
            f"instance annotations; datasets with them: {', '.join(with_instances)}")
    registry.check_int("dataset.max_instances", config.dataset.max_instances,
                       minimum=0 if from_data else 1)
  elif (model_entry.task == "volumetric") != dataset_entry.volumetric:
    volumetric = [n for n in registry.dataset_names() if registry.dataset_entry(n).volumetric]
    if model_entry.task == "volumetric":
      _fail("dataset.name", config.dataset.name, f"model.name={config.model.name!r} segments "
            f"volumes; volumetric datasets: {', '.join(volumetric)}")
    _fail("dataset.name", config.dataset.name, f"{config.dataset.name} holds volumes; use a 3D "
          f"model (model.name=unet3d), not {config.model.name!r}")
  elif dataset_entry.decode is not None:
    _fail("dataset.name", config.dataset.name, f"{config.dataset.name} is read as instances, for "
          f"the detectors; model.name={config.model.name!r}")

  multiple = models.input_multiple(config)
  reason = registry.input_multiple_reason(model_entry, config.model)
  if config.dataset.image_size % multiple:
    _fail("dataset.image_size", config.dataset.image_size,
          f"must be divisible by {multiple} ({reason})")

  for key in ("predict.tile_size", "predict.batch_size"):
    registry.check_int(key, _get(config, key))
  if config.predict.tile_size % multiple:
    _fail("predict.tile_size", config.predict.tile_size,
          f"must be divisible by {multiple} ({reason})")
  registry.check_fraction("predict.overlap", config.predict.overlap, closed=False)
  registry.check_int("export.step", config.export.step, minimum=0)
  registry.check_int("export.image_size", config.export.image_size, minimum=0)
  registry.check_int("export.min_size", config.export.min_size, minimum=0)
  registry.check_int("export.dice_images", config.export.dice_images, minimum=0)
  if not isinstance(config.export.onnx, bool):
    _fail("export.onnx", config.export.onnx, "must be True or False")
  if config.export.image_size % multiple:
    _fail("export.image_size", config.export.image_size,
          f"must be divisible by {multiple} ({reason}), or 0 for dataset.image_size")
  registry.check_fraction("predict.score_threshold", config.predict.score_threshold)
  if not isinstance(config.predict.save_probabilities, bool):
    _fail("predict.save_probabilities", config.predict.save_probabilities, "must be True or False")

  _validate_averaging_and_checkpoints(config)

  try:
    terms = losses.parse_loss_name(str(config.loss.name))
  except ValueError as e:
    _fail("loss.name", config.loss.name, str(e))
  if "bce" in terms:
    if config.dataset.num_classes != 2:
      _fail("loss.name", config.loss.name,
            f"'bce' (one logit) needs dataset.num_classes=2, got {config.dataset.num_classes}")
    if {"ce", "focal"} & set(terms):
      _fail("loss.name", config.loss.name, "'bce' (one logit) cannot be mixed with softmax terms")
  weights = config.loss.class_weights
  if weights is not None:
    if len(weights) != config.dataset.num_classes or any(w < 0 for w in weights):
      _fail("loss.class_weights", weights,
            f"must be {config.dataset.num_classes} non-negative numbers (one per class)")
  lo, hi = config.dataset.augment.min_scale, config.dataset.augment.max_scale
  if not 0 < lo <= hi:
    _fail("dataset.augment.min_scale", lo, f"must satisfy 0 < min_scale <= max_scale={hi}")
  if not 0 <= config.dataset.ignore_label or 0 <= config.dataset.ignore_label < config.dataset.num_classes:
    _fail("dataset.ignore_label", config.dataset.ignore_label,
          f"must be >= 0 and outside [0, num_classes={config.dataset.num_classes})")


def _validate_averaging_and_checkpoints(config: ml_collections.ConfigDict) -> None:
  """EMA, gradient accumulation (and the number of optimiser updates), the best checkpoint."""
  o = config.optimizer
  decay = o.ema_decay
  if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
    _fail("optimizer.ema_decay", decay, "must be in [0, 1) (0 = off)")
  registry.check_int("optimizer.accumulate_steps", o.accumulate_steps, minimum=1)
  if config.num_train_steps % o.accumulate_steps:
    _fail("num_train_steps", config.num_train_steps,
          f"must be a multiple of optimizer.accumulate_steps={o.accumulate_steps}")
  updates = num_optimizer_updates(config)
  if o.warmup_steps >= updates:
    _fail("optimizer.warmup_steps", o.warmup_steps,
          f"must be < the number of optimiser updates, {updates} (num_train_steps="
          f"{config.num_train_steps} / optimizer.accumulate_steps={o.accumulate_steps})"
          if o.accumulate_steps > 1 else f"must be < num_train_steps={config.num_train_steps}")
  metric = config.checkpoint.best_metric
  if not isinstance(metric, str) or (metric and not metric.startswith("eval/")):
    _fail("checkpoint.best_metric", metric, "must be '' (off) or an eval scalar such as eval/dice")
  use = str(config.checkpoint.use)
  if use not in ("latest", "best") and not use.isdigit():
    _fail("checkpoint.use", config.checkpoint.use, "must be latest, best or a step number")
  if use == "best" and not metric:
    _fail("checkpoint.use", use, "needs checkpoint.best_metric (the metric the run kept its best "
          "checkpoint by)")


def num_optimizer_updates(config: ml_collections.ConfigDict) -> int:
  """Optimiser updates of the run: the train steps over the steps accumulated per update."""
  return config.num_train_steps // config.optimizer.accumulate_steps


def schema_default(key: str, config: ml_collections.ConfigDict | None = None) -> Any:
  """The default of the dotted `key` for `config`'s model and dataset (default: the default
  ones); ConfigError naming the closest key if unknown."""
  names = (config.model.name, config.dataset.name) if config is not None else ()
  known = _flat(base_config(*names))
  if key not in known:
    close = difflib.get_close_matches(key, list(known), n=1)
    raise ConfigError(f"config.{key}: unknown config key" +
                      (f" (did you mean {close[0]}?)" if close else ""))
  return known[key]


def _validate_dataset(config: ml_collections.ConfigDict, entry: registry.DatasetEntry) -> None:
  """The pipeline's keys (the eval canvas) and the dataset's own checks."""
  d = config.dataset
  if entry.num_classes and d.num_classes not in entry.num_classes:
    _fail("dataset.num_classes", d.num_classes,
          f"{d.name} has {' or '.join(map(str, entry.num_classes))} classes")
  registry.check_int("dataset.resize", d.resize, minimum=0)
  registry.check_int("dataset.max_longer_side", d.max_longer_side, minimum=0)
  span = tuple(d.resize_range) if isinstance(d.resize_range, (tuple, list)) else None
  if (span is None or len(span) != 2 or any(not isinstance(v, int) for v in span)
      or (span != (0, 0) and not 0 < span[0] <= span[1])):
    _fail("dataset.resize_range", d.resize_range,
          "must be (0, 0) (use dataset.resize) or (lo, hi) with 0 < lo <= hi")
  entry.check(config)
  multiple = models.input_multiple(config)
  reason = registry.input_multiple_reason(registry.model_entry(config.model.name), config.model)
  pad = d.eval_pad_multiple
  if not isinstance(pad, int) or pad <= 0 or pad % multiple:
    _fail("dataset.eval_pad_multiple", pad, f"must be a positive multiple of {multiple} ({reason})")
  size = tuple(d.eval_size) if isinstance(d.eval_size, (tuple, list)) else None
  if (size is None or len(size) != 2 or any(not isinstance(v, int) or v < 0 for v in size)
      or (0 in size and size != (0, 0))):
    _fail("dataset.eval_size", d.eval_size, "must be (0, 0) (automatic) or (height, width) > 0")
  if size != (0, 0) and any(v % multiple for v in size):
    _fail("dataset.eval_size", d.eval_size,
          f"height and width must be divisible by {multiple} ({reason})")


def task(config: ml_collections.ConfigDict) -> str:
  """The task family of the model: 'semantic' or 'instance' (boxes and instance masks)."""
  return registry.model_entry(config.model.name).task


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


def loss_terms(config: ml_collections.ConfigDict) -> dict[str, float]:
  """{'ce': weight, 'dice': weight, ...} from loss.name and loss.<term>_weight."""
  return {t: float(config.loss[f"{t}_weight"]) for t in losses.parse_loss_name(str(config.loss.name))}
