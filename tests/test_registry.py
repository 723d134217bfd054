"""A model family and a dataset registered from this file alone (nothing under seg_jax/ edited)
train through `train_and_evaluate`; their keys, checks and class names reach the config, the
workdir and the messages."""

import json
import os

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from seg_jax import config as config_lib
from seg_jax import registry
from seg_jax import train
from seg_jax.data.builders import shapes

TOY_CLASSES = ["dark", "bright"]
TOY_SIZE = 16


# ---------------------------------------------------------------------------- a toy model

class PixelNet(nn.Module):
  """Two 1x1 convs: enough to learn a per-pixel brightness threshold."""
  num_logits: int = 1
  hidden: int = 8          # channels of the hidden 1x1 conv
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    del train
    x = nn.relu(nn.Conv(self.hidden, (1, 1), dtype=self.dtype, name="hidden")(x))
    return nn.Conv(self.num_logits, (1, 1), dtype=self.dtype, name="head")(x).astype(jnp.float32)


def _check_pixel_net(config):
  registry.check_int("model.hidden", config.model.hidden)
  if config.model.hidden > 64:
    registry.fail("model.hidden", config.model.hidden, "a pixel net needs at most 64 channels")


registry.register_model(registry.ModelEntry(
    name="pixel_net", module=PixelNet,
    defaults=registry.field_defaults(PixelNet, exclude=("num_logits", "dtype")),
    input_multiple=lambda model: 1, check=_check_pixel_net))


# ---------------------------------------------------------------------------- a toy dataset

class ToyBrightness(tfds.core.GeneratorBasedBuilder):
  """Noise images; a pixel is class 1 where its red channel is above 127."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(TOY_SIZE, TOY_SIZE, 3)),
        "mask": tfds.features.Image(shape=(TOY_SIZE, TOY_SIZE, 1)),
        "id": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0, 32), "validation": self._generate_examples(1, 8)}

  def _generate_examples(self, seed, count):
    rng = np.random.default_rng(seed)
    for i in range(count):
      image = rng.integers(0, 256, (TOY_SIZE, TOY_SIZE, 3), dtype=np.uint8)
      mask = (image[..., :1] > 127).astype(np.uint8)
      yield f"{seed}_{i}", {"image": image, "mask": mask, "id": f"toy_{seed}_{i}"}


def _prepare_toy(config, data_dir):
  builder = ToyBrightness(data_dir=data_dir)
  builder.download_and_prepare(download_config=shapes.OFFLINE_DOWNLOAD_CONFIG)
  return builder, list(TOY_CLASSES)


registry.register_dataset(registry.DatasetEntry(
    name="toy_brightness", defaults={"threshold_note": "red > 127"}, prepare=_prepare_toy,
    num_classes=(2,), default_num_classes=2))


def _toy_config(data_dir):
  config = config_lib.base_config(model="pixel_net", dataset="toy_brightness")
  config.dataset.data_dir = data_dir
  config.dataset.image_size = TOY_SIZE
  config.dataset.shuffle_buffer = 32
  config.dataset.augment.min_scale = config.dataset.augment.max_scale = 1.0
  config.batch_size = 8
  config.num_train_steps = 60
  config.log_every_steps = 20
  config.eval_every_steps = 60
  config.checkpoint_every_steps = 60
  config.num_eval_visuals = 0
  config.loss.name = "ce"
  config.optimizer.learning_rate = 3e-2
  config.optimizer.warmup_steps = 0
  config.compilation_cache_dir = ""
  return config


def test_a_model_and_a_dataset_registered_outside_seg_jax_train(tmp_path):
  config = _toy_config(str(tmp_path / "tfds"))
  assert config.model.to_dict() == {"name": "pixel_net", "init_from": "",
                                    "input_normalization": "minus_one_to_one", "hidden": 8}
  assert config.dataset.threshold_note == "red > 127" and config.dataset.num_classes == 2
  config_lib.validate(config)
  workdir = str(tmp_path / "run")
  scores = train.train_and_evaluate(config, workdir)
  # A brightness threshold is learnt almost perfectly; chance is ~0.5.
  assert scores["eval/pixel_accuracy"] > 0.9, scores
  assert set(scores) >= {"eval/dice/dark", "eval/dice/bright"}
  with open(os.path.join(workdir, "model.json")) as f:
    info = json.load(f)
  assert info["model"] == "pixel_net" and info["class_names"] == TOY_CLASSES
  assert info["input_channels"] == 3


def test_the_registered_components_own_their_keys_and_checks(tmp_path):
  config = _toy_config(str(tmp_path))
  config.model.hidden = 100
  with pytest.raises(config_lib.ConfigError,
                     match=r"^config.model.hidden=100: a pixel net needs at most 64 channels$"):
    config_lib.validate(config)
  config = _toy_config(str(tmp_path))
  with config.unlocked():
    config.model.width = 8  # a unet key
  with pytest.raises(config_lib.ConfigError, match=r"^config.model.width=8: not a key of model "
                                                   r"'pixel_net'; it is a key of deeplabv3plus, "
                                                   r"unet, unet3d, mask_rcnn, faster_rcnn"):
    config_lib.validate(config)
  config = _toy_config(str(tmp_path))
  config.dataset.num_classes = 3
  with pytest.raises(config_lib.ConfigError, match="toy_brightness has 2 classes"):
    config_lib.validate(config)
