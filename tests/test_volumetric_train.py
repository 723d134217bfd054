"""A tiny 3D U-Net on tiny synthetic volumes through the one train loop: it trains, evaluates whole
cases by sliding windows, resumes bit-identically, and agrees on 1 and 4 simulated devices."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from seg_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_volume_config(data_dir: str):
  c = config_lib.base_config(model="unet3d", dataset="shapes3d")
  c.dataset.data_dir = data_dir
  c.dataset.volume_shape = (8, 16, 16)
  c.dataset.num_train, c.dataset.num_validation = 3, 2
  c.dataset.patch_size = (8, 8, 8)
  c.dataset.eval_window_batch = 4
  c.model.width, c.model.depth, c.model.max_width = 4, 1, 8
  c.batch_size = 4
  c.num_train_steps = 4
  c.log_every_steps = 1
  c.eval_every_steps = c.checkpoint_every_steps = 4
  c.num_eval_visuals = 1
  c.optimizer.name, c.optimizer.schedule, c.optimizer.learning_rate = "adam", "constant", 1e-2
  c.conv_backend = "xla"  # as the 4-device run, so that only the sharding differs
  return c


_RUN = """
import json, sys
import jax
from seg_jax import train
from tests.test_volumetric_train import tiny_volume_config
config = tiny_volume_config(sys.argv[1])
config.compilation_cache_dir = sys.argv[3]
assert jax.device_count() == 4, jax.devices()
print("RESULT " + json.dumps(train.train_and_evaluate(config, sys.argv[2])))
"""


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _losses(workdir):
  return {r["step"]: r["train/loss"] for r in _records(workdir) if "train/loss" in r}


def _flat_checkpoint(workdir, step):
  import jax
  import orbax.checkpoint as ocp
  restored = ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(step), "default"))
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]}


@pytest.fixture(scope="module")
def volume_run(tmp_path_factory):
  from seg_jax import train
  data_dir = str(tmp_path_factory.mktemp("tfds3d"))
  cache = str(tmp_path_factory.mktemp("jax_cache"))
  workdir = str(tmp_path_factory.mktemp("volume_run"))
  config = tiny_volume_config(data_dir)
  config.compilation_cache_dir = cache
  config_lib.validate(config)
  return config, workdir, train.train_and_evaluate(config, workdir)


def test_a_tiny_3d_run_trains_and_reports_surface_metrics(volume_run):
  config, workdir, scalars = volume_run
  losses = _losses(workdir)
  assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(list(losses.values())))
  for name in ("organ", "vessel", "lesion"):
    for metric in ("dice", "dice_dataset", "hd95", "nsd"):
      assert f"eval/{metric}/{name}" in scalars
  assert 0 <= scalars["eval/dice_foreground"] <= 1
  assert os.path.isfile(os.path.join(workdir, "visuals", "eval_step_000004.png"))


def test_a_resumed_3d_run_ends_bit_identical(volume_run, tmp_path):
  """Stopped after step 2 and resumed to 4: same parameters, optimiser state and losses."""
  from seg_jax import train
  config, workdir, scalars = volume_run
  config = tiny_volume_config(volume_run[0].dataset.data_dir)
  config.compilation_cache_dir = volume_run[0].compilation_cache_dir
  config.num_train_steps = config.checkpoint_every_steps = config.eval_every_steps = 2
  train.train_and_evaluate(config, str(tmp_path))
  config.num_train_steps = config.checkpoint_every_steps = config.eval_every_steps = 4
  resumed = train.train_and_evaluate(config, str(tmp_path))
  want, got = _flat_checkpoint(workdir, 4), _flat_checkpoint(str(tmp_path), 4)
  assert got.keys() == want.keys() and len(want) > 20
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  assert _losses(str(tmp_path)) == _losses(workdir)
  np.testing.assert_equal(resumed, scalars)  # NaN (a class absent from both) equals NaN


def test_one_and_four_devices_agree(volume_run, tmp_path):
  config, workdir, scalars = volume_run
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  result = subprocess.run([sys.executable, "-c", _RUN, config.dataset.data_dir, str(tmp_path),
                           config.compilation_cache_dir], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  line = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")][-1]
  four = json.loads(line[len("RESULT "):])
  for step, loss in _losses(workdir).items():
    assert _losses(str(tmp_path))[step] == pytest.approx(loss, rel=1e-4)
  for key, value in scalars.items():
    if np.isfinite(value):
      assert four[key] == pytest.approx(value, rel=1e-3, abs=1e-3), key


def test_predict_writes_labels_on_the_input_grid_whatever_its_orientation(volume_run, tmp_path):
  """A scan and the same scan stored with its x axis reversed (data flipped, affine adjusted):
  each prediction has its input's shape and affine, and the two label arrays are the same
  physical segmentation (one is the other flipped), so the labels went back through the
  resampling and the reorientation correctly. Both get an overlay PNG."""
  import nibabel as nib
  from seg_jax import predict
  from seg_jax.data.builders import shapes3d
  config, workdir, _ = volume_run
  image, _ = shapes3d.generate_case(np.random.default_rng(11), (9, 20, 13), (2.5, 1.5, 1.5))
  data = image.transpose(2, 1, 0)  # stored as (x, y, z)
  affine = np.array([[1.5, 0, 0, -10], [0, 1.5, 0, 4], [0, 0, 2.5, 30], [0, 0, 0, 1]])
  n = data.shape[0]
  flip_x = np.array([[-1, 0, 0, n - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
  inputs = tmp_path / "scans"
  inputs.mkdir()
  nib.save(nib.Nifti1Image(data, affine), str(inputs / "scan.nii.gz"))
  nib.save(nib.Nifti1Image(np.ascontiguousarray(data[::-1]), affine @ flip_x),
           str(inputs / "flipped.nii.gz"))
  config = tiny_volume_config(config.dataset.data_dir)
  config.predict.input, config.predict.output = str(inputs), str(tmp_path / "out")
  config.predict.tta = "none"
  result = predict.run(config, workdir)
  assert len(result["predicted"]) == 2
  outputs = {}
  for case in ("scan", "flipped"):
    written = nib.load(str(tmp_path / "out" / f"{case}.nii.gz"))
    source = nib.load(str(inputs / f"{case}.nii.gz"))
    assert written.shape == source.shape
    np.testing.assert_array_equal(written.affine, source.affine)
    outputs[case] = np.asarray(written.dataobj)
    assert (tmp_path / "out" / f"{case}_overlay.png").stat().st_size > 0
  assert outputs["scan"].max() < config.dataset.num_classes
  np.testing.assert_array_equal(outputs["flipped"], outputs["scan"][::-1])
  # The same mapping on labels that vary everywhere (the tiny model may predict little): the
  # canonical (z, y, x) labels of the RAS scan are its data transposed; of the flipped, flipped.
  from seg_jax import nifti_predict
  labels = np.random.default_rng(12).integers(0, 4, size=(9, 20, 13)).astype(np.uint8)
  plain = nifti_predict.to_original_grid(labels, nib.load(str(inputs / "scan.nii.gz")))
  flipped = nifti_predict.to_original_grid(labels, nib.load(str(inputs / "flipped.nii.gz")))
  np.testing.assert_array_equal(plain, labels.transpose(2, 1, 0))
  np.testing.assert_array_equal(flipped, plain[::-1])
