"""Faster R-CNN (boxes only) on the embedded shapes dataset: configs/mask_rcnn.py without the mask head.

  python main.py --config=configs/faster_rcnn.py --workdir=runs/faster_rcnn
"""

import ml_collections

from configs import mask_rcnn
from seg_jax import config as config_lib


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """`arg`: as configs/mask_rcnn.py's."""
  return config_lib.with_model(mask_rcnn.get_config(arg), "faster_rcnn", keep_shared=True)
