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


# Process argv[1] of 2 (one CPU device each) feeds its half of every batch's rows to the
# instance task's evaluator, as train.evaluate does; process 0 prints the scores.
_TWO_PROCESS_EVAL = """
import json, sys
import jax
process_id, port = int(sys.argv[1]), sys.argv[2]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
from seg_jax import parallel
from seg_jax.tasks import instance
from tests.test_coco_eval import ROWS, scene_batches
mesh = parallel.make_mesh()
evaluator = instance.InstanceEvaluator(["square", "disc"], with_masks=True, num_visuals=0)
mine = slice(process_id * ROWS // 2, (process_id + 1) * ROWS // 2)
for truth, det in scene_batches():
  local = {k: v[mine] for k, v in truth.items()}
  evaluator.add(local, parallel.host_batch_to_global(local, mesh),
                parallel.host_batch_to_global({k: v[mine] for k, v in det.items()}, mesh))
scores = evaluator.compute()
if process_id == 0:
  print("SCORES " + json.dumps(scores))
"""


def test_two_processes_score_what_one_process_scores(tmp_path):
  """Each process holds half of every eval batch; gathered, COCO sees every image once, so the
  twelve statistics equal one process's over all images, exactly."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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

  env = {**os.environ, "PYTHONPATH": repo, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  logs = [tmp_path / f"stderr_{i}.txt" for i in range(2)]
  with reserved_port() as port_socket:
    port = str(port_socket.getsockname()[1])
    processes = []
    for i, log in enumerate(logs):
      with open(log, "w") as stderr_file:  # a file: a full pipe of one must not stall both
        processes.append(subprocess.Popen(
            [sys.executable, "-c", _TWO_PROCESS_EVAL, str(i), port], cwd=repo, env=env,
            stdout=subprocess.PIPE, stderr=stderr_file, text=True))
    try:
      outputs = [process.communicate(timeout=300)[0] for process in processes]
    finally:
      for process in processes:
        if process.poll() is None:
          process.kill()
  for process, log in zip(processes, logs):
    assert process.returncode == 0, log.read_text()[-3000:]
  printed = [l for l in outputs[0].splitlines() if l.startswith("SCORES ")]
  got = json.loads(printed[0][len("SCORES "):])
  assert got.keys() == want.keys()
  for key in want:
    assert got[key] == want[key] or (np.isnan(got[key]) and np.isnan(want[key])), key
