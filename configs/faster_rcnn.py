"""Faster R-CNN (boxes only) on the embedded shapes dataset: configs/mask_rcnn.py without the mask head.

  python main.py --config=configs/faster_rcnn.py --workdir=runs/faster_rcnn
"""

import ml_collections

from configs import mask_rcnn


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  config = mask_rcnn.get_config(preset)
  config.model.name = "faster_rcnn"
  return config
