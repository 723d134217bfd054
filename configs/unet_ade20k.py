"""U-Net on ADE20K (SceneParse150, 150 classes) from the extracted ADEChallengeData2016.zip.

  python main.py --config=configs/unet_ade20k.py --workdir=runs/ade20k \
      --config.dataset.root=/data/ADEChallengeData2016

The folder is read like a folder dataset (checked once, then cached by TFDS):
images/{training,validation}/*.jpg with annotations/{...}/*.png. Label 0
("other") is ignored and 1..150 become classes 0..149. TFDS's own
`scene_parse150` is not used: it holds the 2017 instance annotations (100
object categories), not these 150-class masks. The shorter side is resized to
512; eval pads each image onto 768 x 768 (wider or taller ones, aspect beyond
1.5, are downscaled to fit). Meant for a GPU.
"""

import ml_collections

from seg_jax import config as config_lib


def get_config() -> ml_collections.ConfigDict:
  config = config_lib.base_config()

  config.dataset.name = "ade20k"
  config.dataset.root = ""                   # required: .../ADEChallengeData2016
  config.dataset.num_classes = 150
  config.dataset.eval_split = "validation"   # 2000 images
  config.dataset.resize = 512
  config.dataset.image_size = 384
  config.dataset.eval_size = (768, 768)
  config.dataset.cache = False
  config.dataset.shuffle_buffer = 1000
  config.dataset.augment.vflip = False
  config.dataset.augment.min_scale = 0.5
  config.dataset.augment.max_scale = 2.0

  config.model.name = "unet"
  config.model.width = 32
  config.model.depth = 5
  config.model.upsample = "resize"

  config.loss.name = "ce"
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = "polynomial"
  config.optimizer.warmup_steps = 1000

  config.batch_size = 16
  config.num_train_steps = 80000
  config.log_every_steps = 100
  config.eval_every_steps = 8000
  config.checkpoint_every_steps = 8000
  config.num_eval_visuals = 4
  return config
