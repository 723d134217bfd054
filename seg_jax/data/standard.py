"""Standard segmentation datasets: where their data comes from and how raw labels become classes.

Each dataset maps its stored label values to our classes with a lookup table
(`label_table`): raw value -> class id in [0, num_classes), or `ignore_label`.
Values a dataset does not define also map to `ignore_label`.

- `oxford_iiit_pet` (TFDS): trimaps 1 = pet, 2 = background, 3 = border
  (the uncertain outline). num_classes=3: background 0, pet 1, border 2 (every
  pixel supervised, as in the TensorFlow segmentation tutorial); num_classes=2:
  background 0, pet 1, and the border is ignored (neither loss nor metrics).
  Splits: train (3680), test (3669).
- `cityscapes` (TFDS `cityscapes/semantic_segmentation`, manual download):
  the 34 `labelIds` map to the 19 evaluation `trainIds` of cityscapesScripts;
  every other id (unlabeled, ego vehicle, rectification border, out of roi,
  static, dynamic, ground, parking, rail track, guard rail, bridge, tunnel,
  polegroup, caravan, trailer, license plate) is ignored. Splits: train (2975),
  validation (500), test (1525, without labels).
- `ade20k` (SceneParse150, the extracted ADEChallengeData2016.zip, read as a
  folder dataset): 0 = "other" (unlabelled) -> ignore, 1..150 -> 0..149.
  Splits: train (20210), validation (2000). TFDS's own `scene_parse150` is
  not used: its builder downloads the 2017 *instance* annotations, whose red
  channel holds one of 100 object categories (walls, floor, sky, ... are 0),
  not the 150-class masks of the benchmark.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from seg_jax import registry
from seg_jax.data.builders import folder
from seg_jax.data.errors import DataError

PET_CLASSES = ("background", "pet", "border")

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic_light", "traffic_sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle")
# labelId -> trainId for the 19 evaluated classes (cityscapesScripts labels.py).
CITYSCAPES_LABEL_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
                             23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}

# objectInfo150 of the MIT Scene Parsing benchmark, first name of each entry, in id order 1..150.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest_of_drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool_table", "pillow", "screen_door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee_table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen_island", "computer", "swivel_chair", "boat", "bar",
    "arcade_machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television", "airplane", "dirt_track", "apparel",
    "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage",
    "van", "ship", "fountain", "conveyer_belt", "canopy", "washer", "plaything",
    "swimming_pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike",
    "cradle", "oven", "ball", "food", "step", "tank", "trade_name", "microwave", "pot",
    "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic_light", "tray", "ashcan", "fan", "pier", "crt_screen", "plate",
    "monitor", "bulletin_board", "shower", "radiator", "glass", "clock", "flag")


ADE20K_RAW_CLASSES = 151  # stored values 0..150


def class_names(name: str, num_classes: int) -> list[str]:
  if name == "oxford_iiit_pet":
    return list(PET_CLASSES[:num_classes])
  if name == "cityscapes":
    return list(CITYSCAPES_CLASSES)
  if name == "ade20k":
    return list(ADE20K_CLASSES)
  raise KeyError(name)


def label_table(name: str, num_classes: int, ignore_label: int, size: int = 256) -> np.ndarray:
  """int32 [size]: stored label value -> class id, or ignore_label (see module docstring)."""
  table = np.full(size, ignore_label, np.int32)
  if name == "oxford_iiit_pet":
    table[2], table[1] = 0, 1
    if num_classes == 3:
      table[3] = 2
  elif name == "cityscapes":
    for label_id, train_id in CITYSCAPES_LABEL_TO_TRAIN.items():
      table[label_id] = train_id
  elif name == "ade20k":
    table[1:ADE20K_RAW_CLASSES] = np.arange(ADE20K_RAW_CLASSES - 1)
  else:
    raise KeyError(name)
  return table


# ---------------------------------------------------------------------------- dataset entries

PET_HOW_TO_GET = ("add --config.dataset.download=True once to download (about 800 MB) and "
                  "prepare it with TFDS")
CITYSCAPES_HOW_TO_GET = (
    "register at https://www.cityscapes-dataset.com, download leftImg8bit_trainvaltest.zip and "
    "gtFine_trainvaltest.zip into one folder, then add --config.dataset.manual_dir=THAT_FOLDER "
    "--config.dataset.download=True once (TFDS extracts and prepares them; nothing is fetched "
    "from the network)")


def prepare_tfds(source: str, config, data_dir: str | None, how_to_get: str):
  """The TFDS catalogue dataset `source`, prepared in data_dir (only when dataset.download)."""
  d = config.dataset
  builder = tfds.builder(source, data_dir=data_dir)
  if not builder.is_prepared():
    if not d.download:
      raise DataError(f"{source} is not prepared in {builder.data_dir}: {how_to_get}")
    manual = os.path.expanduser(d.manual_dir) if d.get("manual_dir") else None
    try:
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=manual, try_download_gcs=False))
    except AssertionError as e:  # TFDS: manual files missing
      raise DataError(f"{source}: {' '.join(str(e).split())}; {how_to_get}") from None
  return builder


def _table(name: str):
  return lambda config: label_table(name, config.dataset.num_classes, config.dataset.ignore_label)


def _prepare_pets(config, data_dir):
  builder = prepare_tfds("oxford_iiit_pet", config, data_dir, PET_HOW_TO_GET)
  return builder, class_names("oxford_iiit_pet", config.dataset.num_classes)


def _prepare_cityscapes(config, data_dir):
  builder = prepare_tfds("cityscapes/semantic_segmentation", config, data_dir,
                         CITYSCAPES_HOW_TO_GET)
  return builder, class_names("cityscapes", config.dataset.num_classes)


def _prepare_ade20k(config, data_dir):
  builder, _ = folder.prepare_folder(
      config.dataset.root, data_dir=data_dir, num_classes=config.dataset.num_classes,
      ignore_label=config.dataset.ignore_label, channels=3, layout="ade20k",
      raw_num_classes=ADE20K_RAW_CLASSES)
  return builder, class_names("ade20k", config.dataset.num_classes)


def _check_ade20k(config) -> None:
  if not config.dataset.root:
    registry.fail("dataset.root", config.dataset.root,
                  "dataset.name='ade20k' needs the extracted ADEChallengeData2016 folder")


DOWNLOAD_KEY = {"download": False}  # prepare with TFDS if absent (downloads: only when set)

PETS = registry.register_dataset(registry.DatasetEntry(
    name="oxford_iiit_pet", defaults=DOWNLOAD_KEY, prepare=_prepare_pets, num_classes=(2, 3),
    default_num_classes=3, eval_split="test",
    feature_keys=("image", "segmentation_mask", "file_name"), label_table=_table("oxford_iiit_pet"),
    description="Oxford-IIIT Pet trimaps (TFDS)"))
CITYSCAPES = registry.register_dataset(registry.DatasetEntry(
    name="cityscapes",
    defaults={**DOWNLOAD_KEY,
              "manual_dir": ""},  # the folder with the manually downloaded zips
    prepare=_prepare_cityscapes, num_classes=(19,), default_num_classes=19,
    feature_keys=("image_left", "segmentation_label", "image_id"), label_table=_table("cityscapes"),
    description="Cityscapes fine annotations, 19 classes (TFDS, manual download)"))
ADE20K = registry.register_dataset(registry.DatasetEntry(
    name="ade20k",
    defaults={"root": ""},  # the extracted ADEChallengeData2016/ folder
    prepare=_prepare_ade20k, num_classes=(150,), default_num_classes=150,
    label_table=_table("ade20k"), check=_check_ade20k,
    description="ADE20K SceneParse150 (the extracted ADEChallengeData2016.zip)"))
