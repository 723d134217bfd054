"""Config errors fail at start with one line naming the key."""

import os
import subprocess
import sys

import pytest

from seg_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_main(*args, cwd=REPO):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "main.py", "--config=configs/unet.py", *args],
                        cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_default_configs_validate():
  sys.path.insert(0, REPO)
  from configs import unet
  config_lib.validate(unet.get_config())
  config_lib.validate(unet.get_config("large"))


def test_unknown_override_key_fails_before_anything_runs(tmp_path):
  result = _run_main(f"--workdir={tmp_path}/wd", "--config.model.widht=8")
  assert result.returncode != 0
  assert "widht" in result.stderr
  assert "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "wd")


def test_bad_value_fails_with_one_line_naming_the_key(tmp_path):
  result = _run_main(f"--workdir={tmp_path}/wd", "--config.model.norm=bach")
  assert result.returncode == 2
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert lines[-1] == "error: config.model.norm='bach': must be one of batch, group, none"
  assert "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "wd")


def test_unknown_key_in_a_config_file_is_caught(data_dir):
  config = config_lib.base_config()
  config.model.unlocked = True  # a typo in a config file creates a new key
  with pytest.raises(config_lib.ConfigError, match=r"config.model.unlocked=True: unknown config key"):
    config_lib.validate(config)
  config = config_lib.base_config()
  config.optimizer.learnig_rate = 1.0
  with pytest.raises(config_lib.ConfigError, match=r"did you mean optimizer.learning_rate\?"):
    config_lib.validate(config)


@pytest.mark.parametrize("key,value,message", [
    ("loss.name", "ce+lovasz", "unknown term 'lovasz'"),
    ("loss.name", "bce", "needs dataset.num_classes=2"),
    ("batch_size", 0, "must be a number > 0"),
    ("model.dropout", 1.5, "must be in \\[0, 1\\)"),
    ("dataset.image_size", 36, "divisible by 16 \\(2\\*\\*model.depth=16\\)"),
    ("dataset.ignore_label", 3, "outside \\[0, num_classes=6\\)"),
    ("optimizer.name", "lamb", "must be one of sgd, adam, adamw"),
    ("loss.class_weights", (1.0, 2.0), "must be 6 non-negative numbers"),
    ("matmul_precision", "tf32", "must be one of default, high, highest"),
])
def test_bad_values(key, value, message):
  config = config_lib.base_config()
  section, _, name = key.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(config_lib.ConfigError, match=f"config.{key}=.*{message}"):
    config_lib.validate(config)
