"""Mask R-CNN (ResNet-FPN) on the embedded shapes dataset's instance annotations.

Sized for a 2-core CPU: a ResNet-18 of width 16 with the `small` stem, a
64-channel FPN, and budgets scaled to 64 px scenes of at most 6 objects
(anchors of 8..128 px, 256 proposals, 64 RoIs per image).

  python main.py --config=configs/mask_rcnn.py --workdir=runs/mask_rcnn

Faster R-CNN (boxes only) is `configs/faster_rcnn.py`, the same config
without the mask head.
"""

import ml_collections

from seg_jax import config as config_lib


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """`arg`: `dataset=NAME` (a dataset with instance annotations)."""
  options = config_lib.config_options(arg)
  config = config_lib.base_config(model="mask_rcnn", dataset="shapes")

  config.dataset.image_size = 64      # square scenes, pixels; the same data as configs/unet.py
  config.dataset.num_train = 2000
  config.dataset.num_validation = 200
  config.dataset.num_test = 200
  config.dataset.max_instances = 8    # the generator draws at most 6 objects per scene
  config.dataset.augment.min_scale = 0.85
  config.dataset.augment.max_scale = 1.15

  config.model.backbone = "resnet18"
  config.model.width = 16             # ResNet stage-1 width (64 in the standard networks)
  config.model.stem = "small"  # 3x3 convs and 2x2 pools to stride 4 (keeps small objects)
  config.model.norm = "batch"

  d = config.model
  d.fpn_features = 64
  d.anchor_sizes = (8, 16, 32, 64, 128)   # objects here are at most 32 px across
  d.rpn_pre_nms_topk = 256
  d.rpn_post_nms_topk = 128
  d.rpn_num_samples = 128
  d.roi_num_samples = 64
  d.canonical_size = 56.0             # a 56 px RoI pools from P4; 14-28 px ones from P2-P3
  d.box_head_hidden = 256
  d.mask_head_features = 32
  d.mask_size = 28
  d.detections_per_image = 20

  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 2e-3
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = "warmup_cosine"
  config.optimizer.warmup_steps = 200
  config.optimizer.grad_clip_norm = 10.0

  config.batch_size = 8
  config.num_train_steps = 6000
  config.log_every_steps = 100
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 1000
  config.num_eval_visuals = 4

  config = config_lib.apply_options(config, options)
  if config.dataset.name == "coco_json":
    # Your own COCO JSON (README "Your own instance data"): the budget of objects per image is
    # the most any image holds, read from the JSONs (0 = from the data).
    config.dataset.max_instances = 0
  return config
