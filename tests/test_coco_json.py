"""The coco_json dataset: COCO-JSON folders in (checked, cached, decoded), detections out in the
user's own terms (eval JSON scored by pycocotools, detections files, predict)."""

import json
import os
import shutil

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from pycocotools import coco as coco_api
from pycocotools import cocoeval
from pycocotools import mask as mask_api

from examples import make_coco_dataset
from seg_jax import config as config_lib
from seg_jax import parallel
from seg_jax import tasks
from seg_jax import train
from seg_jax.data import coco_json
from seg_jax.data import pipeline
from tests.conftest import tiny_detector_config

SIZE = 32


def _load(path):
  with open(path) as f:
    return json.load(f)


def _dump(path, data):
  with open(path, "w") as f:
    json.dump(data, f)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """4 training tiles (polygons, one crowd region) and 2 eval tiles (RLE, crowd), 32 px,
  category ids 3 and 7."""
  root = str(tmp_path_factory.mktemp("coco_json"))
  os.makedirs(os.path.join(root, "images"))
  os.makedirs(os.path.join(root, "annotations"))
  train_json = make_coco_dataset.write_split(root, "train", 4, size=SIZE, spacing=11, seed=0,
                                             rle=False)
  eval_json = make_coco_dataset.write_split(root, "val", 2, size=SIZE, spacing=11, seed=1,
                                            rle=True)
  data = _load(train_json)
  crowd = np.zeros((SIZE, SIZE), np.uint8)
  crowd[-6:, -6:] = 1
  rle = mask_api.encode(np.asfortranarray(crowd))
  data["annotations"].append({
      "id": 999, "image_id": data["images"][0]["id"], "category_id": 7, "iscrowd": 1,
      "bbox": mask_api.toBbox(rle).tolist(), "area": 36.0,
      "segmentation": {"size": [SIZE, SIZE], "counts": rle["counts"].decode()}})
  _dump(train_json, data)
  return {"root": root, "train_json": train_json, "eval_json": eval_json,
          "images": os.path.join(root, "images")}


def _config(folder, data_dir):
  c = config_lib.with_dataset(tiny_detector_config(data_dir), "coco_json")
  d = c.dataset
  d.train_json, d.train_images = folder["train_json"], folder["images"]
  d.eval_json, d.eval_images = folder["eval_json"], folder["images"]
  d.max_instances = 0
  d.shuffle_buffer = 8
  c.batch_size = 2
  c.num_eval_visuals = 2
  return c


@pytest.fixture(scope="module")
def prepared(folder, data_dir):
  config = _config(folder, data_dir)
  config_lib.validate(config)
  builder, names = pipeline.prepare_dataset(config)
  return pipeline.resolve_config(config, builder), builder, names


# ---------------------------------------------------------------------------- masks

def test_polygons_and_both_rles_decode_to_the_masks_pycocotools_gives(tmp_path):
  height, width = 20, 24
  rng = np.random.default_rng(0)
  blob = (rng.random((height, width)) < 0.3).astype(np.uint8)
  compressed = mask_api.encode(np.asfortranarray(blob))
  flat = blob.ravel(order="F")
  changes = np.flatnonzero(np.diff(flat)) + 1
  runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
  uncompressed = {"size": [height, width], "counts": runs if flat[0] == 0 else [0] + runs}
  annotations = [
      {"segmentation": [[2, 2, 10, 2, 10, 9, 2, 9], [14.5, 3, 20, 12.5, 13, 15]]},   # two parts
      {"segmentation": {"size": [height, width], "counts": compressed["counts"].decode()}},
      {"segmentation": uncompressed},
  ]
  path = tmp_path / "a.json"
  _dump(path, {"images": [{"id": 1, "height": height, "width": width, "file_name": "x.png"}],
               "categories": [{"id": 1, "name": "x"}],
               "annotations": [{**a, "id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                                "bbox": [0, 0, 1, 1], "area": 1}
                               for i, a in enumerate(annotations)]})
  reference = coco_api.COCO(str(path))
  kinds = []
  for ann in reference.loadAnns(reference.getAnnIds()):
    got = coco_json.annotation_mask(ann, height, width)
    np.testing.assert_array_equal(got, reference.annToMask(ann))
    kinds.append(coco_json.segmentation_kind(ann["segmentation"]))
  assert kinds == ["polygons", "rle", "uncompressed_rle"]
  np.testing.assert_array_equal(coco_json.annotation_mask(annotations[2], height, width), blob)
  box = coco_json.annotation_mask({"bbox": [3.2, 4.0, 5.0, 2.6]}, height, width)
  want = np.zeros((height, width), np.uint8)
  want[4:7, 3:8] = 1
  np.testing.assert_array_equal(box, want)


# ---------------------------------------------------------------------------- the dataset

def test_category_ids_map_to_classes_and_back(folder, prepared):
  config, builder, names = prepared
  assert names == ["background", "mitosis", "nucleus"]          # ids 3, 7 sorted
  assert config.dataset.num_classes == 3
  data = _load(folder["train_json"])
  by_file = {im["file_name"]: im["id"] for im in data["images"]}
  stored = {ex["id"].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(split="train"))}
  assert len(stored) == 4
  for example_id, ex in stored.items():
    image_id = by_file[example_id.split("/", 1)[1]]
    anns = [a for a in data["annotations"] if a["image_id"] == image_id]
    back = [pipeline.category_ids(config, builder)[c - 1] for c in ex["objects"]["label"]]
    assert back == [a["category_id"] for a in anns]
    assert ex["objects"]["crowd"].tolist() == [bool(a["iscrowd"]) for a in anns]
  def most(path):
    data = _load(path)
    return max(sum(1 for a in data["annotations"] if a["image_id"] == im["id"] and not a["iscrowd"])
               for im in data["images"])
  assert config.dataset.max_instances == most(folder["train_json"])
  detections = [dict(category_id=c) for c in (3, 7)]
  reference = pipeline.eval_reference(config, builder, "validation")
  results = __import__("seg_jax.coco_eval", fromlist=["x"]).results_in_original_terms(
      np.asarray([[1, 1, 5, 5], [2, 2, 9, 9.]]), np.asarray([0.9, 0.8]), np.asarray([1, 2]),
      np.asarray([True, True]), None, image_id=1005, original_size=(SIZE, SIZE),
      shown_size=(SIZE, SIZE), category_ids=reference.category_ids)
  assert [r["category_id"] for r in results] == [d["category_id"] for d in detections]
  assert results[0]["bbox"] == [1, 1, 4, 4]


def test_crowd_regions_never_become_positives(folder, prepared):
  config, builder, _ = prepared
  data = _load(folder["train_json"])
  crowd = next(a for a in data["annotations"] if a["iscrowd"])
  crowd_mask = coco_json.annotation_mask(crowd, SIZE, SIZE).astype(bool)
  first = next(im for im in data["images"] if im["id"] == crowd["image_id"])
  ds = builder.as_dataset(split="train").filter(
      lambda ex: ex["id"] == f"train/{first['file_name']}")
  (example,) = tfds.as_numpy(ds.map(pipeline._decoder(config)))
  count = sum(1 for a in data["annotations"] if a["image_id"] == first["id"] and not a["iscrowd"])
  assert example["num_instances"] == count
  # The instances are exactly the image's non-crowd annotations, in order: never the crowd.
  want = [coco_json.annotation_mask(a, SIZE, SIZE) for a in data["annotations"]
          if a["image_id"] == first["id"] and not a["iscrowd"]]
  np.testing.assert_array_equal(example["instance_masks"][:count], np.stack(want))
  assert not any((m.astype(bool) == crowd_mask).all() for m in example["instance_masks"])
  assert (example["classes"][:count] > 0).all() and not example["classes"][count:].any()
  # The crowd region travels beside the instances, moved by the same transforms, for training
  # to ignore what it covers (tests/test_detection_models.py).
  np.testing.assert_array_equal(example["crowd"], crowd_mask)
  import tensorflow as tf
  from seg_jax.data import transforms
  aug = ml_collections.ConfigDict(config.dataset.augment.to_dict())
  aug.min_scale = aug.max_scale = 1.0
  aug.hflip, aug.vflip = True, False
  decoded = {k: tf.constant(v) for k, v in example.items()}
  flips = set()
  for index in range(8):
    image, stack = transforms.train_augment(decoded["image"], pipeline._labels(decoded),
                                            tf.constant([3, index], tf.int64), aug=aug,
                                            size=SIZE, ignore_label=255)
    view = {k: np.asarray(v) for k, v in pipeline._view(decoded, image, stack).items()}
    flipped = not np.array_equal(view["instance_masks"][:count], example["instance_masks"][:count])
    want = crowd_mask[:, ::-1] if flipped else crowd_mask
    np.testing.assert_array_equal(view["crowd"], want)
    flips.add(flipped)
  assert flips == {True, False}


def test_eval_images_may_hold_more_objects_than_the_training_budget(tmp_path, folder, data_dir):
  """The training step's ground-truth budget is the training JSON's most; an eval image holding
  more is no error and its batch holds all of them."""
  root = tmp_path / "crowded"
  shutil.copytree(folder["root"], root)
  eval_path = root / "annotations/instances_val.json"
  data = _load(eval_path)
  first = data["images"][0]["id"]
  extra = [{**a, "id": 10_000 + k} for k, a in enumerate(
      a for a in data["annotations"] if a["image_id"] == first and not a["iscrowd"])]
  data["annotations"] += extra
  _dump(eval_path, data)
  counts = {}
  for a in data["annotations"]:
    counts[a["image_id"]] = counts.get(a["image_id"], 0) + (not a["iscrowd"])
  train_data = _load(root / "annotations/instances_train.json")
  train_most = max(sum(1 for a in train_data["annotations"]
                       if a["image_id"] == im["id"] and not a["iscrowd"])
                   for im in train_data["images"])
  assert max(counts.values()) > train_most
  config = _config({"train_json": str(root / "annotations/instances_train.json"),
                    "eval_json": str(eval_path), "images": str(root / "images")}, data_dir)
  builder, _ = pipeline.prepare_dataset(config)
  config = pipeline.resolve_config(config, builder)
  assert config.dataset.max_instances == train_most
  assert config.model.detections_per_image >= max(counts.values())
  budget = pipeline.instance_budget(config, builder, "validation")
  assert budget == max(counts.values())
  held = {}
  for batch in pipeline.eval_batches(config, builder, "validation", with_ids=True):
    assert batch["instance_masks"].shape[1] == budget
    for i in np.nonzero(batch["valid"])[0]:
      held[str(batch["id"][i])] = int((batch["classes"][i] > 0).sum())
  by_file = {f"validation/{im['file_name']}": im["id"] for im in data["images"]}
  assert held == {name: counts[image_id] for name, image_id in by_file.items()}


def test_budgets_from_the_data_and_disagreeing_values_fail(prepared):
  config, builder, _ = prepared
  wrong = ml_collections.ConfigDict(config.to_dict())
  wrong.dataset.num_classes = 5
  with pytest.raises(config_lib.ConfigError, match=r"dataset.num_classes=5.*2 categories"):
    pipeline.resolve_config(wrong, builder)
  small = ml_collections.ConfigDict(config.to_dict())
  small.dataset.max_instances = 2
  with pytest.raises(pipeline.DataError, match=r"max_instances=2.*raise it"):
    pipeline.resolve_config(small, builder)
  assert config.model.detections_per_image >= config.dataset.max_instances  # raised from 10


def test_a_bad_folder_lists_every_problem_and_caches_nothing(tmp_path, folder):
  root = tmp_path / "bad"
  shutil.copytree(folder["root"], root)
  images = root / "images"
  train_path, eval_path = root / "annotations/instances_train.json", root / "annotations/instances_val.json"
  data = _load(train_path)
  im = data["images"]
  (images / im[1]["file_name"]).unlink()                                   # missing image
  (images / im[2]["file_name"]).write_bytes(b"not a png")                  # unreadable image
  Image.fromarray(np.zeros((SIZE, SIZE + 4), np.uint8)).save(images / im[3]["file_name"])  # size
  anns = data["annotations"]
  anns[0]["image_id"] = 123456                                             # unknown image
  anns[1]["category_id"] = 42                                              # unknown category
  anns[3]["id"] = anns[2]["id"]                                            # duplicate ids
  anns[4]["segmentation"] = [[1, 1, 5, 5]]                                 # 2-point polygon
  anns[5]["bbox"] = [SIZE - 2, 0, 10, 5]                                   # outside the image
  anns[6]["bbox"] = [3, 3, 0, 4]                                           # zero area
  _dump(train_path, data)
  val = _load(eval_path)
  val["images"][0]["file_name"] = f"../images/{im[0]['file_name']}"        # shared with train
  _dump(eval_path, val)
  config = _config(folder, str(tmp_path / "tfds"))
  config.dataset.train_json, config.dataset.eval_json = str(train_path), str(eval_path)
  config.dataset.train_images = config.dataset.eval_images = str(images)
  with pytest.raises(pipeline.DataError) as error:
    pipeline.prepare_dataset(config)
  lines = str(error.value).splitlines()
  expected = [
      (im[1]["file_name"], "no such file|not found|does not exist|missing"),
      (im[2]["file_name"], "cannot|not|unreadable"),
      (im[3]["file_name"], f"{SIZE + 4}x{SIZE} but .* says {SIZE}x{SIZE}"),
      ("instances_train.json", "1 annotations point to an unknown image id"),
      ("instances_train.json", "1 annotations point to an unknown category id"),
      ("instances_train.json", f"duplicate annotation ids {anns[2]['id']}"),
      ("instances_train.json", "polygon with 2 points"),
      ("instances_train.json", "reaches outside the 32x32 image"),
      ("instances_train.json", "has zero area"),
      (im[0]["file_name"], "in both the training and the eval set"),
  ]
  import re
  for name, pattern in expected:
    assert any(name in line and re.search(pattern, line) for line in lines[1:]), (name, pattern,
                                                                                   lines)
  assert len(lines) == 1 + len(expected), lines
  assert not (tmp_path / "tfds").exists() or not any((tmp_path / "tfds").rglob("*.tfrecord*"))
  train_path.write_text("")
  with pytest.raises(pipeline.DataError, match="instances_train.json: empty annotation file"):
    pipeline.prepare_dataset(config)
  assert not (tmp_path / "tfds").exists() or not any((tmp_path / "tfds").rglob("*"))


def test_box_only_objects_train_faster_rcnn_but_not_mask_rcnn(tmp_path, folder):
  root = tmp_path / "boxes"
  shutil.copytree(folder["root"], root)
  train_path = root / "annotations/instances_train.json"
  data = _load(train_path)
  for a in data["annotations"][:3]:
    del a["segmentation"]
  _dump(train_path, data)
  config = _config(folder, str(tmp_path / "tfds"))
  config.dataset.train_json = str(train_path)
  config.dataset.train_images = config.dataset.eval_images = str(root / "images")
  config.dataset.eval_json = str(root / "annotations/instances_val.json")
  with pytest.raises(pipeline.DataError, match=r"instances_train.json: 3 annotations have only a "
                     "box.*Mask R-CNN needs masks"):
    pipeline.prepare_dataset(config)
  faster = config_lib.with_model(config, "faster_rcnn", keep_shared=True)
  builder, _ = pipeline.prepare_dataset(faster)
  assert builder.info.metadata["box_only"]["train"] == 3
  with pytest.raises(pipeline.DataError, match="3 annotations have only a box"):
    pipeline.prepare_dataset(config)     # the cached dataset is re-checked for Mask R-CNN


# ---------------------------------------------------------------------------- evaluation

def test_ground_truth_fed_back_as_detections_scores_ap_one(folder, prepared):
  """The eval batches' own instances, as detections through the user-terms evaluator: every
  image id, category id and pixel must come back to the eval JSON's."""
  config, builder, names = prepared
  task = tasks.get_task(config)
  mesh = parallel.make_mesh()
  evaluator = task.evaluator(names, reference=pipeline.eval_reference(config, builder,
                                                                      "validation"))
  for batch in pipeline.eval_batches(config, builder, "validation", with_ids=True):
    ids = batch.pop("id")
    device_batch = parallel.host_batch_to_global(batch, mesh)
    present = batch["classes"] > 0
    outputs = parallel.host_batch_to_global({
        "boxes": batch["boxes"], "scores": present.astype(np.float32),
        "classes": batch["classes"], "valid": present, "masks": batch["instance_masks"]}, mesh)
    evaluator.add(batch, device_batch, outputs, ids=ids)
  scores = evaluator.compute()
  assert {r["image_id"] for r in evaluator.results} == {im["id"] for im in
                                                       _load(folder["eval_json"])["images"]}
  for name in ("box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75"):
    assert scores[name] == pytest.approx(1.0), name


@pytest.fixture(scope="module")
def trained(folder, data_dir, tmp_path_factory):
  config = _config(folder, data_dir)
  config.num_train_steps = 3
  config.eval_every_steps = config.checkpoint_every_steps = 3
  config.log_every_steps = 3
  config.model.score_threshold = 0.0   # keep detections_per_image boxes: the AP has work to do
  workdir = str(tmp_path_factory.mktemp("coco_json_run"))
  return config, workdir, train.train_and_evaluate(config, workdir)


def test_tiny_mask_rcnn_trains_and_cocoeval_on_its_results_file_gives_its_ap(folder, trained):
  _, workdir, scalars = trained
  path = os.path.join(workdir, "eval", "detections_step_3.json")
  results = _load(path)
  assert results and {r["category_id"] for r in results} <= {3, 7}
  with open(os.devnull, "w") as quiet:
    import contextlib
    with contextlib.redirect_stdout(quiet):
      gt = coco_api.COCO(folder["eval_json"])
      stats = {}
      for kind in ("bbox", "segm"):
        e = cocoeval.COCOeval(gt, gt.loadRes(path), kind)
        e.evaluate()
        e.accumulate()
        e.summarize()
        stats[kind] = e.stats
  assert scalars["eval/mask_AP"] == stats["segm"][0]
  assert scalars["eval/box_AP"] == stats["bbox"][0]
  assert scalars["eval/mask_AP50"] == stats["segm"][1]
  model_info = _load(os.path.join(workdir, "model.json"))
  assert model_info["category_ids"] == [3, 7]
  assert model_info["class_names"] == ["background", "mitosis", "nucleus"]


def test_predict_on_a_detector_workdir_writes_overlays_instances_and_detections(
    folder, trained, tmp_path):
  from seg_jax import predict
  config, workdir, _ = trained
  inputs = tmp_path / "new"
  inputs.mkdir()
  val = _load(folder["eval_json"])["images"]
  for im in val:
    shutil.copy(os.path.join(folder["images"], im["file_name"]), inputs)
  (inputs / "broken.png").write_bytes(b"no image")
  saved = _load(os.path.join(workdir, "config.json"))
  config = ml_collections.ConfigDict(config.to_dict())
  config.dataset.num_classes = saved["dataset"]["num_classes"]
  config.dataset.max_instances = saved["dataset"]["max_instances"]
  config.model.detections_per_image = saved["model"]["detections_per_image"]
  config.predict.input = str(inputs)
  config.predict.output = str(tmp_path / "out")
  config.predict.score_threshold = 0.0
  with pytest.raises(pipeline.DataError, match="1 of 3 input images skipped.*broken.png"):
    predict.run(config, workdir)
  out = tmp_path / "out"
  detections = _load(out / "detections.json")
  inputs_sorted = sorted(os.listdir(inputs))   # image_id: position among the sorted inputs
  for im in val:
    number = inputs_sorted.index(im["file_name"]) + 1
    stem = os.path.splitext(im["file_name"])[0]
    overlay = np.asarray(Image.open(out / f"{stem}_overlay.png"))
    instances = np.asarray(Image.open(out / f"{stem}_instances.png"))
    scale = predict.OVERLAY_MIN_SIDE // SIZE                    # small images drawn enlarged
    assert overlay.shape == (SIZE * scale, SIZE * scale, 3) and instances.shape == (SIZE, SIZE)
    assert instances.dtype == np.uint16 or Image.open(out / f"{stem}_instances.png").mode.startswith("I")
    mine = sorted((d for d in detections if d["file_name"] == im["file_name"]),
                  key=lambda d: -d["score"])
    assert mine and all(d["image_id"] == number and d["category_id"] in (3, 7) for d in mine)
    # id 1 is the best-scored detection: it owns its whole mask (it is painted last)
    best = mask_api.decode(mine[0]["segmentation"]).astype(bool)
    if best.any():
      assert (instances[best] == 1).all()
    assert instances.max() <= len(mine)
