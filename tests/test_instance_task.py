"""The instance task end to end: padded instance batches, the detector in the shared train loop,
COCO AP through the task's evaluator, pictures, and the same training on 1 and 4 devices."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from seg_jax import config as config_lib
from seg_jax import parallel
from seg_jax import tasks
from seg_jax import train
from seg_jax.data import pipeline
from seg_jax.data import transforms
from tests.conftest import tiny_detector_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def detector_config(data_dir):
  return tiny_detector_config(data_dir)


@pytest.fixture(scope="module")
def builder(detector_config):
  return pipeline.get_builder(detector_config)


def _np_box(mask):
  ys, xs = np.nonzero(mask)
  return [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]


def test_boxes_from_masks_match_numpy():
  rng = np.random.default_rng(0)
  masks = rng.random((6, 20, 30)) < 0.02
  masks[2] = False                              # empty: a zero box
  masks[3] = False
  masks[3, 19, 29] = True                       # one pixel in the last corner
  got = transforms.boxes_from_masks(tf.constant(masks)).numpy()
  for k in range(6):
    want = _np_box(masks[k]) if masks[k].any() else [0, 0, 0, 0]
    np.testing.assert_array_equal(got[k], want)


def _check_instance_batch(batch, max_instances):
  masks, boxes, classes = batch["instance_masks"], batch["boxes"], batch["classes"]
  n, size = batch["image"].shape[:2]
  assert masks.shape == (n, max_instances, size, size) and masks.dtype == np.uint8
  assert boxes.shape == (n, max_instances, 4) and classes.shape == (n, max_instances)
  assert (classes > 0).any()
  for i in range(n):
    assert masks[i].sum(axis=0).max() <= 1      # visible parts never overlap
    for g in range(max_instances):
      if classes[i, g] == 0:
        assert masks[i, g].sum() == 0 and not boxes[i, g].any()
        continue
      assert boxes[i, g].tolist() == _np_box(masks[i, g])
      # The semantic mask is the composition of the instances.
      assert (batch["mask"][i][masks[i, g] == 1] == classes[i, g]).all()
    ignore = batch["mask"][i] == 255
    covered = masks[i].sum(axis=0) == 1
    labelled = (batch["mask"][i] > 0) & ~ignore
    np.testing.assert_array_equal(covered, labelled)


def test_train_batches_carry_tight_boxes_of_the_augmented_masks(detector_config, builder):
  # Strong scale jitter, so that crops cut objects and padding appears.
  detector_config.dataset.augment.min_scale = 0.6
  detector_config.dataset.augment.max_scale = 1.6
  stream = pipeline.train_batches(detector_config, builder)
  for _ in range(3):
    _check_instance_batch(next(stream), detector_config.dataset.max_instances)
  detector_config.dataset.augment.min_scale = 0.75
  detector_config.dataset.augment.max_scale = 1.25


def _digest(image):
  return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def test_eval_batches_hold_the_stored_objects(detector_config, builder):
  batches = list(pipeline.eval_batches(detector_config, builder, "validation"))
  valid = np.concatenate([b["valid"] for b in batches])
  assert valid.sum() == 12
  stored = {}
  for ex in tfds.as_numpy(builder.as_dataset(split="validation")):
    image = ex["image"].astype(np.float32) / 255.0 * 2.0 - 1.0
    stored[_digest(image)] = ex["objects"]
  for batch in batches:
    _check_instance_batch(batch, detector_config.dataset.max_instances)
    for i in np.nonzero(batch["valid"])[0]:
      objects = stored[_digest(batch["image"][i])]
      count = len(objects["label"])
      np.testing.assert_array_equal(batch["classes"][i, :count], objects["label"])
      assert not batch["classes"][i, count:].any()
      np.testing.assert_array_equal(batch["boxes"][i, :count], objects["box"])
      np.testing.assert_array_equal(batch["instance_masks"][i, :count], objects["mask"][..., 0])
    padded = ~batch["valid"]
    assert not batch["classes"][padded].any()


def test_more_objects_than_max_instances_is_a_data_error(detector_config, builder):
  config = tiny_detector_config(detector_config.dataset.data_dir)
  config.dataset.max_instances = 2
  with pytest.raises(pipeline.DataError, match=r"more than dataset.max_instances=2.*raise it"):
    for _ in pipeline.eval_batches(config, builder, "validation"):
      pass


def test_perfect_detections_score_ap_one_through_the_task_evaluator(detector_config, builder):
  """Ground truth fed back as detections: pycocotools must give AP 1 for boxes and masks."""
  task = tasks.get_task(detector_config)
  mesh = parallel.make_mesh()
  evaluator = task.evaluator(["background", "disc", "square", "triangle", "ring", "cross"])
  for batch in pipeline.eval_batches(detector_config, builder, "validation"):
    device_batch = parallel.host_batch_to_global(batch, mesh)
    present = batch["classes"] > 0
    outputs = parallel.host_batch_to_global({
        "boxes": batch["boxes"], "scores": present.astype(np.float32),
        "classes": batch["classes"], "valid": present, "masks": batch["instance_masks"]}, mesh)
    evaluator.add(batch, device_batch, outputs)
  scores = evaluator.compute()
  for name in ("box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75"):
    assert scores[name] == pytest.approx(1.0), name
  picture = task.picture(evaluator.visuals, ["background", "disc", "square", "triangle", "ring",
                                              "cross"])
  assert picture.shape[1] == 3 * (32 * 8 + 4) and picture.dtype == np.uint8


def test_detector_configs_validate_and_bad_ones_fail():
  from configs import faster_rcnn, mask_rcnn
  for module in (mask_rcnn, faster_rcnn):
    config = module.get_config()
    config_lib.validate(config)
    assert config_lib.task(config) == "instance"
  config = config_lib.with_dataset(mask_rcnn.get_config(), "folder")
  config.dataset.root = "/nonexistent"
  with pytest.raises(config_lib.ConfigError, match="needs instance annotations"):
    config_lib.validate(config)
  config = mask_rcnn.get_config()
  config.model.stem = "small_stride2"
  with pytest.raises(config_lib.ConfigError, match="stride 4"):
    config_lib.validate(config)
  config = mask_rcnn.get_config()
  config.model.anchor_sizes = (8, 16, 32)
  with pytest.raises(config_lib.ConfigError, match="5 positive sizes"):
    config_lib.validate(config)


# ---------------------------------------------------------------------------- the train loop

def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def detector_run(tmp_path_factory, detector_config, builder):
  """The tiny Mask R-CNN trained from the command line, as a user does; returns its workdir and
  the final evaluation's scores (from metrics.jsonl) and the run's stderr."""
  workdir = str(tmp_path_factory.mktemp("detector"))
  # XLA's convolutions, as on 4 devices below: only the sharding may differ there (detector
  # training amplifies float differences between oneDNN's and XLA's sums within a few steps).
  # Without main.py's YNN fusions, as the in-process runs below compile.
  result = subprocess.run(
      [sys.executable, "main.py", f"--config=tests/configs/tiny_detector.py:"
       f"{detector_config.dataset.data_dir}", f"--workdir={workdir}", "--config.conv_backend=xla"],
      cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
                     "SEG_JAX_PLAIN_XLA": "1"},
      capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  final = {k: np.nan if v is None else v for k, v in _records(workdir)[-1].items()}
  return workdir, final, result.stderr


def test_detector_trains_in_the_shared_loop_and_reports_coco_ap(detector_run):
  """main.py trains the detector with the shared loop: its losses fall, every loss term and COCO
  statistic is written, the console shows the COCO table, and the eval picture is drawn."""
  workdir, final, stderr = detector_run
  assert "eval at step 20" in stderr
  table = stderr[stderr.index("eval at step 20"):].splitlines()
  header = next(i for i, l in enumerate(table) if l.split() == ["AP", "AP50", "AP75", "APs", "APm", "APl"])
  assert [l.split()[0] for l in table[header + 1:header + 3]] == ["box", "mask"], table[:header + 3]
  records = _records(workdir)
  losses = [r["train/loss"] for r in records if "train/loss" in r]
  assert len(losses) == 4 and losses[-1] < 0.85 * losses[0], losses
  for term in ("rpn_objectness", "rpn_box", "box_cls", "box_reg", "mask"):
    assert any(f"train/loss_{term}" in r for r in records), term
  last = records[-1]
  assert last["step"] == 20
  for kind in ("box", "mask"):
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
      key = f"eval/{kind}_{name}"
      assert key in last and key in final, key
      # Every object of 32 px scenes is small: no medium/large AP (null in JSON, NaN returned).
      if name in ("APm", "APl"):
        assert last[key] is None, key
      else:
        assert 0.0 <= last[key] <= 1.0, key
  picture = Image.open(os.path.join(workdir, "visuals", "eval_step_000020.png"))
  assert picture.size[0] == 3 * (32 * 8 + 4) and picture.size[1] >= 4 * (32 * 8 + 4)


def _flat_checkpoint(workdir, step):
  import jax
  import orbax.checkpoint as ocp
  restored = ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(step), "default"))
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]}


def test_a_resumed_detector_ends_bit_identical_to_an_uninterrupted_one(detector_run,
                                                                       detector_config, tmp_path):
  """Stopped after step 10 and resumed to 20: the step-20 state (parameters, batch statistics,
  optimiser state) and every logged loss equal the uninterrupted run's bit for bit. The RoI
  sampling key is folded from the seed and the step, so the resumed steps sample the same RoIs
  (and the constant learning rate makes a 10-step run a prefix of the 20-step one)."""
  one_dir, _, _ = detector_run
  config = tiny_detector_config(detector_config.dataset.data_dir)
  config.conv_backend = "xla"  # as detector_run
  assert config.optimizer.schedule == "constant" and config.num_train_steps == 20
  config.num_train_steps = 10
  config.checkpoint_every_steps = config.eval_every_steps = 10
  config.num_eval_visuals = 0
  train.train_and_evaluate(config, str(tmp_path))
  config.num_train_steps = 20
  config.checkpoint_every_steps = config.eval_every_steps = 20
  train.train_and_evaluate(config, str(tmp_path))

  want, got = _flat_checkpoint(one_dir, 20), _flat_checkpoint(str(tmp_path), 20)
  assert got.keys() == want.keys() and len(want) > 50
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  losses = lambda workdir: {r["step"]: {k: v for k, v in r.items() if k.startswith("train/loss")}
                            for r in _records(workdir) if "train/loss" in r}
  assert losses(str(tmp_path)) == losses(one_dir) and len(losses(one_dir)) == 4


def test_eval_mode_of_a_detector_workdir_without_config_prints_its_coco_table(detector_run):
  """`main.py --mode=eval` with only the workdir: it rebuilds the Mask R-CNN from config.json
  and prints the COCO table, whose numbers are those the run's final evaluation returned (same
  checkpoint, same convolution backend from config.json)."""
  one_dir, final, _ = detector_run
  result = subprocess.run([sys.executable, "main.py", f"--workdir={one_dir}", "--mode=eval"],
                          cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "at step 20:" in result.stdout
  stats = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
  lines = result.stdout.splitlines()
  header = next(i for i, l in enumerate(lines) if l.split() == stats)
  for kind, line in zip(("box", "mask"), lines[header + 1:header + 3]):
    name, *values = line.split()
    assert name == kind and len(values) == len(stats), line
    for stat, printed in zip(stats, values):
      want = final[f"eval/{kind}_{stat}"]
      if np.isnan(want):   # no objects of that size
        assert printed == "nan", (kind, stat, printed)
      else:
        assert float(printed) == pytest.approx(want, abs=5e-5), (kind, stat, printed, want)


_RUN_ON_FOUR = """
import json, sys
import jax
from seg_jax import train
from tests.conftest import tiny_detector_config
data_dir, workdir, one_device_workdir = sys.argv[1:4]
assert jax.device_count() == 4, jax.devices()
config = tiny_detector_config(data_dir)
config.conv_backend = "xla"
print("RESULT " + json.dumps(train.train_and_evaluate(config, workdir)))
# The 1-device run's final checkpoint, evaluated here with the eval batch sharded over 4 devices.
print("EVAL " + json.dumps(train.evaluate(config, one_device_workdir)))
"""


def test_detector_training_matches_on_four_devices(detector_run, detector_config, tmp_path):
  """The batch sharded over 4 simulated devices: the same losses and COCO scores as on 1, and
  the 1-device checkpoint evaluated on 4 devices scores exactly what it scored on 1."""
  one_dir, one, _ = detector_run
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  result = subprocess.run(
      [sys.executable, "-c", _RUN_ON_FOUR, detector_config.dataset.data_dir, str(tmp_path), one_dir],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  printed = {l.split(" ", 1)[0]: json.loads(l.split(" ", 1)[1])
             for l in result.stdout.splitlines() if l.startswith(("RESULT ", "EVAL "))}
  four, four_eval = printed["RESULT"], printed["EVAL"]
  one_losses = [r["train/loss"] for r in _records(one_dir) if "train/loss" in r]
  four_losses = [r["train/loss"] for r in _records(str(tmp_path)) if "train/loss" in r]
  assert four_losses[0] == pytest.approx(one_losses[0], rel=1e-4)
  assert four_losses == pytest.approx(one_losses, rel=2e-2)
  for key in ("eval/box_AP50", "eval/mask_AP50"):
    assert four[key] == pytest.approx(one[key], abs=0.05), key
  # Every COCO statistic of the same checkpoint, bit for bit (NaN where COCO has no objects).
  ap_keys = [k for k in one if k.startswith(("eval/box_", "eval/mask_"))]
  assert len(ap_keys) == 12 and any(one[k] > 0 for k in ap_keys), one
  for key in ap_keys:
    assert key in four_eval, key
    if np.isnan(one[key]):
      assert np.isnan(four_eval[key]), key
    else:
      assert four_eval[key] == one[key], (key, four_eval[key], one[key])
