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

from configs import unet_cityscapes
from seg_jax import config as config_lib


def get_config() -> ml_collections.ConfigDict:
  # The Cityscapes U-Net and its schedule (resize 512, 384 px crops, scale 0.5-2, no vertical
  # flips, AdamW with the poly schedule), on ADE20K's scenes.
  config = config_lib.with_dataset(unet_cityscapes.get_config(), "ade20k")
  config.dataset.root = ""                   # required: .../ADEChallengeData2016
  config.dataset.eval_size = (768, 768)      # eval canvas; larger images are downscaled to fit
  config.dataset.shuffle_buffer = 1000
  config.dataset.augment.hue = 0.03          # the default jitter (the Cityscapes config has none)

  config.batch_size = 16
  config.num_train_steps = 80000
  config.eval_every_steps = 8000
  config.checkpoint_every_steps = 8000
  return config
