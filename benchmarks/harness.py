"""The parts of a training run that the benchmarks build from a config, as the Trainer does."""

from typing import Any, NamedTuple

from seg_jax import config as config_lib
from seg_jax import parallel
from seg_jax import train
from seg_jax import models


class StepParts(NamedTuple):
  mesh: Any
  model: Any
  tx: Any
  schedule: Any


def build(config) -> StepParts:
  """Validates `config`, then builds the mesh over every device, the model and the optimizer."""
  config_lib.validate(config)
  tx, schedule = train.make_optimizer(config)
  return StepParts(parallel.make_mesh(), models.build_model(config), tx, schedule)
