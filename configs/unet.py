"""U-Net on the embedded procedural shapes dataset: the default main job.

Sized to train to validation mean Dice >= 0.90 in under 10 minutes on a 2-core
CPU. Larger presets: `--config=configs/unet.py:large`; another dataset:
`--config=configs/unet.py:dataset=folder --config.dataset.root=DIR`.

  python main.py --config=configs/unet.py --workdir=runs/unet
"""

import ml_collections

from seg_jax import config as config_lib


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """`arg`: comma-separated `large` (the preset below), `dataset=NAME`, `model=NAME`."""
  options = config_lib.config_options(arg, presets=("large",))
  config = config_lib.base_config(model="unet", dataset="shapes")

  config.dataset.image_size = 64      # square images, pixels
  config.dataset.num_train = 2000     # procedurally generated, cached by TFDS
  config.dataset.num_validation = 200
  config.dataset.num_test = 200

  config.model.width = 16             # channels of the first level; doubles per level
  config.model.depth = 4              # number of 2x downsamplings (64 px -> 4 px)
  config.model.norm = "batch"         # batch | group | none
  config.model.upsample = "transpose" # learned 2x2 stride-2 (transpose) | resize (bilinear + conv)

  config.dataset.augment.min_scale = 0.85  # mild: validation images are not rescaled
  config.dataset.augment.max_scale = 1.15

  config.loss.name = "ce+dice"

  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 3e-3
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = "warmup_cosine"
  config.optimizer.warmup_steps = 100

  # Batch 8 reached a given Dice with fewer images than batch 16 (0.897 after
  # 12.8k images vs 0.849 after 12k) at the same images/s on 2 cores.
  config.batch_size = 8
  config.num_train_steps = 2400
  config.log_every_steps = 100
  config.eval_every_steps = 800
  config.checkpoint_every_steps = 800

  if options["preset"] == "large":
    config.dataset.image_size = 128
    config.model.width = 32
    config.model.depth = 4
    config.batch_size = 8
    config.num_train_steps = 20000
    config.eval_every_steps = 2000
    config.checkpoint_every_steps = 2000
  return config_lib.apply_options(config, options)
