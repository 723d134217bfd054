"""The tests' tiny config as a config file, for runs through main.py: --config=tests/configs/tiny.py:DATA_DIR."""

from tests.conftest import tiny_config


def get_config(data_dir: str):
  return tiny_config(data_dir)
