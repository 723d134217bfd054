"""EMA of the weights, gradient accumulation, the best checkpoint and per-image results.

The numbers are checked against independent computations: one larger batch for accumulation,
the EMA recurrence and the polynomial schedule written out in numpy, and predictions of the
restored EMA weights counted per image with numpy for the per-image CSV.
"""

import csv
import functools
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from seg_jax import config as config_lib
from seg_jax import models
from seg_jax import parallel
from seg_jax import train
from seg_jax.data import pipeline
from seg_jax.ops import conv as conv_ops
from tests.conftest import tiny_config

DECAY = 0.5


def _leaves(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ---------------------------------------------------------------------------- accumulation, EMA

def _accumulation_config(data_dir, *, batch_size, accumulate_steps, num_train_steps):
  c = tiny_config(data_dir)
  c.model.depth = 1            # fewer layers to compile; the property does not depend on them
  c.model.norm = "none"        # batch statistics would differ between 2 and 8 images
  c.loss.name = "ce"           # a mean over pixels: 4 micro-batch means = one 8-image mean
  c.conv_backend = "xla"
  c.batch_size, c.num_train_steps = batch_size, num_train_steps
  c.optimizer.accumulate_steps = accumulate_steps
  # SGD: linear in the gradient (Adam's m / sqrt(v) magnifies float rounding of tiny gradients)
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1
  c.optimizer.schedule = "polynomial"
  c.optimizer.end_learning_rate_factor = 0.1
  c.optimizer.ema_decay = DECAY
  config_lib.validate(c)
  return c


def _train_steps(config, batches):
  """(states after each step, on the host; learning rates logged)."""
  model = models.build_model(config)
  tx, schedule = train.make_optimizer(config)
  state = train.create_train_state(config, model, tx, parallel.make_mesh())
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, schedule=schedule,
                                   config=config))
  states, rates = [jax.device_get(state)], []
  for batch in batches:
    state, metrics = step(state, batch)
    states.append(jax.device_get(state))
    rates.append(float(metrics["learning_rate"]))
  return states, rates


def test_accumulating_four_batches_of_two_is_one_batch_of_eight(data_dir):
  """3 updates: 12 steps of 2 images with accumulate_steps=4 give, after every 4th step, the
  parameters of 3 steps of the same 8 images at once (a U-Net without batch norm); in between
  they do not move. The learning rate follows the polynomial schedule over 3 updates, not 12
  steps, and the EMA is the recurrence over the 3 updates, in numpy."""
  rng = np.random.default_rng(0)
  big = [{"image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
          "mask": rng.integers(0, 6, (8, 32, 32)).astype(np.int32)} for _ in range(3)]
  micro = [{k: v[i:i + 2] for k, v in b.items()} for b in big for i in range(0, 8, 2)]
  reference, reference_rates = _train_steps(
      _accumulation_config(data_dir, batch_size=8, accumulate_steps=1, num_train_steps=3), big)
  config = _accumulation_config(data_dir, batch_size=2, accumulate_steps=4, num_train_steps=12)
  accumulated, rates = _train_steps(config, micro)

  for update in range(1, 4):
    got, want = _leaves(accumulated[4 * update].params), _leaves(reference[update].params)
    for key in want:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
  for step in range(1, 13):
    if step % 4:  # mid-accumulation: parameters and EMA as after the last update
      for tree in ("params", "ema_params"):
        before = _leaves(getattr(accumulated[4 * (step // 4)], tree))
        after = _leaves(getattr(accumulated[step], tree))
        assert all(np.array_equal(before[k], after[k]) for k in before), (step, tree)

  o = config.optimizer
  end = o.learning_rate * o.end_learning_rate_factor
  lr = [end + (o.learning_rate - end) * (1 - count / 3) ** o.power for count in range(3)]
  assert rates == pytest.approx([lr[0]] * 4 + [lr[1]] * 4 + [lr[2]] * 4, rel=1e-6)
  assert reference_rates == pytest.approx(lr, rel=1e-6)

  ema = _leaves(accumulated[0].params)
  for update in range(1, 4):
    params = _leaves(accumulated[4 * update].params)
    ema = {k: DECAY * ema[k] + (1 - DECAY) * params[k] for k in ema}
  final = accumulated[-1]
  got = _leaves(final.ema_params)
  for key in ema:
    np.testing.assert_allclose(got[key], ema[key], rtol=1e-6, atol=1e-7, err_msg=key)
  assert train.inference_variables(final)["params"] is final.ema_params
  assert train.model_variables(final)["params"] is final.params


# ---------------------------------------------------------------------------- whole runs

def _run_config(data_dir):
  """Batch-norm U-Net, accumulate 2, EMA, best checkpoint by eval/dice; evaluations at 4, 8 and
  12; checkpoints at 3 (mid-accumulation), 6, 9 and 12."""
  c = tiny_config(data_dir)
  c.conv_backend = "xla"
  c.num_train_steps = 12
  c.log_every_steps = 2
  c.eval_every_steps = 4
  c.checkpoint_every_steps = 3
  c.keep_checkpoints = 4
  c.optimizer.accumulate_steps = 2
  c.optimizer.ema_decay = DECAY
  c.checkpoint.best_metric = "eval/dice"
  config_lib.validate(c)
  return c


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _evals(workdir):
  return {r["step"]: r for r in _records(workdir) if "eval/dice" in r}


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
  """The same run uninterrupted, and resumed in a workdir that holds only its step-3 checkpoint
  (mid-accumulation: one of two gradients accumulated), as a run killed after step 3 would."""
  config = _run_config(data_dir)
  whole = str(tmp_path_factory.mktemp("whole"))
  train.train_and_evaluate(config, whole)
  resumed = str(tmp_path_factory.mktemp("resumed"))
  shutil.copytree(os.path.join(whole, "checkpoints", "3"),
                  os.path.join(resumed, "checkpoints", "3"))
  train.train_and_evaluate(config, resumed)
  return config, whole, resumed


def test_resume_mid_accumulation_is_bit_identical_and_keeps_the_best(runs):
  _, whole, resumed = runs
  states = [ocp.CheckpointManager(os.path.join(w, "checkpoints")).restore(12)
            for w in (whole, resumed)]
  a, b = _leaves(states[0]), _leaves(states[1])
  assert a.keys() == b.keys()
  assert any("acc_grads" in k for k in a) and any("ema_params" in k for k in a)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert _evals(whole)[12]["eval/dice"] == _evals(resumed)[12]["eval/dice"]
  # The best evaluation's checkpoint is kept besides the newest ones, the same after a resume.
  dice = {step: r["eval/dice"] for step, r in _evals(whole).items()}
  assert sorted(dice) == [4, 8, 12]
  for workdir in (whole, resumed):
    (best,) = map(int, os.listdir(os.path.join(workdir, train.BEST_CHECKPOINT_DIR)))
    assert dice[best] == max(dice.values())
  assert sorted(os.listdir(os.path.join(whole, "checkpoints"))) == ["12", "3", "6", "9"]
  mini_step = [v for k, v in _leaves(ocp.CheckpointManager(
      os.path.join(whole, "checkpoints")).restore(3)).items() if "mini_step" in k]
  assert [int(v) for v in mini_step] == [1]  # step 3 is mid-accumulation


def test_first_evaluation_reports_raw_and_ema_weights(runs):
  _, whole, _ = runs
  raw = {step: r for step, r in _evals(whole).items() if "eval_raw/dice" in r}
  assert list(raw) == [4]
  assert 0 <= raw[4]["eval_raw/dice"] <= 1 and raw[4]["eval_raw/dice"] != raw[4]["eval/dice"]


def test_checkpoint_use_picks_best_latest_or_a_step(runs):
  config, whole, _ = runs
  dice = {step: r["eval/dice"] for step, r in _evals(whole).items()}
  best_step = max(dice, key=dice.get)
  for use, step in (("best", best_step), ("latest", 12), ("9", 9)):
    c = config.copy_and_resolve_references()
    c.checkpoint.use = use
    trainer = train.Trainer(c, whole, with_data=False)
    try:
      assert trainer.checkpoint_to_use()[1] == step
    finally:
      trainer.close()
  c.checkpoint.use = "7"
  trainer = train.Trainer(c, whole, with_data=False)
  try:
    with pytest.raises(FileNotFoundError, match=r"checkpoint.use=7: no checkpoint at that step"):
      trainer.checkpoint_to_use()
  finally:
    trainer.close()
  # --mode=eval on the best checkpoint reproduces that evaluation (of the EMA weights).
  c.checkpoint.use = "best"
  scalars = train.evaluate(c, whole)
  assert scalars["eval/dice"] == pytest.approx(dice[best_step], abs=1e-6)


def test_per_image_csv_counts_the_ema_predictions_exactly(runs):
  """The step-12 CSV against the restored EMA weights' predictions, counted here with numpy:
  each image's counts, their sums (the confusion matrix's diagonal, row and column sums), and
  eval/dice from that matrix. The raw weights predict differently, so the CSV is the EMA's."""
  config, whole, _ = runs
  k = config.dataset.num_classes
  state = ocp.CheckpointManager(os.path.join(whole, "checkpoints")).restore(12)
  model = models.build_model(config)
  with conv_ops.backend("xla"):
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))
    batches = list(pipeline.eval_batches(config, pipeline.get_builder(config), "validation",
                                         with_ids=True))
    predict = lambda params: [np.argmax(np.asarray(logits(
        {"params": params, "batch_stats": state["batch_stats"]}, b["image"])), -1)
        for b in batches]
    ema, raw = predict(state["ema_params"]), predict(state["params"])
  assert any((e != r).any() for e, r in zip(ema, raw))

  want, confusion = {}, np.zeros((k, k), np.int64)
  for batch, prediction in zip(batches, ema):
    for i in np.nonzero(batch["valid"])[0]:
      truth, pred = batch["mask"][i], prediction[i]
      counted = truth != config.dataset.ignore_label
      want[batch["id"][i]] = {
          "intersection": np.bincount(truth[counted & (truth == pred)], minlength=k),
          "truth": np.bincount(truth[counted], minlength=k),
          "predicted": np.bincount(pred[counted], minlength=k)}
      confusion += np.bincount(truth[counted] * k + pred[counted], minlength=k * k).reshape(k, k)

  with open(os.path.join(whole, "eval", "per_image_step_12.csv")) as f:
    rows = list(csv.DictReader(f))
  names = [key.split("/", 1)[1] for key in rows[0] if key.startswith("truth/")]
  assert len(names) == k and len(rows) == len(want) == config.dataset.num_validation
  got = {r["image_id"]: {kind: np.array([int(r[f"{kind}/{n}"]) for n in names])
                         for kind in ("intersection", "truth", "predicted")} for r in rows}
  assert got.keys() == want.keys()
  for image_id, counts in want.items():
    for kind, values in counts.items():
      np.testing.assert_array_equal(got[image_id][kind], values, err_msg=f"{image_id} {kind}")
  total = {kind: sum(c[kind] for c in got.values()) for kind in ("intersection", "truth",
                                                                 "predicted")}
  np.testing.assert_array_equal(total["intersection"], np.diag(confusion))
  np.testing.assert_array_equal(total["truth"], confusion.sum(1))
  np.testing.assert_array_equal(total["predicted"], confusion.sum(0))
  present = confusion.sum(0) + confusion.sum(1) > 0
  dice = 2 * np.diag(confusion)[present] / (confusion.sum(0) + confusion.sum(1))[present]
  assert _evals(whole)[12]["eval/dice"] == pytest.approx(dice.mean(), rel=1e-9)
  for r in rows:  # the per-image Dice columns follow from the counts
    c = got[r["image_id"]]
    for n, i, t, p in zip(names, c["intersection"], c["truth"], c["predicted"]):
      assert (r[f"dice/{n}"] == "") == (t + p == 0)
      if t + p:
        assert float(r[f"dice/{n}"]) == pytest.approx(2 * i / (t + p), rel=1e-12)
