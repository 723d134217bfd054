"""The tests' tiny Mask R-CNN as a config file, for runs through main.py:
--config=tests/configs/tiny_detector.py:DATA_DIR."""

from tests.conftest import tiny_detector_config


def get_config(data_dir: str):
  return tiny_detector_config(data_dir)
