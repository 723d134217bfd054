"""Synthetic batches of the data contract for the benchmarks, and the `synthetic` dataset entry
that lets a benchmark's config name any number of classes (the batches are made here, never read
from a dataset)."""

import numpy as np

from seg_jax import config as config_lib
from seg_jax import registry
from seg_jax.data import image_io
from seg_jax.data.errors import DataError


def _no_examples(config, data_dir):
  raise DataError("dataset 'synthetic' has no examples: the benchmarks make their batches with "
                  "benchmarks/synthetic_data.batch")


SYNTHETIC = registry.register_dataset(registry.DatasetEntry(
    name="synthetic", defaults={}, prepare=_no_examples, default_num_classes=3,
    has_instances=True, description="random batches made by the benchmarks"))


def batch(config) -> dict:
  """One host batch of the data contract: random pixels and labels for semantic models; for
  detectors, scenes of the shapes generator with their padded instances (a detector's cost
  depends on how many objects it matches), normalised as `model.input_normalization` says."""
  b = config.batch_size
  rng = np.random.default_rng(0)
  if config_lib.task(config) == "volumetric":  # one-channel patches, as CT
    patch = tuple(config.dataset.patch_size)
    return {"image": rng.standard_normal((b, *patch, 1), dtype=np.float32),
            "mask": rng.integers(0, config.dataset.num_classes, (b, *patch)).astype(np.int32)}
  size = config.dataset.image_size
  if config_lib.task(config) == "semantic":
    return {"image": rng.standard_normal((b, size, size, 3), dtype=np.float32),
            "mask": rng.integers(0, config.dataset.num_classes, (b, size, size)).astype(np.int32)}
  from seg_jax.data.builders import shapes
  m = config.dataset.max_instances
  out = {"image": np.zeros((b, size, size, 3), np.float32),
         "mask": np.zeros((b, size, size), np.int32),
         "boxes": np.zeros((b, m, 4), np.float32), "classes": np.zeros((b, m), np.int32),
         "instance_masks": np.zeros((b, m, size, size), np.uint8)}
  for i in range(b):
    scene = shapes.generate_scene(rng, size)
    n = min(len(scene["labels"]), m)
    out["image"][i] = image_io.unit_to_model_input(scene["image"] / 255.0,
                                                   config.model.input_normalization)
    out["mask"][i] = scene["mask"]
    out["boxes"][i, :n] = scene["boxes"][:n]
    out["classes"][i, :n] = scene["labels"][:n]
    out["instance_masks"][i, :n] = scene["instance_masks"][:n]
  return out
