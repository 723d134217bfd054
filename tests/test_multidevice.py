"""The same seed and global batch give the same training and metrics on 1 and 4 devices.

Each run is a subprocess, because the simulated device count
(XLA_FLAGS=--xla_force_host_platform_device_count=N) is fixed when jax starts.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_RUN = """
import json, sys
import jax
from seg_jax import train
from tests.conftest import tiny_config
data_dir, workdir, mode = sys.argv[1:4]
config = tiny_config(data_dir)
config.num_train_steps = 10
config.log_every_steps = 1
config.checkpoint_every_steps = 10
config.eval_every_steps = 10
config.dataset.num_validation = 12
# Both sides on XLA's convolution, so that only the sharding differs (on one device 'auto'
# would pick oneDNN's; tests/test_conv_backend.py compares the two).
config.conv_backend = "xla"
assert jax.device_count() == int(sys.argv[4]), jax.devices()
run = train.train_and_evaluate if mode == "train" else train.evaluate
scalars = run(config, workdir)
print("RESULT " + json.dumps(scalars))
"""


def _run(data_dir, workdir, devices, mode="train"):
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  result = subprocess.run([sys.executable, "-c", _RUN, data_dir, workdir, mode, str(devices)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  line = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
  from seg_jax.data import pipeline
  from tests.conftest import tiny_config
  pipeline.get_builder(tiny_config(data_dir))  # prepare the dataset once, before the subprocesses
  one, four = (str(tmp_path_factory.mktemp(name)) for name in ("one_device", "four_devices"))
  return {"one": (one, _run(data_dir, one, 1)), "four": (four, _run(data_dir, four, 4))}


def test_training_matches_on_one_and_four_devices(runs):
  (one_dir, one), (four_dir, four) = runs["one"], runs["four"]
  # Batch norm statistics and the loss are over the global batch, whatever the sharding;
  # only the order of floating-point sums differs, and training amplifies that slowly.
  one_losses, four_losses = _losses(one_dir), _losses(four_dir)
  assert four_losses[0] == pytest.approx(one_losses[0], rel=1e-6)
  assert four_losses == pytest.approx(one_losses, rel=5e-3)
  for key in ("eval/dice", "eval/miou", "eval/pixel_accuracy", "eval/dice/background"):
    assert four[key] == pytest.approx(one[key], abs=5e-3), key


def test_metrics_of_one_checkpoint_are_identical_on_four_devices(runs, data_dir):
  """Evaluating the 1-device checkpoint sharded over 4 devices counts exactly the same pixels."""
  one_dir, one = runs["one"]
  four_eval = _run(data_dir, one_dir, 4, mode="eval")
  assert four_eval == one
