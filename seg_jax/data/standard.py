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

import dataclasses

import numpy as np

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


@dataclasses.dataclass(frozen=True)
class StandardDataset:
  """How to read one standard dataset."""
  name: str                       # dataset.name
  source: str                     # TFDS name (with config), or 'ade20k' for the folder reader
  image_key: str                  # feature names in the stored examples
  mask_key: str
  id_key: str
  num_classes: tuple[int, ...]    # allowed dataset.num_classes
  eval_split: str
  how_to_get: str                 # shown when the data is not prepared


DATASETS = {
    "oxford_iiit_pet": StandardDataset(
        name="oxford_iiit_pet", source="oxford_iiit_pet", image_key="image",
        mask_key="segmentation_mask", id_key="file_name", num_classes=(2, 3), eval_split="test",
        how_to_get="add --config.dataset.download=True once to download (about 800 MB) and "
                   "prepare it with TFDS"),
    "cityscapes": StandardDataset(
        name="cityscapes", source="cityscapes/semantic_segmentation", image_key="image_left",
        mask_key="segmentation_label", id_key="image_id", num_classes=(19,),
        eval_split="validation",
        how_to_get="register at https://www.cityscapes-dataset.com, download "
                   "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip into one folder, "
                   "then add --config.dataset.manual_dir=THAT_FOLDER --config.dataset.download=True "
                   "once (TFDS extracts and prepares them; nothing is fetched from the network)"),
    "ade20k": StandardDataset(
        name="ade20k", source="ade20k", image_key="image", mask_key="mask", id_key="id",
        num_classes=(150,), eval_split="validation",
        how_to_get="download ADEChallengeData2016.zip from the MIT Scene Parsing benchmark, "
                   "extract it and pass --config.dataset.root=.../ADEChallengeData2016"),
}

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
