"""Task families that plug into the one train loop (`seg_jax/train.py`).

A task says, for its family of models, what the loss of a batch is, what the
eval step computes on device, how the host turns those outputs into
dataset-level scores, and what the eval pictures show:

- `semantic` (U-Net, DeepLabv3+): per-pixel losses, a confusion matrix summed
  over the split (Dice, IoU, pixel accuracy);
- `instance` (Mask R-CNN, Faster R-CNN): the detector's own losses, fixed-size
  detections gathered to the host and scored by pycocotools (box and mask AP);
- `volumetric` (3D U-Net): the semantic losses on random patches, whole cases segmented by
  sliding windows and scored per case in mm (Dice, HD95, NSD).

`config_lib.task(config)` picks the family from `model.name`.
"""

from __future__ import annotations

import ml_collections

from seg_jax import config as config_lib
from seg_jax.tasks.instance import InstanceTask
from seg_jax.tasks.semantic import SemanticTask
from seg_jax.tasks.volumetric import VolumetricTask

TASKS = {"semantic": SemanticTask, "instance": InstanceTask, "volumetric": VolumetricTask}


def get_task(config: ml_collections.ConfigDict):
  return TASKS[config_lib.task(config)](config)
