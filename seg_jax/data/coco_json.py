"""Your own instance annotations in COCO JSON (`dataset.name='coco_json'`), as a cached TFDS dataset.

Inputs (config keys): `train_json` and `train_images` (the folder the JSON's
`file_name`s are relative to), `eval_json` and `eval_images`. These are what
CVAT ("COCO 1.0"), Label Studio ("COCO"), labelme's converter and Roboflow
export. Per annotation, `segmentation` may be

- polygons: `[[x0, y0, x1, y1, ...], ...]` (several parts per object),
- uncompressed RLE: `{"size": [h, w], "counts": [n0, n1, ...]}`,
- compressed RLE: `{"size": [h, w], "counts": "<string>"}` (pycocotools),
- absent or empty: the object has only its `bbox` ([x, y, width, height]), which is
  stored as a filled rectangle; Faster R-CNN trains on it, Mask R-CNN refuses it.

Masks are decoded by `pycocotools.mask` exactly as COCO's own API does
(`annotation_mask`). `iscrowd=1` annotations are kept, marked as crowd: they
never become training instances, and evaluation (pycocotools' COCOeval on the
user's eval JSON) treats them as COCO does.

Classes: the category ids of the training JSON, sorted, become classes 1..K
(0 is background); their names are the class names; `dataset.num_classes`
is K + 1, taken from the JSON (0 = take it; another value that disagrees is an
error). Every output maps classes back to the JSON's category ids.

Before anything is written, `scan` reads both JSONs and every image they name
and collects *every* problem, one line each naming the file (see `scan`); then
the dataset is written once under `<data_dir>/seg_coco_json/<name>/1.0.0/`,
where the name holds a fingerprint of the two JSONs, every image they name and
the options, so a changed file is never read from a stale cache.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Iterator

from absl import logging
from etils import epath
import numpy as np
from pycocotools import mask as mask_api
import tensorflow_datasets as tfds

from seg_jax import registry
from seg_jax.data import image_io
from seg_jax.data.builders import folder
from seg_jax.data.errors import DataError

SPLITS = {"train": ("train_json", "train_images"), "validation": ("eval_json", "eval_images")}
# Bump when the stored representation changes: it is part of every cache name.
FORMAT_VERSION = 1
# How far (pixels) a box may reach past the image border before it is "outside the image":
# exporters round float coordinates.
BOX_TOLERANCE = 1.0


# ---------------------------------------------------------------------------- masks

def segmentation_kind(segmentation: Any) -> str:
  """'polygons', 'rle' (compressed), 'uncompressed_rle' or 'box' (no mask)."""
  if isinstance(segmentation, dict):
    return "rle" if isinstance(segmentation.get("counts"), str) else "uncompressed_rle"
  if isinstance(segmentation, list) and segmentation:
    return "polygons"
  return "box"


def annotation_mask(annotation: dict, height: int, width: int) -> np.ndarray:
  """uint8 [height, width] mask of one COCO annotation (pycocotools' `annToMask` rules); an
  annotation with only a box gives the box filled (corners rounded to pixels)."""
  segmentation = annotation.get("segmentation")
  kind = segmentation_kind(segmentation)
  if kind == "box":
    x, y, w, h = annotation["bbox"]
    mask = np.zeros((height, width), np.uint8)
    mask[int(round(y)):int(round(y + h)), int(round(x)):int(round(x + w))] = 1
    return mask
  if kind == "polygons":
    rle = mask_api.merge(mask_api.frPyObjects(segmentation, height, width))
  elif kind == "uncompressed_rle":
    rle = mask_api.frPyObjects(segmentation, height, width)
  else:
    rle = segmentation
  return mask_api.decode(rle).astype(np.uint8)


# ---------------------------------------------------------------------------- checks

@dataclasses.dataclass
class SplitScan:
  """One split's checked images and annotations."""
  json_path: str
  image_dir: str
  images: list[dict]                        # the JSON's image records, sorted by file_name
  annotations: dict[int, list[dict]]        # image id -> its annotations
  box_only: int                             # non-crowd annotations without a mask


@dataclasses.dataclass
class CocoScan:
  """Everything `scan` learned: what to write and what later checks need."""
  splits: dict[str, SplitScan]
  category_ids: list[int]                   # class c (1..K) is category_ids[c - 1]
  class_names: list[str]                    # 'background' and the category names
  channels: int
  image_dtype: str

  def metadata(self) -> dict[str, Any]:
    """JSON-able summary stored with the dataset (read back by `DatasetFacts`)."""
    return {
        "format": FORMAT_VERSION, "category_ids": self.category_ids,
        "class_names": self.class_names, "channels": self.channels,
        "splits": {s: [example_id(s, im) for im in sp.images] for s, sp in self.splits.items()},
        "sizes": {example_id(s, im): [im["height"], im["width"]]
                  for s, sp in self.splits.items() for im in sp.images},
        "image_ids": {example_id(s, im): im["id"]
                      for s, sp in self.splits.items() for im in sp.images},
        "json": {s: sp.json_path for s, sp in self.splits.items()},
        "box_only": {s: sp.box_only for s, sp in self.splits.items()},
        "max_objects": {s: max([_num_objects(sp.annotations.get(im["id"], []))
                                for im in sp.images] + [0])
                        for s, sp in self.splits.items()},
    }


def example_id(split: str, image: dict) -> str:
  """The stored id of an image: '<split>/<file_name>' (file names may repeat across splits)."""
  return f"{split}/{image['file_name']}"


def _num_objects(annotations: list[dict]) -> int:
  return sum(1 for a in annotations if not a.get("iscrowd", 0))


def _load_json(path: str, problems: list[str]) -> dict | None:
  if not os.path.isfile(path):
    problems.append(f"{path}: no such annotation file")
    return None
  if os.path.getsize(path) == 0:
    problems.append(f"{path}: empty annotation file")
    return None
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    problems.append(f"{path}: not readable as JSON ({' '.join(str(e).split())[:200]})")
    return None
  if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                           for k in ("images", "annotations", "categories")):
    problems.append(f"{path}: not COCO JSON (needs lists 'images', 'annotations', 'categories')")
    return None
  if not data["images"] or not data["categories"] or not data["annotations"]:
    problems.append(f"{path}: empty annotation file (no images, annotations or categories)")
    return None
  return data


def _duplicates(records: list[dict], key: str = "id") -> list[Any]:
  seen, repeated = set(), []
  for r in records:
    value = r.get(key)
    if value in seen and value not in repeated:
      repeated.append(value)
    seen.add(value)
  return repeated


def _listed(values: list, limit: int = 10) -> str:
  return ", ".join(map(str, values[:limit])) + (", ..." if len(values) > limit else "")


def _check_annotation(path: str, ann: dict, image: dict) -> list[str]:
  """Problems of one annotation against its image record."""
  problems = []
  where = f"{path}: annotation {ann.get('id')} (image {image['file_name']})"
  height, width = image["height"], image["width"]
  bbox = ann.get("bbox")
  if not (isinstance(bbox, list) and len(bbox) == 4
          and all(isinstance(v, (int, float)) for v in bbox)):
    problems.append(f"{where}: bbox {bbox!r} is not [x, y, width, height]")
  else:
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
      problems.append(f"{where}: box {bbox} has zero area")
    elif (x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > width + BOX_TOLERANCE
          or y + h > height + BOX_TOLERANCE):
      problems.append(f"{where}: box {bbox} reaches outside the {width}x{height} image")
  segmentation = ann.get("segmentation")
  kind = segmentation_kind(segmentation)
  if kind == "polygons":
    for part in segmentation:
      if not isinstance(part, list) or len(part) < 6 or len(part) % 2:
        count = len(part) / 2 if isinstance(part, list) else part
        problems.append(f"{where}: polygon with {count:g} points (at least 3 needed)"
                        if isinstance(part, list) else f"{where}: polygon {part!r} is not a list")
  elif kind in ("rle", "uncompressed_rle"):
    size = segmentation.get("size")
    if list(size or []) != [height, width]:
      problems.append(f"{where}: RLE size {size} is not the image's [height, width] "
                      f"[{height}, {width}]")
  return problems


def _check_split_json(path: str, data: dict, problems: list[str]) -> tuple[list[dict], dict]:
  """The sound image records (sorted by file name) and their annotations; problems appended."""
  for what, records in (("image", data["images"]), ("annotation", data["annotations"]),
                        ("category", data["categories"])):
    repeated = _duplicates(records)
    if repeated:
      problems.append(f"{path}: duplicate {what} ids {_listed(repeated)}")
  repeated = _duplicates(data["images"], "file_name")
  if repeated:
    problems.append(f"{path}: several images share the file_name {_listed(repeated)}")
  images = {}
  for im in data["images"]:
    if not (isinstance(im.get("file_name"), str) and isinstance(im.get("height"), int)
            and isinstance(im.get("width"), int) and "id" in im):
      problems.append(f"{path}: image record {im!r:.120} lacks id, file_name, height or width")
      continue
    images.setdefault(im["id"], im)
  categories = {c.get("id") for c in data["categories"]}
  annotations: dict[Any, list[dict]] = {}
  unknown_image, unknown_category = [], []
  for ann in data["annotations"]:
    if ann.get("image_id") not in images:
      unknown_image.append(ann.get("id"))
      continue
    if ann.get("category_id") not in categories:
      unknown_category.append(ann.get("id"))
      continue
    problems.extend(_check_annotation(path, ann, images[ann["image_id"]]))
    annotations.setdefault(ann["image_id"], []).append(ann)
  if unknown_image:
    problems.append(f"{path}: {len(unknown_image)} annotations point to an unknown image id "
                    f"(annotation ids {_listed(unknown_image)})")
  if unknown_category:
    problems.append(f"{path}: {len(unknown_category)} annotations point to an unknown category id "
                    f"(annotation ids {_listed(unknown_category)})")
  return sorted(images.values(), key=lambda im: im["file_name"]), annotations


def _read_image_info(path: str) -> tuple[tuple[int, int, int] | None, str | None, str | None]:
  """((height, width, channels), dtype, problem) of one image file."""
  try:
    image = image_io.read_image(path)
  except image_io.ImageError as e:
    return None, None, " ".join(str(e).split())
  return image.shape, str(image.dtype), None


def scan(files: dict[str, tuple[str, str]], *, channels: int = 0,
         workers: int | None = None) -> CocoScan:
  """Reads and checks both JSONs and every image they name; one DataError lists every problem.

  `files`: split -> (annotation JSON, image folder). Checked: the JSON is
  readable, COCO-shaped and not empty; no duplicate image, annotation or
  category ids; every annotation points to a known image and category; boxes
  inside the image and of non-zero area; polygons of at least 3 points; RLE
  sizes equal the image's; every image file exists, is readable and has the
  JSON's height and width; the splits share no image file; the eval JSON's
  categories are the training JSON's; the images' channel counts agree.
  """
  problems: list[str] = []
  loaded = {split: _load_json(os.path.abspath(os.path.expanduser(j)), problems)
            for split, (j, _) in files.items()}
  checked = {}
  for split, data in loaded.items():
    if data is not None:
      path = os.path.abspath(os.path.expanduser(files[split][0]))
      checked[split] = _check_split_json(path, data, problems)
  category_ids, names = [], ["background"]
  if loaded.get("train") is not None:
    categories = sorted(loaded["train"]["categories"], key=lambda c: c.get("id"))
    category_ids = [c["id"] for c in categories]
    names += [str(c.get("name", c["id"])) for c in categories]
    if loaded.get("validation") is not None:
      extra = sorted({c.get("id") for c in loaded["validation"]["categories"]} - set(category_ids))
      if extra:
        problems.append(f"{os.path.abspath(files['validation'][0])}: category ids {_listed(extra)}"
                        f" are not in the training JSON {os.path.abspath(files['train'][0])}")

  paths = {split: [os.path.join(os.path.abspath(os.path.expanduser(files[split][1])),
                                im["file_name"]) for im in checked[split][0]] for split in checked}
  if "train" in paths and "validation" in paths:
    shared = sorted(set(map(os.path.realpath, paths["train"]))
                    & set(map(os.path.realpath, paths["validation"])))
    for p in shared:
      problems.append(f"{p}: in both the training and the eval set")
  everything = [p for split in paths for p in paths[split]]
  with concurrent.futures.ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
    infos = dict(zip(everything, pool.map(_read_image_info, everything)))
  by_channels: dict[int, list[str]] = {}
  dtypes = set()
  for split in checked:
    for im, p in zip(checked[split][0], paths[split]):
      shape, dtype, problem = infos[p]
      if problem:
        problems.append(problem if problem.startswith(p) else f"{p}: {problem}")
        continue
      if tuple(shape[:2]) != (im["height"], im["width"]):
        problems.append(f"{p}: the image is {shape[1]}x{shape[0]} but "
                        f"{os.path.abspath(files[split][0])} says {im['width']}x{im['height']} "
                        "(width x height)")
      by_channels.setdefault(shape[2], []).append(p)
      dtypes.add(dtype)
  stored_channels = channels
  if by_channels:
    if channels == 0:
      stored_channels = max(by_channels, key=lambda c: len(by_channels[c]))
      for count, ps in sorted(by_channels.items()):
        if count != stored_channels:
          problems.extend(f"{p}: {count} channels, but most images have {stored_channels} (set "
                          "dataset.channels=3 to promote grey images to RGB, or 1 for grey)"
                          for p in ps)
    else:
      for count, ps in sorted(by_channels.items()):
        if count not in (channels, 1) and (count, channels) != (3, 1):
          problems.extend(f"{p}: {count} channels cannot be converted to "
                          f"dataset.channels={channels}" for p in ps)
  if problems:
    folder._raise(problems, "COCO JSON dataset")
  splits = {}
  for split, (images, annotations) in checked.items():
    box_only = sum(1 for anns in annotations.values() for a in anns
                   if not a.get("iscrowd", 0) and segmentation_kind(a.get("segmentation")) == "box")
    splits[split] = SplitScan(os.path.abspath(os.path.expanduser(files[split][0])),
                              os.path.abspath(os.path.expanduser(files[split][1])),
                              images, annotations, box_only)
  return CocoScan(splits=splits, category_ids=category_ids, class_names=names,
                  channels=stored_channels or 3,
                  image_dtype="uint16" if "uint16" in dtypes else "uint8")


def box_only_problems(meta: dict, *, with_masks: bool) -> list[str]:
  """Mask R-CNN needs a mask for every non-crowd object: one line per JSON with box-only ones."""
  if not with_masks:
    return []
  return [f"{meta['json'][s]}: {n} annotations have only a box (no segmentation); Mask R-CNN "
          "needs masks (train faster_rcnn, or add polygons or RLE)"
          for s, n in meta["box_only"].items() if n]


# ---------------------------------------------------------------------------- fingerprint

def fingerprint(files: dict[str, tuple[str, str]], options: dict[str, Any]) -> str:
  """sha256 of the options and of (path, size, mtime) of both JSONs and every image they name."""
  digest = hashlib.sha256(json.dumps({"format": FORMAT_VERSION, **options}, sort_keys=True).encode())

  def add(path):
    try:
      stat = os.stat(path)
      digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    except OSError:
      digest.update(f"{path}\0missing\n".encode())

  for split in sorted(files):
    json_path, image_dir = (os.path.abspath(os.path.expanduser(p)) for p in files[split])
    add(json_path)
    digest.update(f"{split}\0{image_dir}\n".encode())
    try:
      with open(json_path, encoding="utf-8") as f:
        names = sorted(im["file_name"] for im in json.load(f)["images"])
    except (OSError, ValueError, KeyError, TypeError):
      names = []
    for name in names:
      add(os.path.join(image_dir, name))
  return digest.hexdigest()


# ---------------------------------------------------------------------------- TFDS builder

@dataclasses.dataclass(eq=False)
class CocoJsonConfig(tfds.core.BuilderConfig):
  scan: CocoScan | None = dataclasses.field(default=None, repr=False)  # TFDS logs the repr


class SegCocoJson(tfds.core.GeneratorBasedBuilder):
  """The checked images and annotations of a COCO JSON pair.

  Features of one example:
    image: uint8 or uint16 [H, W, C].
    objects: sequence of {mask: uint8 [H, W, 1] (0/1), label: int32 class 1..K, crowd: bool}.
    id: '<split>/<file_name>'.
  Metadata: `CocoScan.metadata()`.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  code_path = epath.Path(__file__)   # see shapes.SegShapes.code_path

  def _info(self) -> tfds.core.DatasetInfo:
    scan_ = self.builder_config.scan
    return tfds.core.DatasetInfo(
        builder=self, description="Images and COCO JSON annotations.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, scan_.channels),
                                         dtype=np.dtype(scan_.image_dtype)),
            "objects": tfds.features.Sequence({
                "mask": tfds.features.Image(shape=(None, None, 1)),
                "label": tfds.features.Tensor(shape=(), dtype=np.int32),
                "crowd": tfds.features.Tensor(shape=(), dtype=np.bool_),
            }),
            "id": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(scan_.metadata()))

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[Any]]:
    del dl_manager  # the files are local
    return {split: self._generate_examples(split) for split in self.builder_config.scan.splits}

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
    scan_ = self.builder_config.scan
    split_scan = scan_.splits[split]
    to_class = {cid: i + 1 for i, cid in enumerate(scan_.category_ids)}
    for im in split_scan.images:
      path = os.path.join(split_scan.image_dir, im["file_name"])
      image = image_io.convert_channels(image_io.read_image(path), scan_.channels, path=path)
      annotations = split_scan.annotations.get(im["id"], [])
      masks = [annotation_mask(a, im["height"], im["width"])[..., None] for a in annotations]
      yield example_id(split, im), {
          "image": folder.to_stored_dtype(image, scan_.image_dtype),
          "objects": {
              "mask": masks if masks else np.zeros((0, im["height"], im["width"], 1), np.uint8),
              "label": np.asarray([to_class[a["category_id"]] for a in annotations], np.int32),
              "crowd": np.asarray([bool(a.get("iscrowd", 0)) for a in annotations], np.bool_)},
          "id": example_id(split, im)}


def _files(config) -> dict[str, tuple[str, str]]:
  d = config.dataset
  return {split: (d[j], d[i]) for split, (j, i) in SPLITS.items()}


def _with_masks(config) -> bool:
  return registry.model_entry(config.model.name).fixed.get("with_masks", False)


def prepare_coco_json(files: dict[str, tuple[str, str]], *, data_dir: str | None,
                      channels: int = 0, with_masks: bool = True
                      ) -> tuple[tfds.core.DatasetBuilder, list[str]]:
  """(prepared builder, class names): read from cache, or checked and written.

  A cached dataset is re-checked from its metadata (box-only objects for Mask
  R-CNN); an uncached one is fully scanned first, and nothing is written
  unless every file is sound.
  """
  from tensorflow_datasets.core import constants
  data_dir = data_dir or constants.DATA_DIR
  options = {"channels": channels}
  base = re.sub(r"[^A-Za-z0-9]+", "_", os.path.splitext(os.path.basename(files["train"][0]))[0])
  name = f"{base.strip('_')[:40] or 'coco'}-{fingerprint(files, options)[:20]}"
  cached = epath.Path(data_dir) / "seg_coco_json" / name / str(SegCocoJson.VERSION)
  if (cached / "dataset_info.json").exists():
    builder = tfds.builder_from_directory(cached)
    problems = box_only_problems(builder.info.metadata, with_masks=with_masks)
    if problems:
      folder._raise(problems, "COCO JSON dataset")
    return builder, list(builder.info.metadata["class_names"])
  logging.info("Checking both annotation files and every image they name before building")
  scan_ = scan(files, channels=channels)
  problems = box_only_problems(scan_.metadata(), with_masks=with_masks)
  if problems:
    folder._raise(problems, "COCO JSON dataset")
  builder = SegCocoJson(config=CocoJsonConfig(name=name, scan=scan_), data_dir=data_dir)
  builder.download_and_prepare(download_config=folder.OFFLINE_DOWNLOAD_CONFIG)
  logging.info("Built %s: %s", builder.data_dir,
               ", ".join(f"{s} {len(sp.images)}" for s, sp in scan_.splits.items()))
  return builder, scan_.class_names


# ---------------------------------------------------------------------------- input pipeline

def decode(example: dict, max_instances: int) -> dict:
  """Stored example -> {'image', 'mask', 'instance_masks' [M, H, W], 'classes' [M],
  'num_instances', 'crowd' uint8 [H, W], 'id'}. Crowd regions are not instances: they are
  never positives, and `crowd` (their union) makes training ignore what they cover."""
  import tensorflow as tf
  from seg_jax.data import transforms
  objects = example["objects"]
  shape = tf.shape(example["image"])
  masks = tf.reshape(objects["mask"], [-1, shape[0], shape[1]])   # [N, H, W] (N may be 0)
  keep = tf.logical_not(objects["crowd"])
  crowd = tf.reduce_max(tf.concat([tf.zeros([1, shape[0], shape[1]], tf.uint8),
                                   tf.boolean_mask(masks, objects["crowd"])], 0), axis=0)
  masks = tf.boolean_mask(masks, keep)
  classes = tf.boolean_mask(objects["label"], keep)
  semantic = tf.reduce_max(tf.concat([
      tf.zeros([1, shape[0], shape[1]], tf.int32),
      tf.cast(masks, tf.int32) * classes[:, None, None]], 0), axis=0)
  instance_masks, padded_classes, count = transforms.pad_instances(masks, classes, max_instances)
  return {"image": example["image"], "mask": semantic, "instance_masks": instance_masks,
          "classes": padded_classes, "num_instances": count, "crowd": crowd,
          "id": example["id"]}


# ---------------------------------------------------------------------------- evaluation

@dataclasses.dataclass
class EvalReference:
  """What scoring in the user's terms needs: the eval JSON, and per stored id its COCO image
  id and original (height, width); class c is category_ids[c - 1]."""
  json_path: str
  category_ids: list[int]
  image_ids: dict[str, int]
  sizes: dict[str, tuple[int, int]]
  canvas: tuple[int, int] = (0, 0)          # the eval canvas and resize (the pipeline's)
  resize: Any = None                        # transforms.Resize


def eval_reference(builder, split: str) -> EvalReference:
  meta = builder.info.metadata
  ids = meta["splits"][split]
  return EvalReference(json_path=meta["json"][split], category_ids=list(meta["category_ids"]),
                       image_ids={i: meta["image_ids"][i] for i in ids},
                       sizes={i: tuple(meta["sizes"][i]) for i in ids})


def data_facts(builder) -> dict[str, int]:
  """Values the data determines: class count (with background) and each split's largest
  object count."""
  meta = builder.info.metadata
  return {"num_classes": len(meta["category_ids"]) + 1,
          "category_ids": [int(c) for c in meta["category_ids"]],
          "max_objects": {split: int(n) for split, n in meta["max_objects"].items()}}


# ---------------------------------------------------------------------------- dataset entry

def _prepare_entry(config, data_dir: str | None):
  return prepare_coco_json(_files(config), data_dir=data_dir, channels=config.dataset.channels,
                           with_masks=_with_masks(config))


def _check_entry(config) -> None:
  d = config.dataset
  for key in ("train_json", "train_images", "eval_json", "eval_images"):
    if not d[key]:
      registry.fail(f"dataset.{key}", d[key], "dataset.name='coco_json' needs train_json, "
                    "train_images, eval_json and eval_images")
  registry.check_int("dataset.channels", d.channels, minimum=0)
  if d.eval_split != "validation":
    registry.fail("dataset.eval_split", d.eval_split, "coco_json evaluates on eval_json: "
                  "'validation'")


ENTRY = registry.register_dataset(registry.DatasetEntry(
    name="coco_json",
    defaults={
        "train_json": "",     # COCO instances JSON of the training images
        "train_images": "",   # folder its images' file_name are relative to
        "eval_json": "",      # COCO instances JSON scored by pycocotools at each eval
        "eval_images": "",
        "channels": 0,        # 0 = as in the files (all must agree); 3 = grey promoted to RGB
    },
    prepare=_prepare_entry, default_num_classes=0, has_instances=True, decode=decode,
    check=_check_entry, facts=data_facts, eval_reference=eval_reference,
    description="your images with COCO JSON instance annotations (polygons, RLE, boxes)"))
