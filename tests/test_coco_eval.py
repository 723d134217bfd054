"""COCO AP through pycocotools: perfect detections, a shifted box, the bookkeeping, and the
instance task's evaluation split over two processes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from seg_jax import coco_eval
from seg_jax.tasks import instance
from tests.conftest import reserved_port


def _box_mask(box, size=(64, 64)):
  mask = np.zeros(size, np.float32)
  y0, x0, y1, x1 = np.asarray(box, int)
  mask[y0:y1, x0:x1] = 1
  return mask


GT_BOXES = np.array([[4, 4, 24, 28], [30, 10, 60, 40], [0, 0, 0, 0]], np.float32)
GT_CLASSES = np.array([1, 2, 0])
GT_VALID = np.array([True, True, False])


def _add(evaluator, det_boxes, det_scores, det_classes, det_valid):
  evaluator.add(GT_BOXES, GT_CLASSES, GT_VALID, det_boxes, det_scores, det_classes, det_valid,
                image_size=(64, 64), gt_masks=np.stack([_box_mask(b) for b in GT_BOXES]),
                det_masks=np.stack([_box_mask(b) for b in det_boxes]))


def test_perfect_detections_give_ap_one():
  evaluator = coco_eval.CocoEvaluator(["square", "disc"])
  det_boxes = np.concatenate([GT_BOXES[:2], np.zeros((3, 4), np.float32)])
  for _ in range(2):   # two images
    _add(evaluator, det_boxes, np.array([0.9, 0.8, 0, 0, 0]), np.array([1, 2, 0, 0, 0]),
         np.array([True, True, False, False, False]))
  scores = evaluator.compute()
  for prefix in ("box", "mask"):
    for name in ("AP", "AP50", "AP75"):
      assert scores[f"{prefix}_{name}"] == pytest.approx(1.0), (prefix, name)
  # Both objects are small (area < 32**2); COCO has no medium/large value: we write NaN.
  assert scores["box_APs"] == pytest.approx(1.0)
  assert np.isnan(scores["box_APm"]) and np.isnan(scores["box_APl"])


def test_a_shifted_box_scores_the_thresholds_it_passes():
  """Object 1 found with IoU 0.66 (shifted), object 2 exactly: per class, AP over the ten IoU
  thresholds 0.50:0.95 is the share of thresholds passed, and mean AP averages the classes."""
  shifted = GT_BOXES[0] + np.array([0, 5, 0, 5], np.float32)   # 20x24 box moved 5 px right
  inter = 20 * 19
  iou = inter / (2 * 20 * 24 - inter)
  assert 0.65 < iou < 0.7
  evaluator = coco_eval.CocoEvaluator(["square", "disc"])
  _add(evaluator, np.stack([shifted, GT_BOXES[1]]), np.array([0.9, 0.8]), np.array([1, 2]),
       np.array([True, True]))
  scores = evaluator.compute()
  passed = sum(iou >= t for t in np.linspace(0.5, 0.95, 10))     # 0.50 ... 0.65: 4
  assert scores["box_AP"] == pytest.approx((passed / 10 + 1.0) / 2, abs=1e-6)
  assert scores["box_AP50"] == pytest.approx(1.0)
  assert scores["box_AP75"] == pytest.approx(0.5)                # class 1 misses at 0.75
  assert scores["mask_AP"] == pytest.approx(scores["box_AP"], abs=1e-6)   # box-shaped masks


def test_false_positive_ranked_first_halves_precision():
  evaluator = coco_eval.CocoEvaluator(["square", "disc"], with_masks=False)
  evaluator.add(GT_BOXES[:1], GT_CLASSES[:1], GT_VALID[:1],
                np.array([[40, 40, 60, 60], GT_BOXES[0]], np.float32), np.array([0.9, 0.5]),
                np.array([1, 1]), np.array([True, True]), image_size=(64, 64))
  scores = evaluator.compute()
  # Precision 1/2 at recall 1: COCO's interpolated AP over 101 recall points is 0.5.
  assert scores["box_AP50"] == pytest.approx(0.5)
  assert "mask_AP" not in scores


def test_no_detections_gives_zero():
  evaluator = coco_eval.CocoEvaluator(["square", "disc"], with_masks=False)
  evaluator.add(GT_BOXES, GT_CLASSES, GT_VALID, np.zeros((2, 4)), np.zeros(2), np.zeros(2, int),
                np.zeros(2, bool), image_size=(64, 64))
  assert evaluator.compute()["box_AP"] == 0.0


# ------------------------------------------------------------------------ across processes

SIZE, ROWS, MAX_OBJECTS, MAX_DETECTIONS = 32, 4, 3, 5   # ROWS images per global eval batch


def scene_batches():
  """Two global eval batches as the instance task's evaluator takes them: ground truth (the last
  image padding, `valid` False) and detections near it, with misses and false positives."""
  rng = np.random.default_rng(7)
  batches = []
  for _ in range(2):
    truth = {"image": np.zeros((ROWS, SIZE, SIZE, 3), np.float32),
             "boxes": np.zeros((ROWS, MAX_OBJECTS, 4), np.float32),
             "classes": np.zeros((ROWS, MAX_OBJECTS), np.int32),
             "instance_masks": np.zeros((ROWS, MAX_OBJECTS, SIZE, SIZE), np.float32),
             "valid": np.ones(ROWS, bool)}
    det = {"boxes": np.zeros((ROWS, MAX_DETECTIONS, 4), np.float32),
           "scores": rng.random((ROWS, MAX_DETECTIONS)).astype(np.float32),
           "classes": rng.integers(1, 3, (ROWS, MAX_DETECTIONS)).astype(np.int32),
           "masks": np.zeros((ROWS, MAX_DETECTIONS, SIZE, SIZE), np.float32),
           "valid": rng.random((ROWS, MAX_DETECTIONS)) < 0.8}
    for i in range(ROWS):
      objects = rng.integers(1, MAX_OBJECTS + 1)
      for j in range(objects):
        y0, x0 = rng.integers(0, SIZE - 8, 2)
        h, w = rng.integers(4, 9, 2)
        truth["boxes"][i, j] = (y0, x0, y0 + h, x0 + w)
        truth["classes"][i, j] = rng.integers(1, 3)
        truth["instance_masks"][i, j] = _box_mask(truth["boxes"][i, j], (SIZE, SIZE))
      for k in range(MAX_DETECTIONS):
        if rng.random() < 0.7:   # near an object, perhaps of the wrong class
          box = truth["boxes"][i, rng.integers(objects)] + rng.integers(-2, 3, 4)
        else:                    # a false positive anywhere
          y0, x0 = rng.integers(0, SIZE - 8, 2)
          box = (y0, x0, y0 + 6, x0 + 6)
        det["boxes"][i, k] = np.clip(box, 0, SIZE)
        det["masks"][i, k] = _box_mask(det["boxes"][i, k], (SIZE, SIZE))
    truth["valid"][-1] = False
    batches.append((truth, det))
  return batches


CATEGORY_IDS = [4, 9]   # the user's ids of classes 1 and 2


def scene_ids(batch_index):
  """The stored ids of a scene batch's rows ('' for the padding row), as eval batches carry."""
  return np.array([f"validation/{batch_index}_{i}.png" if i < ROWS - 1 else ""
                   for i in range(ROWS)])


def write_user_json(path):
  """The scenes' ground truth as a user's eval JSON (its own image and category ids, RLE)."""
  from pycocotools import mask as mask_api
  images, annotations = [], []
  for b, (truth, _) in enumerate(scene_batches()):
    for i in np.nonzero(truth["valid"])[0]:
      image_id = 500 + 10 * b + i
      images.append({"id": int(image_id), "file_name": f"{b}_{i}.png", "height": SIZE,
                     "width": SIZE})
      for j in np.nonzero(truth["classes"][i])[0]:
        rle = mask_api.encode(np.asfortranarray(truth["instance_masks"][i, j].astype(np.uint8)))
        annotations.append({
            "id": len(annotations) + 1, "image_id": int(image_id),
            "category_id": CATEGORY_IDS[truth["classes"][i, j] - 1], "iscrowd": 0,
            "area": float(mask_api.area(rle)), "bbox": mask_api.toBbox(rle).tolist(),
            "segmentation": {"size": [SIZE, SIZE], "counts": rle["counts"].decode()}})
  with open(path, "w") as f:
    json.dump({"images": images, "annotations": annotations,
               "categories": [{"id": c, "name": n} for c, n in zip(CATEGORY_IDS, ("sq", "di"))]},
              f)
  return path, {f"validation/{im['file_name']}": im["id"] for im in images}


def user_reference(path):
  from seg_jax.data import coco_json
  from seg_jax.data import transforms
  _, image_ids = write_user_json(path)
  return coco_json.EvalReference(
      json_path=str(path), category_ids=CATEGORY_IDS, image_ids=image_ids,
      sizes={k: (SIZE, SIZE) for k in image_ids}, canvas=(SIZE, SIZE),
      resize=transforms.Resize())


# Process argv[1] of 2 (one CPU device each) feeds its half of every batch's rows to the
# instance task's evaluator, as train.evaluate does; process 0 prints the scores. With a
# JSON path in argv[3], it scores against that JSON in its own ids (coco_json's path).
_TWO_PROCESS_EVAL = """
import json, sys
import jax
process_id, port, user_json = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
from seg_jax import parallel
from seg_jax.tasks import instance
from tests.test_coco_eval import ROWS, scene_batches, scene_ids, user_reference
mesh = parallel.make_mesh()
reference = user_reference(user_json) if user_json else None
evaluator = instance.InstanceEvaluator(["square", "disc"], with_masks=True, num_visuals=0,
                                       reference=reference)
mine = slice(process_id * ROWS // 2, (process_id + 1) * ROWS // 2)
for b, (truth, det) in enumerate(scene_batches()):
  local = {k: v[mine] for k, v in truth.items()}
  evaluator.add(local, parallel.host_batch_to_global(local, mesh),
                parallel.host_batch_to_global({k: v[mine] for k, v in det.items()}, mesh),
                ids=scene_ids(b)[mine])
scores = evaluator.compute()
if process_id == 0:
  print("SCORES " + json.dumps(scores))
  print("RESULTS " + json.dumps(evaluator.results))
"""


def _two_processes(tmp_path, user_json=""):
  """(scores, results) of the two-process evaluation, printed by process 0."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": repo, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  logs = [tmp_path / f"stderr_{i}.txt" for i in range(2)]
  with reserved_port() as port_socket:
    port = str(port_socket.getsockname()[1])
    processes = []
    for i, log in enumerate(logs):
      with open(log, "w") as stderr_file:  # a file: a full pipe of one must not stall both
        processes.append(subprocess.Popen(
            [sys.executable, "-c", _TWO_PROCESS_EVAL, str(i), port, str(user_json)], cwd=repo,
            env=env, stdout=subprocess.PIPE, stderr=stderr_file, text=True))
    try:
      outputs = [process.communicate(timeout=300)[0] for process in processes]
    finally:
      for process in processes:
        if process.poll() is None:
          process.kill()
  for process, log in zip(processes, logs):
    assert process.returncode == 0, log.read_text()[-3000:]
  printed = {l.split(" ", 1)[0]: json.loads(l.split(" ", 1)[1])
             for l in outputs[0].splitlines() if l.startswith(("SCORES ", "RESULTS "))}
  return printed["SCORES"], printed["RESULTS"]


def _assert_same_scores(got, want):
  assert got.keys() == want.keys()
  for key in want:
    assert got[key] == want[key] or (np.isnan(got[key]) and np.isnan(want[key])), key


def test_two_processes_score_what_one_process_scores(tmp_path):
  """Each process holds half of every eval batch; gathered, COCO sees every image once, so the
  twelve statistics equal one process's over all images, exactly."""
  one = instance.InstanceEvaluator(["square", "disc"], with_masks=True, num_visuals=0)
  first_half = instance.InstanceEvaluator(["square", "disc"], with_masks=True, num_visuals=0)
  for truth, det in scene_batches():
    one.add(truth, truth, det)
    half = slice(0, ROWS // 2)
    first_half.add({k: v[half] for k, v in truth.items()}, {k: v[half] for k, v in truth.items()},
                   {k: v[half] for k, v in det.items()})
  want = one.compute()
  assert len(want) == 12 and 0 < want["box_AP50"] < 1 and 0 < want["mask_AP"] < 1, want
  # The images of process 1 count: without them the scores differ.
  assert first_half.compute()["box_AP"] != want["box_AP"]

  got, _ = _two_processes(tmp_path)
  _assert_same_scores(got, want)


def test_two_processes_score_the_users_json_as_one_process_does(tmp_path):
  """coco_json's path: each process places its rows by their ids (gathered across processes)
  and every process then holds all detections in the user's ids; scored by pycocotools against
  the user's JSON, two processes give one process's scores and results, exactly."""
  from pycocotools import coco as coco_api
  from pycocotools import cocoeval
  user_json = tmp_path / "instances_val.json"
  reference = user_reference(user_json)
  one = instance.InstanceEvaluator(["square", "disc"], with_masks=True, num_visuals=0,
                                   reference=reference)
  for b, (truth, det) in enumerate(scene_batches()):
    one.add(truth, truth, det, ids=scene_ids(b))
  want = one.compute()
  assert 0 < want["mask_AP"] < 1, want
  assert {r["category_id"] for r in one.results} <= set(CATEGORY_IDS)
  # pycocotools itself on the results, in the user's ids, gives the same AP.
  gt = coco_api.COCO(str(user_json))
  evaluation = cocoeval.COCOeval(gt, gt.loadRes(json.loads(json.dumps(one.results))), "segm")
  evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
  assert evaluation.stats[0] == pytest.approx(want["mask_AP"], abs=1e-12)
  got, results = _two_processes(tmp_path, user_json)
  _assert_same_scores(got, want)
  key = lambda r: (r["image_id"], r["score"], r["category_id"])
  assert sorted(results, key=key) == sorted(json.loads(json.dumps(one.results)), key=key)
