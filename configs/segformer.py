"""SegFormer-B0 (MiT-B0 encoder, all-MLP decoder) on the embedded shapes dataset, trained from
scratch; `:ade20k` is the paper's ADE20K recipe.

  python main.py --config=configs/segformer.py --workdir=runs/segformer

The same data, augmentation, loss and batch as the U-Net (configs/unet.py). SegFormer's
logits are at stride 4 (16 x 16 on these 64 px scenes) and upsampled bilinearly, so edges
finer than 4 px are interpolated, not predicted: see README, "SegFormer".

Trained from scratch it learns slowly here: validation mean Dice 0.30 after 1200 steps (README,
"SegFormer", says what limits it); it is not yet a tuned config.

`:ade20k` is SegFormer-B0 as the paper trains it on ADE20K (512 px crops, AdamW 6e-5 with
weight decay 0.01, 10x on the decoder head, poly schedule with power 1, 160k steps at batch
16, ImageNet mean/std input normalisation), meant for an
accelerator and for weights starting from the ImageNet MiT-B0 (`nvidia/mit-b0`):

  python main.py --config=configs/segformer.py:ade20k --workdir=runs/segformer_ade20k \\
      --config.dataset.root=/data/ADEChallengeData2016 --config.model.init_from=mit-b0/
"""

import ml_collections

from configs import unet
from configs import unet_ade20k
from seg_jax import config as config_lib


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """`arg`: comma-separated `ade20k` (the preset below), `dataset=NAME`."""
  options = config_lib.config_options(arg, presets=("ade20k",))
  if options["preset"] == "ade20k":
    return config_lib.apply_options(_ade20k(), options)
  config = config_lib.with_model(unet.get_config(), "segformer")
  config.model.variant = "b0"
  # Off: from scratch on these scenes the model underfits (its training Dice is no better than
  # its validation Dice), so stochastic depth and dropout have nothing to regularise.
  config.model.drop_path_rate = 0.0
  config.model.dropout = 0.0

  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 5e-4
  config.optimizer.weight_decay = 0.01
  config.optimizer.schedule = "warmup_cosine"
  config.optimizer.warmup_steps = 200
  config.optimizer.grad_clip_norm = 1.0  # 2e-3 without clipping: loss still 2.0 after 900 steps

  config.num_train_steps = 4000
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 1000
  return config_lib.apply_options(config, options)


def _ade20k() -> ml_collections.ConfigDict:
  # ADE20K's pipeline as the U-Net's ADE20K config reads it (shorter side 512, scale 0.5-2,
  # 768 px eval canvas), with the paper's crop, optimiser and schedule.
  config = config_lib.with_model(unet_ade20k.get_config(), "segformer")
  config.model.variant = "b0"
  config.dataset.image_size = 512
  config.loss.name = "ce"
  config.optimizer.name = "adamw"
  # The paper's 6e-5 for the pretrained encoder and 10x that for the new decoder head.
  config.optimizer.learning_rate = 6e-4
  config.optimizer.backbone_learning_rate_multiplier = 0.1
  config.optimizer.weight_decay = 0.01
  config.model.input_normalization = "imagenet"  # what nvidia/mit-b* were trained on
  config.optimizer.schedule = "polynomial"
  config.optimizer.power = 1.0
  config.optimizer.warmup_steps = 1500
  config.batch_size = 16
  config.num_train_steps = 160000
  config.eval_every_steps = 16000
  config.checkpoint_every_steps = 16000
  return config
