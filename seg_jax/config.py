"""The config schema shared by every experiment, and its checks.

Every experiment config (`configs/*.py`) starts from `base_config()`, which
names and documents every key. `validate(config)` runs before anything is
built: an unknown key (a typo in a config file or in `--config.x=y`) or a bad
value raises `ConfigError` with a one-line message naming the key and why.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable

import ml_collections
from ml_collections import config_dict

from seg_jax.losses import LOSS_TERMS
from seg_jax.ops.conv import BACKENDS as CONV_BACKENDS

NORMS = ("batch", "group", "none")
UPSAMPLINGS = ("transpose", "resize")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "warmup_cosine", "polynomial")
DTYPES = ("float32", "bfloat16")
MATMUL_PRECISIONS = ("default", "high", "highest")  # jax_default_matmul_precision
TTA_MODES = ("none", "hflip", "hvflip")
ON_NONFINITE = ("stop", "skip")


DETECTION_MODELS = ("mask_rcnn", "faster_rcnn")
INSTANCE_DATASETS = ("shapes", "coco")   # datasets whose examples carry instance masks and boxes


class ConfigError(ValueError):
  """A config key is unknown or has a bad value; the message is one line."""


def base_config() -> ml_collections.ConfigDict:
  """Every key any experiment may set, with its default."""
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

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "shapes"         # see seg_jax/data/pipeline.py for the registry
  c.dataset.data_dir = ""           # TFDS data dir; '' = TFDS default (~/tensorflow_datasets)
  c.dataset.seed = 0                # shapes: which scenes are generated (fixed across training seeds)
  c.dataset.num_classes = 6         # including background (class 0)
  c.dataset.ignore_label = 255      # never counts in loss or metrics
  c.dataset.image_size = 64         # shapes: generated size; training crop size (all datasets)
  c.dataset.num_train = 2000        # shapes: examples per split
  c.dataset.num_validation = 200
  c.dataset.num_test = 200
  c.dataset.eval_split = "validation"
  c.dataset.max_instances = 16      # instance tasks: objects per image (padded; more is an error)
  # folder: DIR with images/ and masks/ (paired by file stem), optional splits/ and classes.txt.
  # ade20k: the extracted ADEChallengeData2016/ folder.
  c.dataset.root = ""
  c.dataset.channels = 0            # folder: input channels; 0 = infer (all images must agree),
                                    # 3 = grey promoted to RGB, 1 = RGB converted to grey
  c.dataset.split_seed = 0          # folder without splits/: seed of the split by fraction
  c.dataset.validation_fraction = 0.1  # folder without splits/: share of images per split
  c.dataset.test_fraction = 0.0
  c.dataset.resize = 0              # 0 = native size; else the shorter side is resized to this
                                    # (train and eval) before cropping / padding
  # Eval batches images of different sizes by padding each (ignore label) to one canvas per split:
  # (0, 0) = the split's largest (resized) height and width rounded up to eval_pad_multiple;
  # (H, W) = a fixed canvas; larger images are downscaled to fit it (aspect kept).
  c.dataset.eval_size = (0, 0)
  c.dataset.eval_pad_multiple = 32
  c.dataset.download = False        # TFDS datasets (oxford_iiit_pet, cityscapes, coco): prepare if absent
  c.dataset.manual_dir = ""         # cityscapes: folder with the manually downloaded zips
  c.dataset.shuffle_buffer = 2000
  c.dataset.cache = True            # cache decoded examples in memory
  c.dataset.augment = ml_collections.ConfigDict()
  c.dataset.augment.hflip = True
  c.dataset.augment.vflip = True
  c.dataset.augment.min_scale = 0.75   # random scale-and-crop: scale factor range
  c.dataset.augment.max_scale = 1.25
  c.dataset.augment.brightness = 0.15  # colour jitter magnitudes (0 = off); 3-channel images only
  c.dataset.augment.contrast = 0.2
  c.dataset.augment.saturation = 0.2
  c.dataset.augment.hue = 0.03

  c.model = ml_collections.ConfigDict()
  c.model.name = "unet"
  c.model.width = 32                # channels at the first level, doubled per level
  c.model.depth = 4                 # number of 2x downsamplings
  c.model.norm = "batch"            # batch | group | none
  c.model.norm_groups = 8           # groups for group norm
  c.model.upsample = "transpose"    # transpose (learned 2x2/2) | resize (bilinear + 3x3 conv)
  c.model.dropout = 0.0             # unet: bottleneck and decoder; deeplabv3plus: after ASPP
  # ResNet backbone (seg_jax/models/resnet.py): resnet10 | resnet18 | resnet34 | resnet50 |
  # resnet101. unet: '' = the classic conv encoder, else a ResNet encoder (model.width is then
  # its stage-1 width, 64 in the standard networks); deeplabv3plus: required.
  c.model.backbone = ""
  # imagenet (7x7/2 conv + 3x3/2 max pool) | small (3x3 convs, stride 4) | small_stride2 (every
  # map at twice the resolution: for images of ~64 px)
  c.model.backbone_stem = "imagenet"
  c.model.output_stride = 16        # deeplabv3plus: stride of the last map: 8 | 16 (atrous last
                                    # stages) | 32; with small_stride2: 4 | 8 | 16
  c.model.aspp_rates = (6, 12, 18)  # deeplabv3plus: atrous rates of the 3x3 ASPP branches
  c.model.aspp_features = 256
  c.model.aspp_image_pooling = True
  c.model.decoder_low_level = "c2"  # deeplabv3plus: backbone map the decoder fuses: c2 (stride 4,
                                    # as in the paper) | c1 (stride 2: finer masks on small images)
  c.model.decoder_low_level_features = 48  # deeplabv3plus: its channels after the 1x1 conv
  c.model.decoder_features = 256
  # Initialise matching parameters (same path and shape) from a local checkpoint before step 0:
  # a workdir, an Orbax checkpoint directory, or an .npz of arrays named by '/'-joined paths.
  # Ignored when the workdir already has a checkpoint (resume wins). Never downloads.
  c.model.init_from = ""

  # Detection models (model.name = mask_rcnn | faster_rcnn): a ResNet (model.backbone,
  # model.width, model.backbone_stem: imagenet | small, both of stride 4) with an FPN, and these
  # budgets and thresholds (seg_jax/models/detection/mask_rcnn.py). Every budget is a static
  # shape: each image is given exactly this many anchors, proposals, RoIs and detections.
  c.detection = ml_collections.ConfigDict()
  c.detection.fpn_features = 256
  c.detection.anchor_sizes = (32, 64, 128, 256, 512)  # anchor side of P2..P6, pixels
  c.detection.aspect_ratios = (0.5, 1.0, 2.0)  # anchor height / width
  c.detection.rpn_pre_nms_topk = 2000   # proposals kept per level before NMS
  c.detection.rpn_post_nms_topk = 1000  # proposals per image after NMS
  c.detection.rpn_nms_threshold = 0.7
  c.detection.rpn_num_samples = 256     # anchors per image in the RPN loss (half positive at most)
  c.detection.roi_num_samples = 512     # RoIs per image in the second stage's losses
  c.detection.roi_positive_fraction = 0.25
  c.detection.canonical_size = 224.0    # RoI of this side pools from P4 (FPN paper, eq. 1)
  c.detection.box_head_hidden = 1024    # the two FC layers of the box head
  c.detection.mask_head_features = 256  # the four 3x3 convs of the mask head
  c.detection.mask_size = 28            # mask head output, per RoI and class
  c.detection.score_threshold = 0.05    # inference: lowest class probability kept
  c.detection.nms_threshold = 0.5       # inference: per-class NMS IoU
  c.detection.detections_per_image = 100
  c.detection.visual_score_threshold = 0.5  # eval pictures: detections drawn

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

  # --mode=predict: segment image files with the newest checkpoint (seg_jax/predict.py).
  c.predict = ml_collections.ConfigDict()
  c.predict.input = ""              # image file, directory, or glob ('**' recurses)
  c.predict.output = ""             # output directory; '' = WORKDIR/predictions
  c.predict.tile_size = 256         # square tiles the model sees (sliding window), pixels
  c.predict.overlap = 0.25          # fraction of a tile shared with its neighbour, in [0, 1)
  c.predict.tta = "none"            # flip test-time augmentation: none | hflip | hvflip
  c.predict.save_probabilities = False  # also write <stem>_probs.npy (float16 [H, W, classes])
  c.predict.batch_size = 4          # tiles per device call (a multiple of the device count)
  return c


def _flat_items(config: ml_collections.ConfigDict, prefix: str = "") -> Iterable[tuple[str, Any]]:
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      yield from _flat_items(value, f"{name}.")
    else:
      yield name, value


def _fail(key: str, value: Any, why: str) -> None:
  raise ConfigError(f"config.{key}={value!r}: {why}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first unknown key or bad value."""
  known = dict(_flat_items(base_config()))
  for key, value in _flat_items(config):
    if key not in known:
      close = difflib.get_close_matches(key, known, n=1)
      hint = f" (did you mean {close[0]}?)" if close else ""
      _fail(key, value, f"unknown config key{hint}")

  def choice(key, allowed):
    value = _get(config, key)
    if value not in allowed:
      _fail(key, value, f"must be one of {', '.join(allowed)}")

  def positive(key, allow_zero=False):
    value = _get(config, key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (value == 0 and not allow_zero):
      _fail(key, value, "must be a number " + (">= 0" if allow_zero else "> 0"))

  from seg_jax.data import pipeline    # the registries; imported here to avoid a cycle
  from seg_jax.models import registry
  choice("dataset.name", tuple(pipeline.DATASETS))
  choice("model.name", tuple(registry.MODELS))
  choice("model.norm", NORMS)
  choice("model.upsample", UPSAMPLINGS)
  choice("optimizer.name", OPTIMIZERS)
  choice("optimizer.schedule", SCHEDULES)
  choice("dtype", DTYPES)
  choice("matmul_precision", MATMUL_PRECISIONS)
  choice("conv_backend", CONV_BACKENDS)
  choice("on_nonfinite", ON_NONFINITE)
  choice("predict.tta", TTA_MODES)
  for key in ("batch_size", "num_train_steps", "log_every_steps", "eval_every_steps",
              "checkpoint_every_steps", "keep_checkpoints", "model.width", "model.depth",
              "dataset.num_classes", "dataset.image_size", "optimizer.learning_rate"):
    positive(key)
  for key in ("num_eval_visuals", "check_finite_every_steps", "max_consecutive_skips",
              "optimizer.weight_decay", "optimizer.warmup_steps",
              "optimizer.grad_clip_norm", "model.dropout", "loss.dice_smooth",
              "loss.focal_gamma", "dataset.num_train", "dataset.num_validation",
              "dataset.num_test", "dataset.shuffle_buffer"):
    positive(key, allow_zero=True)

  if not 0 <= config.model.dropout < 1:
    _fail("model.dropout", config.model.dropout, "must be in [0, 1)")
  if config.model.norm == "group" and config.model.width % config.model.norm_groups:
    _fail("model.norm_groups", config.model.norm_groups,
          f"must divide model.width={config.model.width}")
  _validate_model(config)
  if task(config) == "instance":
    _validate_detection(config)
  elif config.dataset.name == "coco":
    _fail("dataset.name", "coco", f"coco is read as instances, for the detectors "
          f"({', '.join(DETECTION_MODELS)}); model.name={config.model.name!r}")
  divisor = registry.input_divisor(config)
  if config.dataset.image_size % divisor:
    _fail("dataset.image_size", config.dataset.image_size,
          f"must be divisible by {divisor} ({_divisor_reason(config)})")

  for key in ("predict.tile_size", "predict.batch_size"):
    value = _get(config, key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      _fail(key, value, "must be a positive integer")
  if config.predict.tile_size % divisor:
    _fail("predict.tile_size", config.predict.tile_size,
          f"must be divisible by {divisor} ({_divisor_reason(config)})")
  overlap = config.predict.overlap
  if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
    _fail("predict.overlap", overlap, "must be a fraction of the tile size in [0, 1)")
  if not isinstance(config.predict.save_probabilities, bool):
    _fail("predict.save_probabilities", config.predict.save_probabilities, "must be True or False")

  if config.optimizer.warmup_steps >= config.num_train_steps:
    _fail("optimizer.warmup_steps", config.optimizer.warmup_steps,
          f"must be < num_train_steps={config.num_train_steps}")

  terms = str(config.loss.name).split("+")
  for term in terms:
    if term not in LOSS_TERMS:
      _fail("loss.name", config.loss.name,
            f"unknown term {term!r}; terms are {', '.join(LOSS_TERMS)} joined by '+'")
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
  _validate_dataset(config)
  if not 0 <= config.dataset.ignore_label or 0 <= config.dataset.ignore_label < config.dataset.num_classes:
    _fail("dataset.ignore_label", config.dataset.ignore_label,
          f"must be >= 0 and outside [0, num_classes={config.dataset.num_classes})")


def schema_default(key: str) -> Any:
  """The base_config() default of the dotted `key`; ConfigError naming the closest key if unknown."""
  known = dict(_flat_items(base_config()))
  if key not in known:
    close = difflib.get_close_matches(key, known, n=1)
    raise ConfigError(f"config.{key}: unknown config key" +
                      (f" (did you mean {close[0]}?)" if close else ""))
  return known[key]


def _validate_dataset(config: ml_collections.ConfigDict) -> None:
  """Keys of the folder and TFDS datasets: roots, channels, split fractions, eval canvas."""
  d = config.dataset
  if d.name in ("folder", "ade20k") and not d.root:
    _fail("dataset.root", d.root, f"dataset.name={d.name!r} needs the data folder")
  from seg_jax.data import standard
  if d.name in standard.DATASETS and d.num_classes not in standard.DATASETS[d.name].num_classes:
    _fail("dataset.num_classes", d.num_classes, f"{d.name} has "
          f"{' or '.join(map(str, standard.DATASETS[d.name].num_classes))} classes")
  for key in ("channels", "resize", "split_seed"):
    value = d[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      _fail(f"dataset.{key}", value, "must be an integer >= 0")
  fractions = (d.validation_fraction, d.test_fraction)
  if any(not 0 <= f < 1 for f in fractions) or sum(fractions) >= 1:
    _fail("dataset.validation_fraction", d.validation_fraction,
          f"validation_fraction and test_fraction={d.test_fraction} must be in [0, 1) with a sum < 1")
  from seg_jax.models import registry
  divisor = registry.input_divisor(config)
  multiple = d.eval_pad_multiple
  if not isinstance(multiple, int) or multiple <= 0 or multiple % divisor:
    _fail("dataset.eval_pad_multiple", multiple,
          f"must be a positive multiple of {divisor} ({_divisor_reason(config)})")
  size = tuple(d.eval_size) if isinstance(d.eval_size, (tuple, list)) else None
  if (size is None or len(size) != 2 or any(not isinstance(v, int) or v < 0 for v in size)
      or (0 in size and size != (0, 0))):
    _fail("dataset.eval_size", d.eval_size, "must be (0, 0) (automatic) or (height, width) > 0")
  if size != (0, 0) and any(v % divisor for v in size):
    _fail("dataset.eval_size", d.eval_size,
          f"height and width must be divisible by {divisor} ({_divisor_reason(config)})")


def task(config: ml_collections.ConfigDict) -> str:
  """'instance' for the detection models (boxes and instance masks), else 'semantic'."""
  return "instance" if config.model.name in DETECTION_MODELS else "semantic"


def _validate_detection(config: ml_collections.ConfigDict) -> None:
  """Dataset, backbone and budgets of a detection model."""
  from seg_jax.models import resnet
  d, m, det = config.dataset, config.model, config.detection
  if d.name not in INSTANCE_DATASETS:
    _fail("dataset.name", d.name, f"model.name={m.name!r} needs instance annotations; datasets "
          f"with them: {', '.join(INSTANCE_DATASETS)}")
  from seg_jax.data import coco
  if d.name == "coco" and d.num_classes != coco.NUM_CLASSES:
    _fail("dataset.num_classes", d.num_classes,
          f"coco has {coco.NUM_CLASSES} classes (background + {coco.NUM_THING_CLASSES} things)")
  if m.backbone not in resnet.RESNETS:
    _fail("model.backbone", m.backbone,
          f"{m.name} needs a ResNet: one of {', '.join(resnet.RESNETS)}")
  if resnet.STEM_STRIDES[m.backbone_stem] != 4:
    _fail("model.backbone_stem", m.backbone_stem, "the FPN needs a stem of stride 4: imagenet or small")
  if len(det.anchor_sizes) != 5 or any(s <= 0 for s in det.anchor_sizes):
    _fail("detection.anchor_sizes", det.anchor_sizes, "must be 5 positive sizes, one per P2..P6")
  if not det.aspect_ratios or any(r <= 0 for r in det.aspect_ratios):
    _fail("detection.aspect_ratios", det.aspect_ratios, "must be positive height/width ratios")
  for key in ("fpn_features", "rpn_pre_nms_topk", "rpn_post_nms_topk", "rpn_num_samples",
              "roi_num_samples", "box_head_hidden", "mask_head_features", "mask_size",
              "detections_per_image"):
    value = det[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      _fail(f"detection.{key}", value, "must be a positive integer")
  if det.mask_size % 2:
    _fail("detection.mask_size", det.mask_size, "must be even (the head upsamples 2x)")
  for key in ("rpn_nms_threshold", "nms_threshold", "score_threshold", "roi_positive_fraction",
              "visual_score_threshold"):
    if not 0 <= det[key] <= 1:
      _fail(f"detection.{key}", det[key], "must be in [0, 1]")
  if int(det.roi_num_samples * det.roi_positive_fraction) < 1:
    _fail("detection.roi_positive_fraction", det.roi_positive_fraction,
          f"leaves no foreground RoI of roi_num_samples={det.roi_num_samples}")
  if not isinstance(d.max_instances, int) or d.max_instances <= 0:
    _fail("dataset.max_instances", d.max_instances, "must be a positive integer")
  if m.norm == "group" and m.width % m.norm_groups:
    _fail("model.norm_groups", m.norm_groups, f"must divide model.width={m.width}")


def _divisor_reason(config: ml_collections.ConfigDict) -> str:
  m = config.model
  if m.name in DETECTION_MODELS:
    return f"the input multiple of {m.name}'s ResNet-FPN"
  if m.name == "deeplabv3plus":
    return f"the input multiple of deeplabv3plus at model.output_stride={m.output_stride}"
  if m.backbone:
    return f"the input multiple of a U-Net with a {m.backbone} encoder"
  return f"2**model.depth={2 ** m.depth}"


def _validate_model(config: ml_collections.ConfigDict) -> None:
  """Backbone, output stride and DeepLab head keys."""
  from seg_jax.models import resnet
  m = config.model
  if m.backbone and m.backbone not in resnet.RESNETS:
    _fail("model.backbone", m.backbone, f"must be '' or one of {', '.join(resnet.RESNETS)}")
  if m.name == "deeplabv3plus" and not m.backbone:
    _fail("model.backbone", m.backbone,
          f"deeplabv3plus needs a ResNet: one of {', '.join(resnet.RESNETS)}")
  if m.backbone_stem not in resnet.STEMS:
    _fail("model.backbone_stem", m.backbone_stem, f"must be one of {', '.join(resnet.STEMS)}")
  if m.output_stride not in resnet.output_strides(m.backbone_stem):
    _fail("model.output_stride", m.output_stride,
          f"must be one of {', '.join(map(str, resnet.output_strides(m.backbone_stem)))} with "
          f"model.backbone_stem={m.backbone_stem!r}")
  if m.decoder_low_level not in ("c1", "c2"):
    _fail("model.decoder_low_level", m.decoder_low_level, "must be one of c1, c2")
  rates = m.aspp_rates
  if (not isinstance(rates, (tuple, list))
      or any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in rates)):
    _fail("model.aspp_rates", rates, "must be a tuple of integers >= 1, e.g. (6, 12, 18)")
  for key in ("aspp_features", "decoder_low_level_features", "decoder_features"):
    value = m[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      _fail(f"model.{key}", value, "must be a positive integer")
  if not isinstance(m.aspp_image_pooling, bool):
    _fail("model.aspp_image_pooling", m.aspp_image_pooling, "must be True or False")
  if m.norm == "group":
    widths = {"model.width": m.width}
    if m.backbone and m.backbone_stem in ("small", "small_stride2"):
      widths["model.width / 2 (the small stem's first conv)"] = m.width // 2
    if m.name == "deeplabv3plus":
      widths.update({f"model.{k}": m[k] for k in ("aspp_features", "decoder_low_level_features",
                                                  "decoder_features")})
    for key, value in widths.items():
      if value % m.norm_groups:
        _fail("model.norm_groups", m.norm_groups, f"must divide {key}={value}")
  if not isinstance(m.init_from, str):
    _fail("model.init_from", m.init_from, "must be a path (a string)")


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


def num_logits(config: ml_collections.ConfigDict) -> int:
  """One logit for binary tasks trained with BCE, else one per class."""
  return 1 if "bce" in str(config.loss.name).split("+") else config.dataset.num_classes


def loss_terms(config: ml_collections.ConfigDict) -> dict[str, float]:
  """{'ce': weight, 'dice': weight, ...} from loss.name and loss.<term>_weight."""
  return {t: float(config.loss[f"{t}_weight"]) for t in str(config.loss.name).split("+")}
