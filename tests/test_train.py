"""End to end on a tiny config: loss falls, outputs are written, resume continues, NaN stops cleanly."""

import glob
import gzip
import io
import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image
from tensorboard.util import tensor_util

from seg_jax import train
from seg_jax.data import pipeline
from tests.conftest import tiny_config

REQUIRED_SCALARS = ("eval/dice", "eval/jaccard", "eval/miou", "eval/pixel_accuracy")


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data_dir):
  """30 uninterrupted steps, checkpoints every 10."""
  workdir = str(tmp_path_factory.mktemp("full"))
  final = train.train_and_evaluate(tiny_config(data_dir), workdir)
  return workdir, final


def test_loss_falls_and_outputs_are_written(full_run):
  workdir, final = full_run
  records = _records(workdir)
  losses = [r["train/loss"] for r in records if "train/loss" in r]
  assert len(losses) == 6  # logged every 5 of 30 steps
  assert np.mean(losses[-2:]) < 0.85 * losses[0], losses
  last = records[-1]
  assert last["step"] == 30
  for key in REQUIRED_SCALARS:
    assert 0.0 <= last[key] <= 1.0
    assert last[key] == pytest.approx(final[key])
  assert final["eval/miou"] == final["eval/jaccard"]
  # CLU's progress report: steps/s at every log step after the first (its first call only
  # starts the clock), positive.
  speeds = [r["steps_per_sec"] for r in records if "steps_per_sec" in r]
  assert len(speeds) == 6 and min(speeds) > 0, speeds
  # One PNG panel per eval: 4 examples x (image | truth | prediction), scaled 8x from 32 px.
  panel = Image.open(os.path.join(workdir, "visuals", "eval_step_000030.png"))
  assert panel.mode == "RGB" and panel.size[0] == 3 * 34 * 8
  assert panel.size[1] > 4 * 34 * 8  # the rows, then a legend of the classes shown
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  steps = ocp.CheckpointManager(os.path.join(workdir, "checkpoints")).all_steps()
  assert sorted(steps) == [10, 20, 30]


def test_tensorboard_events_hold_the_metrics_jsonl_scalars_and_the_eval_panel(full_run):
  """Read back with TensorBoard's own reader: every scalar of every metrics.jsonl record is an
  event at the same step with the same value (float32), no tag or step more; the eval panel
  image is the PNG in visuals/."""
  from tensorboard.backend.event_processing import event_accumulator
  workdir, _ = full_run
  events = event_accumulator.EventAccumulator(workdir, size_guidance={event_accumulator.TENSORS: 0})
  events.Reload()
  panel_tag = "eval/image_truth_prediction"
  from_events = {}
  for tag in events.Tags()["tensors"]:
    if tag != panel_tag:
      from_events[tag] = {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
                          for e in events.Tensors(tag)}
  from_jsonl = {}
  for record in _records(workdir):
    for key, value in record.items():
      if key != "step":
        from_jsonl.setdefault(key, {})[record["step"]] = value
  assert set(from_events) == set(from_jsonl)
  assert {"train/loss", "train/learning_rate", "eval/dice", "eval/dice/disc", "num_params"} \
      <= set(from_events)
  for tag, by_step in from_jsonl.items():
    assert sorted(from_events[tag]) == sorted(by_step), tag
    for step, value in by_step.items():
      assert from_events[tag][step] == pytest.approx(value, rel=1e-6), (tag, step)
  assert from_events["train/loss"].keys() == {5, 10, 15, 20, 25, 30}

  images = events.Tensors(panel_tag)
  assert [e.step for e in images] == [30]
  width, height, png = tensor_util.make_ndarray(images[0].tensor_proto)
  panel = np.asarray(Image.open(io.BytesIO(png)))
  on_disk = np.asarray(Image.open(os.path.join(workdir, "visuals", "eval_step_000030.png")))
  assert (int(width), int(height)) == (on_disk.shape[1], on_disk.shape[0])
  np.testing.assert_array_equal(panel, on_disk)


def test_only_the_newest_keep_checkpoints_remain(data_dir, tmp_path):
  config = tiny_config(data_dir)
  config.num_train_steps = 10
  config.eval_every_steps = 10
  config.checkpoint_every_steps = 3
  config.keep_checkpoints = 2
  train.train_and_evaluate(config, str(tmp_path))
  saved = [s for s in range(1, 11) if s % 3 == 0 or s == 10]  # 3, 6, 9 and the last step
  assert sorted(os.listdir(tmp_path / "checkpoints")) == sorted(str(s) for s in saved[-2:])
  manager = ocp.CheckpointManager(os.path.join(tmp_path, "checkpoints"))
  for step in saved[-2:]:
    assert int(manager.restore(step)["step"]) == step


def test_resume_after_stop_continues_from_the_saved_step(full_run, data_dir, tmp_path):
  full_workdir, full_final = full_run
  config = tiny_config(data_dir)
  config.num_train_steps = 20  # the run "stops" after its step-20 checkpoint
  train.train_and_evaluate(config, str(tmp_path))
  first_steps = [r["step"] for r in _records(tmp_path) if "train/loss" in r]
  resumed_final = train.train_and_evaluate(tiny_config(data_dir), str(tmp_path))
  later_steps = [r["step"] for r in _records(tmp_path) if "train/loss" in r][len(first_steps):]
  assert later_steps == [25, 30]  # nothing before step 20 was trained again
  # Data order and dropout are functions of (seed, step): resuming changes nothing.
  full_losses = {r["step"]: r["train/loss"] for r in _records(full_workdir) if "train/loss" in r}
  resumed_losses = {r["step"]: r["train/loss"] for r in _records(tmp_path) if "train/loss" in r}
  for step in (25, 30):
    assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-5)
  for key in REQUIRED_SCALARS:
    assert resumed_final[key] == pytest.approx(full_final[key], abs=1e-6)


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(data_dir, tmp_path,
                                                                          monkeypatch):
  config = tiny_config(data_dir)
  config.num_train_steps = 12
  config.checkpoint_every_steps = 5
  config.log_every_steps = 1
  real_batches = pipeline.train_batches

  def corrupted(*args, **kwargs):  # step 8 gets an image full of NaNs
    for step, batch in enumerate(real_batches(*args, **kwargs), start=1):
      if step == 8:
        batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
      yield batch

  monkeypatch.setattr(pipeline, "train_batches", corrupted)
  with pytest.raises(train.NonFiniteError, match=r"non-finite loss \(nan\) at step 8;.*step 5"):
    train.train_and_evaluate(config, str(tmp_path))
  manager = ocp.CheckpointManager(os.path.join(tmp_path, "checkpoints"))
  assert manager.all_steps() == [5]
  restored = manager.restore(5)
  leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(restored)]
  assert all(np.isfinite(x).all() for x in leaves if x.dtype.kind == "f")


def test_profile_steps_writes_a_trace_of_the_train_steps(full_run, data_dir, tmp_path):
  """config.profile_steps: a TensorBoard profile (CLU's Profile) holding the jitted train step."""
  assert not os.path.exists(os.path.join(full_run[0], "plugins"))  # off by default
  config = tiny_config(data_dir)
  config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = 8
  config.num_eval_visuals = 0
  config.profile_steps = 3
  train.train_and_evaluate(config, str(tmp_path))
  traces = glob.glob(str(tmp_path / "plugins" / "profile" / "*" / "*.trace.json.gz"))
  assert len(traces) == 1, traces
  with gzip.open(traces[0]) as f:
    names = [event.get("name", "") for event in json.load(f)["traceEvents"]]
  assert sum("jit(train_step)" in name for name in names) >= config.profile_steps
