"""Datasets and input pipelines.

Each dataset's module registers its entry (`seg_jax.registry.DatasetEntry`):
importing this package registers the built-in ones, without importing
TensorFlow (the pipeline, `seg_jax.data.pipeline`, does that).
"""

from seg_jax.data import coco  # registers coco
from seg_jax.data import coco_json  # registers coco_json
from seg_jax.data import decathlon  # registers decathlon
from seg_jax.data import standard  # registers oxford_iiit_pet, cityscapes, ade20k
from seg_jax.data.builders import folder  # registers folder
from seg_jax.data.builders import shapes  # registers shapes
from seg_jax.data.builders import shapes3d  # registers shapes3d
