"""U-Net on Cityscapes (TFDS `cityscapes/semantic_segmentation`), 19 evaluation classes.

Cityscapes needs registration: download leftImg8bit_trainvaltest.zip and
gtFine_trainvaltest.zip from https://www.cityscapes-dataset.com into one
folder, then prepare once (TFDS extracts and converts them; no network):

  python main.py --config=configs/unet_cityscapes.py --workdir=runs/cityscapes \
      --config.dataset.manual_dir=FOLDER_WITH_ZIPS --config.dataset.download=True

labelIds map to the 19 trainIds; all other ids are ignored (255). Images are
1024 x 2048; here the shorter side is resized to 512 (train and eval, so eval
runs at 512 x 1024: add --config.dataset.resize=0 to evaluate at full
resolution) and training takes 384 px crops. Meant for a GPU.
"""

import ml_collections

from seg_jax import config as config_lib


def get_config() -> ml_collections.ConfigDict:
  config = config_lib.base_config(model="unet", dataset="cityscapes")

  config.dataset.num_classes = 19
  config.dataset.eval_split = "validation"   # 500 images; test has no labels
  config.dataset.resize = 512                # shorter side: 1024 x 2048 -> 512 x 1024
  config.dataset.image_size = 384            # training crops
  config.dataset.cache = False
  config.dataset.shuffle_buffer = 500
  config.dataset.augment.vflip = False
  config.dataset.augment.min_scale = 0.5
  config.dataset.augment.max_scale = 2.0
  config.dataset.augment.hue = 0.0

  config.model.width = 32
  config.model.depth = 5
  config.model.upsample = "resize"

  config.loss.name = "ce"
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = "polynomial"
  config.optimizer.warmup_steps = 1000

  config.batch_size = 8
  config.num_train_steps = 40000
  config.log_every_steps = 100
  config.eval_every_steps = 4000
  config.checkpoint_every_steps = 4000
  config.num_eval_visuals = 4
  return config
