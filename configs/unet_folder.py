"""U-Net on your own folder of images and masks.

  python main.py --config=configs/unet_folder.py --workdir=runs/mine \
      --config.dataset.root=DIR --config.dataset.num_classes=K

DIR holds images/ and masks/ (paired by file stem), optionally splits/ and
classes.txt; see seg_jax/data/builders/folder.py. Every file is checked before
training; the checked dataset is cached by TFDS and rebuilt only when a file
changes. Sized for a quick CPU run on images of a few hundred pixels; for
larger images raise dataset.image_size (the training crop) or set
dataset.resize (the shorter side, applied to train and eval).
"""

import ml_collections

from seg_jax import config as config_lib


def get_config() -> ml_collections.ConfigDict:
  config = config_lib.base_config(model="unet", dataset="folder")

  config.dataset.root = ""                 # required: the folder with images/ and masks/
  config.dataset.num_classes = 2           # including background; must cover every mask value
  config.dataset.channels = 0              # 0 = as in the files; 3 promotes grey to RGB
  config.dataset.image_size = 128          # training crops; eval uses whole images, padded
  config.dataset.resize = 0                # 0 = native resolution
  config.dataset.validation_fraction = 0.1 # without splits/: seeded split (dataset.split_seed)
  config.dataset.test_fraction = 0.0
  config.dataset.augment.min_scale = 0.75
  config.dataset.augment.max_scale = 1.25

  config.model.width = 16
  config.model.depth = 4
  config.model.upsample = "transpose"

  config.loss.name = "ce+dice"
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 3e-3
  config.optimizer.weight_decay = 1e-4
  config.optimizer.warmup_steps = 50

  config.batch_size = 8
  config.num_train_steps = 2000
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  return config
