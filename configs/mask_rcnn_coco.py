"""Mask R-CNN R50-FPN on COCO 2017 instances (TFDS coco/2017_panoptic; see seg_jax/data/coco.py).

For accelerators, not for a laptop: a ResNet-50 with group norm trained from
scratch (nothing here downloads ImageNet weights; GroupNorm is what makes
detectors train well from scratch, He et al. 2019, "Rethinking ImageNet
Pre-training"), the paper's FPN, anchors and budgets, 640 px crops of images
resized to a shorter side of 640, and a 3x-length schedule.

Prepare the data once (about 20 GB download; TFDS does it):
  python main.py --config=configs/mask_rcnn_coco.py --workdir=runs/coco --config.dataset.download=True
then the same command without the flag (or with it; a prepared dataset is not fetched again).
Offline, the pipeline and config are tested with tfds.testing.mock_data (tests/test_coco.py).

`:imagenet` starts instead from torchvision's ImageNet ResNet-50, the usual recipe (Mask R-CNN's
paper, detectron2, torchvision): batch norm frozen in the backbone (FrozenBN), ImageNet input
normalisation. Download the weights once (no run downloads anything):
  https://download.pytorch.org/models/resnet50-0676ba61.pth    (IMAGENET1K_V1, 98 MB)
and name them:
  python main.py --config=configs/mask_rcnn_coco.py:imagenet --workdir=runs/coco_r50_in1k \\
      --config.model.init_from=PATH/resnet50-0676ba61.pth
"""

import ml_collections

from seg_jax import config as config_lib
from seg_jax.data import coco


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """`arg`: comma-separated `imagenet` (the preset above), `dataset=NAME` (a dataset with
  instance annotations)."""
  options = config_lib.config_options(arg, presets=("imagenet",))
  config = config_lib.base_config(model="mask_rcnn", dataset="coco")

  config.dataset.num_classes = coco.NUM_CLASSES  # background + the 80 thing classes
  config.dataset.eval_split = "validation"
  config.dataset.resize = 640         # shorter side, train and eval
  config.dataset.image_size = 640     # training crops (padded where the image is smaller)
  config.dataset.eval_size = (896, 896)  # eval canvas: 4:3 images at 640 fit either way
  config.dataset.max_instances = 100  # COCO images have at most 93 non-crowd things
  config.dataset.shuffle_buffer = 2048
  config.dataset.cache = False        # 118k images do not fit in memory
  config.dataset.augment.vflip = False
  config.dataset.augment.min_scale = 0.8
  config.dataset.augment.max_scale = 1.25

  config.model.backbone = "resnet50"
  config.model.width = 64
  config.model.stem = "imagenet"
  config.model.norm = "group"
  config.model.norm_groups = 32
  # config.detection keeps the paper's values (seg_jax/config.py): 256-channel FPN, anchors
  # 32-512, 2000/1000 proposals, 512 RoIs, 1024-wide box head, 28x28 masks, 100 detections.

  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.02
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = "warmup_cosine"
  config.optimizer.warmup_steps = 1000

  config.batch_size = 16
  config.num_train_steps = 270_000
  config.log_every_steps = 100
  config.eval_every_steps = 10_000
  config.checkpoint_every_steps = 5_000
  config.num_eval_visuals = 4
  config.dtype = "float32"           # bfloat16 is untested for the detectors

  if options["preset"] == "imagenet":  # with --config.model.init_from=.../resnet50-0676ba61.pth
    config.model.norm = "batch"        # the weights' own norm, frozen as loaded: 2 images per
    config.model.frozen_backbone_norm = True  # device are too few for batch statistics
    config.model.input_normalization = "imagenet"
  return config_lib.apply_options(config, options)
