"""Input pipelines: TFDS -> tf.data -> per-host numpy batches.

Batches follow the data contract of shared/DESIGN.md: `image` float32
[B, H, W, C] in [-1, 1], `mask` int32 [B, H, W], `valid` bool [B] (eval only:
the last batch is padded, padded examples have valid=False and an all-ignore
mask). `parallel.host_batch_to_global` turns them into global jax.Arrays.

The training stream is a pure function of (seed, step), whatever the number
of processes: a seeded shuffle of the repeated split, skipped to the resume
step, with per-example stateless augmentation seeds; each process keeps its
rows of every global batch. Each process evaluates its own shard of the eval
split (`tfds.split_for_jax_process`); metrics are sums, so any sharding gives
the same totals.

Images may differ in size (folder and standard datasets). Training takes
random scale-and-crops of `dataset.image_size` (padded with the ignore label
where an image is smaller). Eval keeps every image at its native (or
`dataset.resize`d) resolution and pads it onto one fixed canvas per split
(`eval_canvas`), so that eval batches have static shapes and metrics count
exactly the image's own pixels. The canvas is the split's largest image: for
very large images (whole slides, satellite scenes) use `--mode=predict`,
which tiles, or set `dataset.resize` / `dataset.eval_size`.
"""

from __future__ import annotations

import math
import os
from typing import Iterator

os.environ.setdefault("NO_GCE_CHECK", "true")  # no cloud metadata lookups (no network here)

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from seg_jax import parallel
from seg_jax import registry
from seg_jax.data import transforms
from seg_jax.data import volumes
from seg_jax.data.errors import DataError

# TF must never take the accelerators away from JAX.
tf.config.set_visible_devices([], "GPU")


def _input_options() -> tf.data.Options:
  """tf.data threading that leaves the cores to the jitted step.

  On small CPU machines tf.data's default pool (one thread per core) competes
  with XLA for every core; a pool of a quarter of the cores (at least one)
  still keeps the prefetch buffer full (benchmarks/input_pipeline.py).
  """
  options = tf.data.Options()
  options.threading.private_threadpool_size = max(1, (os.cpu_count() or 1) // 4)
  options.threading.max_intra_op_parallelism = 1
  options.deterministic = True
  return options


def get_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The dataset's TFDS builder, prepared (generated or read from cache)."""
  return prepare_dataset(config)[0]


def configure(config: ml_collections.ConfigDict) -> None:
  """Sets the config keys the data decides (a Decathlon folder's class count), if any."""
  entry = registry.dataset_entry(config.dataset.name)
  if entry.configure is not None:
    entry.configure(config)


def prepare_dataset(config: ml_collections.ConfigDict) -> tuple[tfds.core.DatasetBuilder, list[str]]:
  """(prepared TFDS builder, class names) of `config.dataset` (its registry entry prepares it)."""
  entry = registry.dataset_entry(config.dataset.name)
  data_dir = os.path.expanduser(config.dataset.data_dir) if config.dataset.data_dir else None
  return entry.prepare(config, data_dir)


def resolve_config(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder
                   ) -> ml_collections.ConfigDict:
  """`config` with what the prepared data determines (datasets with `facts`: coco_json).

  dataset.num_classes 0 -> the data's class count (another value that disagrees is a
  ConfigError); dataset.max_instances 0 -> the most objects one *training* image holds (a
  smaller explicit value is a DataError naming the key): it is the training step's static
  ground-truth budget, so a crowded eval image does not make every training step dearer; eval
  batches hold their own split's most (`instance_budget`). Detection budgets that would cap
  the crowdest image of any split (model.detections_per_image, model.rpn_post_nms_topk) are
  raised to it, with a warning naming the key. Other datasets: `config` unchanged.
  """
  entry = registry.dataset_entry(config.dataset.name)
  if entry.facts is None:
    return config
  facts = entry.facts(builder)
  out = ml_collections.ConfigDict(config.to_dict())
  d, m = out.dataset, out.model
  if d.num_classes == 0:
    d.num_classes = facts["num_classes"]
  elif d.num_classes != facts["num_classes"]:
    registry.fail("dataset.num_classes", d.num_classes,
                  f"the training data has {facts['num_classes'] - 1} categories, so "
                  f"{facts['num_classes']} classes with background; leave it 0 (from the data)")
  most_train = max(1, facts["max_objects"].get("train", 0))
  most = max(1, *facts["max_objects"].values())
  if registry.model_entry(m.name).task == "instance":
    if d.max_instances == 0:
      d.max_instances = most_train
    elif d.max_instances < most_train:
      raise DataError(f"dataset.max_instances={d.max_instances}, but a training image of "
                      f"{d.name} holds {most_train} objects: raise it, or set it to 0 (from the "
                      "data)")
    for key, need in (("detections_per_image", most), ("rpn_post_nms_topk", 2 * most)):
      if key in m and m[key] < need:
        from absl import logging
        logging.warning("model.%s raised from %d to %d: an image of %s holds %d objects",
                        key, m[key], need, d.name, most)
        m[key] = need
  return out


def category_ids(config: ml_collections.ConfigDict, builder) -> list[int] | None:
  """The dataset's own label ids (class c is ids[c - 1]) where it has them (coco_json), else None."""
  entry = registry.dataset_entry(config.dataset.name)
  return entry.facts(builder).get("category_ids") if entry.facts is not None else None


def eval_reference(config: ml_collections.ConfigDict, builder, split: str):
  """What scoring `split` in the dataset's own terms needs (coco_json), with the eval canvas and
  resize filled in; None for datasets scored on the eval batches alone."""
  entry = registry.dataset_entry(config.dataset.name)
  if entry.eval_reference is None:
    return None
  import dataclasses
  return dataclasses.replace(entry.eval_reference(builder, split),
                             canvas=eval_canvas(config, builder, split),
                             resize=transforms.eval_resize(config.dataset))


def _feature_keys(config: ml_collections.ConfigDict) -> tuple[str, str, str]:
  """(image, mask, id) feature names of the stored examples."""
  return registry.dataset_entry(config.dataset.name).feature_keys


def _volumetric(config: ml_collections.ConfigDict) -> bool:
  """Whether `builder` is a volumetric dataset's `volumes.VolumeSet` rather than TFDS's."""
  return registry.dataset_entry(config.dataset.name).volumetric


def image_channels(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder) -> int:
  """Channels of the images the model sees (the model infers its input channels at init)."""
  if _volumetric(config):
    return builder.channels
  return int(builder.info.features[_feature_keys(config)[0]].shape[-1])


def instance_budget(config: ml_collections.ConfigDict, builder, split: str) -> int:
  """Objects per image that `split`'s batches hold: dataset.max_instances (the training
  step's budget), or, for an eval split of a dataset that knows its counts (`facts`), that
  split's most if it is larger, since eval never feeds them to a training step."""
  budget = config.dataset.max_instances
  entry = registry.dataset_entry(config.dataset.name)
  if split != "train" and entry.facts is not None:
    budget = max(budget, int(entry.facts(builder)["max_objects"].get(split, 0)))
  return budget


def _decoder(config: ml_collections.ConfigDict, max_instances: int | None = None):
  """Stored example -> {'image': uint8/uint16 [H, W, C], 'mask': int32 [H, W] class ids, 'id'},
  and for instance tasks 'instance_masks' [M, H, W], 'classes' [M] and 'num_instances'
  (M = `max_instances`, by default dataset.max_instances)."""
  entry = registry.dataset_entry(config.dataset.name)
  if max_instances is None:
    max_instances = config.dataset.max_instances
  if entry.decode is not None:
    return lambda example: entry.decode(example, max_instances)
  image_key, mask_key, id_key = entry.feature_keys
  table = entry.label_table(config) if entry.label_table is not None else None
  instances = registry.model_entry(config.model.name).task == "instance"

  def decode(example):
    mask = tf.cast(example[mask_key][..., 0], tf.int32)
    if table is not None:
      mask = tf.gather(tf.constant(table), mask)
    out = {"image": example[image_key], "mask": mask, "id": example[id_key]}
    if instances:
      objects = example["objects"]
      out["instance_masks"], out["classes"], out["num_instances"] = transforms.pad_instances(
          objects["mask"][..., 0], objects["label"], max_instances)
    return out

  return decode


def _view(example: dict, image, mask) -> dict:
  """The output example of an augmentation: image, mask and (instance tasks) the instance
  fields read back from the transformed label stack."""
  out = {"image": image, "id": example["id"]}
  if "instance_masks" in example:
    out.update(transforms.unpack_instances(mask, example["classes"],
                                           with_crowd="crowd" in example))
    out["num_instances"] = example["num_instances"]
  else:
    out["mask"] = mask
  return out


def _labels(example: dict):
  """The label map the geometric transforms move: the mask, or the stack of mask and instances."""
  if "instance_masks" in example:
    return transforms.pack_instances(example["mask"], example["instance_masks"],
                                     example.get("crowd"))
  return example["mask"]


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def eval_canvas(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder,
                split: str) -> tuple[int, int]:
  """(H, W) onto which every eval image of `split` is padded (see transforms.pad_to_canvas).

  dataset.eval_size if set; else the largest (resized) height and width of the
  split's images, rounded up to dataset.eval_pad_multiple, from the feature
  shape (fixed-size datasets) or the sizes stored with a folder dataset.
  """
  d = config.dataset
  if tuple(d.eval_size) != (0, 0):
    return tuple(int(v) for v in d.eval_size)
  shape = builder.info.features[_feature_keys(config)[0]].shape[:2]
  if None not in shape:
    sizes = [shape]
  elif "sizes" in builder.info.metadata:
    meta = builder.info.metadata
    sizes = [meta["sizes"][stem] for stem in meta["splits"][split]]
  else:
    raise DataError(f"dataset {d.name} has images of different sizes and no stored sizes; set "
                    "dataset.eval_size=(H, W), the canvas eval images are padded to")
  resize = transforms.eval_resize(d)
  if resize:
    sizes = [transforms.resized_shape(int(h), int(w), resize) for h, w in sizes]
  return (_round_up(max(int(h) for h, _ in sizes), d.eval_pad_multiple),
          _round_up(max(int(w) for _, w in sizes), d.eval_pad_multiple))


def check_split(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder,
                split: str) -> None:
  """DataError unless the dataset has `split` (checked before training starts)."""
  if _volumetric(config):
    if not builder.splits.get(split):
      raise DataError(f"dataset {config.dataset.name} has no cases in split {split!r}; it has "
                      f"{', '.join(k for k, v in builder.splits.items() if v) or 'none'} "
                      "(set dataset.eval_split)")
    return
  if split not in builder.info.splits:
    raise DataError(f"dataset {config.dataset.name} has no split {split!r}; it has "
                    f"{', '.join(builder.info.splits) or 'none'} (set dataset.eval_split)")


def _check_labels(batch: dict[str, np.ndarray], num_classes: int, ignore_label: int):
  mask = batch["mask"]
  bad = (mask >= num_classes) | (mask < 0)
  bad &= mask != ignore_label
  if bad.any():
    rows = np.nonzero(bad.reshape(len(mask), -1).any(axis=1))[0]
    ids = _example_ids(batch, rows)
    values = np.unique(mask[bad])[:10].tolist()
    raise DataError(f"mask values {values} outside [0, {num_classes}) and not ignore_label="
                    f"{ignore_label} in examples {ids}")


def check_eval_split(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder) -> None:
  """DataError now (before training) if dataset.eval_split is missing or has no eval canvas."""
  check_split(config, builder, config.dataset.eval_split)
  if _volumetric(config):
    return  # whole cases by sliding windows: no canvas
  eval_canvas(config, builder, config.dataset.eval_split)


def _example_ids(batch: dict, rows) -> list[str]:
  return [batch["id"][i].decode() if isinstance(batch["id"][i], bytes) else str(batch["id"][i])
          for i in rows[:5]]


def _check_instances(batch: dict[str, np.ndarray], max_instances: int) -> None:
  counts = batch.pop("num_instances")
  if (counts > max_instances).any():
    rows = np.nonzero(counts > max_instances)[0]
    raise DataError(f"examples {_example_ids(batch, rows)} have {counts[rows].max()} objects, more "
                    f"than dataset.max_instances={max_instances}; raise it")


def _host_batches(ds: tf.data.Dataset, config: ml_collections.ConfigDict, *,
                  with_ids: bool = False, max_instances: int | None = None) -> Iterator[dict]:
  """Checked numpy batches; with `with_ids`, 'id' holds the examples' ids as str ('' = padding),
  to be popped before the batch goes to the devices."""
  for batch in tfds.as_numpy(ds.with_options(_input_options())):
    _check_labels(batch, config.dataset.num_classes, config.dataset.ignore_label)
    if "num_instances" in batch:
      _check_instances(batch, config.dataset.max_instances if max_instances is None
                       else max_instances)
    ids = batch.pop("id")
    if with_ids:
      batch["id"] = np.array([i.decode() if isinstance(i, bytes) else str(i) for i in ids])
    yield batch


def train_batches(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder, *,
                  start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Endless augmented training batches of this host, starting at `start_step` (volumes:
  random patches, `seg_jax/data/volumes.py`)."""
  if _volumetric(config):
    check_split(config, builder, "train")
    return volumes.train_batches(config, builder, start_step=start_step)
  d = config.dataset
  host_batch = parallel.per_host_batch_size(config.batch_size)
  # Every process walks the same global stream and keeps only its rows of each
  # global batch, so the batches (and training) are the same for any number of
  # processes. The price: each process reads (and caches) the whole split, and
  # augments only its own rows.
  check_split(config, builder, "train")
  ds = builder.as_dataset(split="train", shuffle_files=False)
  ds = ds.map(_decoder(config), num_parallel_calls=tf.data.AUTOTUNE)
  if d.cache:
    ds = ds.cache()
  stream_seed = config.seed * 1_000_003
  ds = ds.repeat().shuffle(d.shuffle_buffer or 1, seed=stream_seed, reshuffle_each_iteration=True)
  global_batch = config.batch_size
  ds = ds.enumerate().skip(start_step * global_batch)  # resume: same stream, later position
  process = jax.process_index()
  ds = ds.filter(lambda index, _: (index % global_batch) // host_batch == process)

  def augment(index, example):
    seed = tf.stack([tf.constant(stream_seed, tf.int64), index])
    image, mask = transforms.train_augment(
        example["image"], _labels(example), seed, aug=d.augment, size=d.image_size,
        ignore_label=d.ignore_label, resize=transforms.eval_resize(d),
        resize_range=tuple(d.resize_range), normalization=config.model.input_normalization)
    return _view(example, image, mask)

  ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(host_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return _host_batches(ds, config)


def shown_shape(height: int, width: int, canvas: tuple[int, int], resize: transforms.Resize
                ) -> tuple[int, int]:
  """(height, width) an image of this size has inside its eval canvas (after the eval resize,
  `transforms.eval_resize`, and the downscale-to-fit of `transforms.pad_to_canvas`): the same
  integer arithmetic, on the host, so that eval outputs map back to the original pixels."""
  if resize:
    height, width = transforms.resized_shape(height, width, resize)
  ch, cw = canvas
  if height > ch or width > cw:
    if height * cw >= width * ch:
      return ch, max(width * ch // height, 1)
    return max(height * cw // width, 1), cw
  return height, width


def num_eval_batches(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder,
                     split: str) -> int:
  """Batches per host so that the host with the most examples sees all of them."""
  total = builder.info.splits[split].num_examples
  per_host = math.ceil(total / jax.process_count())
  return math.ceil(per_host / parallel.per_host_batch_size(config.batch_size))


def stored_examples(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder,
                    split: str) -> Iterator[dict[str, np.ndarray]]:
  """The examples of `split` in stored order, decoded but neither resized nor normalised:
  {'image': uint8/uint16 [H, W, C], 'mask': int32 [H, W], 'id'} as numpy (export's int8 Dice)."""
  check_split(config, builder, split)
  ds = builder.as_dataset(split=split, shuffle_files=False).map(_decoder(config))
  return iter(tfds.as_numpy(ds))


def eval_batches(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder,
                 split: str, *, with_ids: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """Every example of this host's shard of `split` exactly once, last batch padded.

  `with_ids`: batches also hold `id`, the examples' ids as a numpy str array ("padding" for
  padding); host-side only, pop it before `parallel.host_batch_to_global`.

  All hosts yield the same number of batches (`num_eval_batches`), as the
  jitted eval step needs every host to take part in every step.
  """
  d = config.dataset
  check_split(config, builder, split)
  host_batch = parallel.per_host_batch_size(config.batch_size)
  num_batches = num_eval_batches(config, builder, split)
  canvas = eval_canvas(config, builder, split)
  max_instances = instance_budget(config, builder, split)
  decode = _decoder(config, max_instances)
  ds = builder.as_dataset(split=tfds.split_for_jax_process(split), shuffle_files=False)

  # No Python control flow on tensors here (pad_to_canvas uses tf.cond), so AutoGraph,
  # which cannot convert this closure and warns, is not needed.
  @tf.autograph.experimental.do_not_convert
  def prepare(example):
    example = decode(example)
    image, mask = transforms.eval_view(example["image"], _labels(example), canvas=canvas,
                                       ignore_label=d.ignore_label,
                                       resize=transforms.eval_resize(d),
                                       normalization=config.model.input_normalization)
    return {**_view(example, image, mask), "valid": tf.constant(True)}

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  # Padding examples: zeros everywhere (no instances: class 0), an all-ignore mask.
  padding = {key: tf.zeros(spec.shape, spec.dtype) for key, spec in ds.element_spec.items()}
  padding.update({
      "mask": tf.fill(ds.element_spec["mask"].shape, tf.constant(d.ignore_label, tf.int32)),
      "valid": tf.constant(False), "id": tf.constant("")})
  padding = tf.data.Dataset.from_tensors(padding).repeat()
  ds = ds.concatenate(padding).take(num_batches * host_batch)
  ds = ds.batch(host_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return _host_batches(ds, config, with_ids=with_ids, max_instances=max_instances)
