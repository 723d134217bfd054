"""COCO 2017 instances for the detectors, read from TFDS `coco/2017_panoptic`.

TFDS's `coco/2017` config has boxes, labels and crowd flags but no instance
masks. Its `coco/2017_panoptic` config has, per image, a panoptic PNG whose
pixel colour encodes a segment id (`id = R + 256 G + 256^2 B`) and the
segments' `id`, `label`, `bbox` and `is_crowd`. Every segment of a *thing*
category is one object instance, so the instance masks are exact: the
segments of one image never overlap (COCO's panoptic annotations resolved the
rare overlaps of the instance annotations; that is the one difference).

Classes: the panoptic categories are sorted by COCO id, so the 80 thing
categories (ids 1-90) come first and the 53 stuff categories (ids 92-200)
after them: label < 80 is thing class `label + 1` (0 is background); stuff
segments and crowd regions are not instances and are dropped. The semantic
`mask` of an example is the composition of its instances (stuff counts as
background).
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from seg_jax import registry
from seg_jax.data.errors import DataError

SOURCE = "coco/2017_panoptic"
NUM_THING_CLASSES = 80
NUM_CLASSES = NUM_THING_CLASSES + 1       # with background
HOW_TO_GET = ("add --config.dataset.download=True once: TFDS downloads the COCO 2017 images and "
              "panoptic annotations (about 20 GB) and prepares coco/2017_panoptic")


def class_names(builder) -> list[str]:
  """'background' and the 80 thing names, as the prepared dataset stores them."""
  names = builder.info.features["panoptic_objects"]["label"].names
  return ["background"] + list(names[:NUM_THING_CLASSES])


def segment_ids(panoptic_image):
  """int32 [H, W] segment ids of an RGB panoptic PNG [H, W, 3] (a tf.Tensor)."""
  # TensorFlow is imported where the input pipeline runs, not where configs are checked.
  import tensorflow as tf
  rgb = tf.cast(panoptic_image, tf.int32)
  return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def decode(example: dict, max_instances: int) -> dict:
  """Stored example -> {'image', 'mask', 'instance_masks' [M, H, W], 'classes' [M],
  'num_instances', 'id'} (see pipeline's decoders)."""
  import tensorflow as tf
  from seg_jax.data import transforms
  objects = example["panoptic_objects"]
  label = tf.cast(objects["label"], tf.int32)
  keep = (label < NUM_THING_CLASSES) & tf.logical_not(objects["is_crowd"])
  ids = tf.cast(tf.boolean_mask(objects["id"], keep), tf.int32)
  classes = tf.boolean_mask(label, keep) + 1
  pixels = segment_ids(example["panoptic_image"])
  masks = tf.cast(pixels[None] == ids[:, None, None], tf.uint8)                 # [N, H, W]
  semantic = tf.reduce_max(tf.concat([
      tf.zeros_like(pixels)[None], tf.cast(masks, tf.int32) * classes[:, None, None]], 0), axis=0)
  instance_masks, padded_classes, count = transforms.pad_instances(masks, classes, max_instances)
  return {"image": example["image"], "mask": semantic, "instance_masks": instance_masks,
          "classes": padded_classes, "num_instances": count, "id": example["image/filename"]}


def _prepare(config, data_dir: str | None):
  """COCO 2017 instances (TFDS coco/2017_panoptic), prepared in data_dir if dataset.download."""
  builder = tfds.builder(SOURCE, data_dir=data_dir)
  if not builder.is_prepared():
    if not config.dataset.download:
      raise DataError(f"{SOURCE} is not prepared in {builder.data_dir}: {HOW_TO_GET}")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False))
  return builder, class_names(builder)


ENTRY = registry.register_dataset(registry.DatasetEntry(
    name="coco", defaults={"download": False}, prepare=_prepare, num_classes=(NUM_CLASSES,),
    default_num_classes=NUM_CLASSES, has_instances=True, decode=decode,
    description="COCO 2017 instances (TFDS coco/2017_panoptic)"))
