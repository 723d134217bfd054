"""DeepLabv3+ with a ResNet-10 backbone on the embedded shapes dataset.

Sized for a 2-core CPU and 64 px images: ResNet-10 at width 32 with the
`small_stride2` stem (3x3 convs and one 2x2 pool, so every map has twice the
usual resolution: on 64 px images a stride-4 decoder blurs the shapes),
output stride 8 (an 8x8 map for ASPP), atrous rates (2, 4, 6) scaled down
with the map, 64 ASPP channels, and the decoder on stage 1's map (c2, here
at stride 2). It reaches validation mean Dice >= 0.90 (README, "Models").

What we tried on the way (validation mean Dice after 4000 steps):
  small stem (c2 at stride 4), decoder 64 channels          0.877
  the same, decoder 128 channels                            0.884
  the same, decoder on the stem's stride-2 map (c1)         0.858
  small_stride2 stem, decoder on c2 (stride 2), 64 channels  (this file)

  python main.py --config=configs/deeplabv3plus.py --workdir=runs/deeplab

`:large` is the paper's model (ResNet-50, output stride 16, rates (6, 12,
18), 256 channels, ImageNet stem, stride-4 decoder) for 512 px images, e.g.
with `:large,dataset=folder`:

  python main.py --config=configs/deeplabv3plus.py:large,dataset=folder --workdir=runs/deeplab_r50 \\
      --config.dataset.root=DIR --config.dataset.num_classes=K

It takes ImageNet-normalised inputs, as the paper starts from ImageNet weights. To do so,
download torchvision's ResNet-50 once (no run downloads anything):
  https://download.pytorch.org/models/resnet50-0676ba61.pth    (IMAGENET1K_V1, 98 MB)
and add  --config.model.init_from=PATH/resnet50-0676ba61.pth  to the command above; the log and
WORKDIR/init_from.txt list the 265 backbone arrays loaded (README: "Starting from pretrained
weights"). With small batches add --config.model.frozen_backbone_norm=True.
"""

import ml_collections

from configs import unet
from seg_jax import config as config_lib


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """`arg`: comma-separated `large` (the preset below), `dataset=NAME`."""
  options = config_lib.config_options(arg, presets=("large",))
  # The same data, augmentation, loss and batch as the U-Net.
  config = config_lib.with_model(unet.get_config(), "deeplabv3plus")
  config.model.backbone = "resnet10"
  config.model.stem = "small_stride2"
  config.model.width = 32               # ResNet stage-1 channels (64 in the standard ResNets)
  config.model.output_stride = 8
  config.model.aspp_rates = (2, 4, 6)
  config.model.aspp_features = 64
  config.model.low_level = "c2"  # stage 1's map, as in the paper
  config.model.low_level_features = 48
  config.model.decoder_features = 64
  config.model.dropout = 0.1

  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 3e-3
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = "warmup_cosine"
  config.optimizer.warmup_steps = 200

  config.num_train_steps = 4000
  config.eval_every_steps = 800
  config.checkpoint_every_steps = 800

  if options["preset"] == "large":
    config.dataset.image_size = 512
    config.model.backbone = "resnet50"
    config.model.stem = "imagenet"
    config.model.width = 64
    config.model.output_stride = 16
    config.model.aspp_rates = (6, 12, 18)
    config.model.aspp_features = 256
    config.model.decoder_features = 256
    config.model.input_normalization = "imagenet"  # what ImageNet weights (model.init_from) expect
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.01
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 1e-4
    config.optimizer.schedule = "polynomial"   # DeepLab's "poly", power 0.9
    config.optimizer.warmup_steps = 0
    config.batch_size = 16
    config.num_train_steps = 30000
    config.eval_every_steps = 2000
    config.checkpoint_every_steps = 2000
  return config_lib.apply_options(config, options)
