"""U-Net on Oxford-IIIT Pet (TFDS `oxford_iiit_pet`): background, pet and the trimap border.

Prepare the data once (downloads about 800 MB into dataset.data_dir):

  python main.py --config=configs/unet_pets.py --workdir=runs/pets --config.dataset.download=True

`--config.dataset.num_classes=2` ignores the border instead of learning it
(see seg_jax/data/standard.py). Images vary in size: the shorter side is
resized to 160 px, training takes 128 px crops, and eval pads each image onto
a 256 x 256 canvas (the few longer than that are downscaled to fit).
"""

import ml_collections

from seg_jax import config as config_lib


def get_config() -> ml_collections.ConfigDict:
  config = config_lib.base_config(model="unet", dataset="oxford_iiit_pet")

  config.dataset.num_classes = 3           # background, pet, border (2 = border ignored)
  config.dataset.eval_split = "test"       # the dataset has train (3680) and test (3669)
  config.dataset.resize = 160              # shorter side, train and eval
  config.dataset.image_size = 128          # training crops
  config.dataset.eval_size = (256, 256)    # eval canvas
  config.dataset.cache = False             # 3680 decoded images would take ~2 GB of memory
  config.dataset.shuffle_buffer = 1000
  config.dataset.augment.vflip = False     # pets are upright
  config.dataset.augment.min_scale = 0.75
  config.dataset.augment.max_scale = 1.5

  config.model.width = 32
  config.model.depth = 4

  config.loss.name = "ce+dice"
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 1e-4
  config.optimizer.warmup_steps = 500

  config.batch_size = 16
  config.num_train_steps = 20000
  config.log_every_steps = 100
  config.eval_every_steps = 2000
  config.checkpoint_every_steps = 2000
  return config
