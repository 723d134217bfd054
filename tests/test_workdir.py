"""A workdir stands alone: `--mode=predict` and `--mode=eval` take the config from it (no
`--config`), predict needs no training data, and a `--config` of another model is refused.

Runs main.py as a user does, on a folder dataset written by examples/make_folder_dataset.py.
Predicted labels are compared with the model applied directly (flax, on the checkpoint read
back with Orbax here), not with the code under test.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from seg_jax import models
from seg_jax import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TILE = 64
TRAIN_OVERRIDES = [
    "--config.dataset.num_classes=4", "--config.dataset.image_size=32", "--config.batch_size=2",
    "--config.dataset.shuffle_buffer=8", "--config.model.width=4", "--config.model.depth=2",
    "--config.num_train_steps=3", "--config.eval_every_steps=3",
    "--config.checkpoint_every_steps=3", "--config.log_every_steps=1",
    "--config.num_eval_visuals=0", "--config.compilation_cache_dir=",
    "--config.optimizer.warmup_steps=0"]


def _main(*args, timeout=300):
  return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(dataset root, TFDS dir, workdir, inputs dir) after 3 training steps through main.py."""
  base = tmp_path_factory.mktemp("standalone")
  root, data_dir, workdir, inputs = (base / n for n in ("cells", "tfds", "run", "inputs"))
  made = subprocess.run([sys.executable, "examples/make_folder_dataset.py", f"--out={root}",
                         "--num_images=10", "--min_size=40", "--max_size=60"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert made.returncode == 0, made.stderr[-2000:]
  inputs.mkdir()
  for name in sorted(os.listdir(root / "images"))[:3]:
    shutil.copy(root / "images" / name, inputs / name)
  trained = _main("--config=configs/unet_folder.py", f"--workdir={workdir}",
                  f"--config.dataset.root={root}", f"--config.dataset.data_dir={data_dir}",
                  *TRAIN_OVERRIDES)
  assert trained.returncode == 0, trained.stderr[-3000:]
  return root, data_dir, workdir, inputs


def _labels(out_dir):
  return {name: np.asarray(Image.open(os.path.join(out_dir, name)))
          for name in sorted(os.listdir(out_dir)) if name.endswith("_label.png")}


def _direct_labels(workdir, image_path):
  """Class ids of one image (smaller than a tile) from flax's apply on the checkpoint's
  variables, with the reflect padding predict documents for images smaller than a tile."""
  config = workdir_lib.read_config(str(workdir))
  model = models.build_model(config)
  step = max(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  state = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "default")
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  image = np.asarray(Image.open(image_path).convert("RGB"))
  h, w = image.shape[:2]
  padded = np.pad(image, ((0, TILE - h), (0, TILE - w), (0, 0)), mode="reflect")
  x = padded.astype(np.float32)[None] / 255 * 2 - 1
  logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
  return logits[0, :h, :w].argmax(-1)


def test_workdir_describes_itself(run):
  root, _, workdir, _ = run
  with open(workdir / "model.json") as f:
    info = json.load(f)
  with open(root / "classes.txt") as f:
    names = f.read().split()
  assert info["class_names"] == names and info["input_channels"] == 3
  assert info["model"] == "unet" and info["input_multiple"] == 4
  assert info["input_normalization"]["range"] == [-1.0, 1.0]
  config = workdir_lib.read_config(str(workdir))
  assert config.dataset.root == str(root) and config.model.width == 4
  assert config.dataset.eval_size == (0, 0)  # JSON lists come back as the config's tuples


def test_eval_without_config_prints_the_table_of_metrics_jsonl(run):
  root, data_dir, workdir, _ = run
  assert os.path.isdir(root)  # runs before the predict test deletes it
  result = _main(f"--workdir={workdir}", "--mode=eval")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(workdir / "metrics.jsonl") as f:
    last_eval = [r for r in map(json.loads, f) if "eval/dice" in r][-1]
  mean_line = next(l for l in result.stdout.splitlines() if l.startswith("mean"))
  dice, iou = (float(v) for v in mean_line.split()[1:3])
  assert dice == pytest.approx(last_eval["eval/dice"], abs=5e-5)
  assert iou == pytest.approx(last_eval["eval/jaccard"], abs=5e-5)


def test_predict_without_config_or_training_data_gives_the_same_labels(run, tmp_path):
  root, data_dir, workdir, inputs = run
  with_config = _main("--config=configs/unet_folder.py", f"--workdir={workdir}",
                      "--mode=predict", f"--config.dataset.root={root}",
                      f"--config.dataset.data_dir={data_dir}", *TRAIN_OVERRIDES,
                      f"--config.predict.input={inputs}", f"--config.predict.output={tmp_path}/a",
                      f"--config.predict.tile_size={TILE}")
  assert with_config.returncode == 0, with_config.stderr[-3000:]
  before = _labels(tmp_path / "a")
  assert len(before) == 3

  shutil.rmtree(root)
  shutil.rmtree(data_dir)
  alone = _main(f"--workdir={workdir}", "--mode=predict", f"--config.predict.input={inputs}",
                f"--config.predict.output={tmp_path}/b", f"--config.predict.tile_size={TILE}")
  assert alone.returncode == 0, alone.stderr[-3000:]
  after = _labels(tmp_path / "b")
  assert after.keys() == before.keys()
  for name in before:
    np.testing.assert_array_equal(after[name], before[name])
    stem = name[:-len("_label.png")]
    direct = _direct_labels(workdir, inputs / f"{stem}.png")
    np.testing.assert_array_equal(after[name], direct)


def test_a_config_of_another_model_is_one_line_error(run):
  _, _, workdir, _ = run
  result = _main("--config=configs/deeplabv3plus.py", f"--workdir={workdir}", "--mode=eval")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: config.model.name='deeplabv3plus', but {workdir} holds a 'unet'; eval and "
      "predict use the workdir's model: leave out --config and model overrides")
  result = _main(f"--workdir={workdir}", "--mode=predict", "--config.model.width=8",
                 "--config.predict.input=nothing.png")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: config.model.width=8, but the model in {workdir} was trained with 4; eval and "
      "predict use the workdir's model: leave out --config and model overrides")
  result = _main(f"--workdir={workdir}", "--mode=train")
  assert result.returncode == 2 and "--config is required for training" in result.stderr
