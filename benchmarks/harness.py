"""The parts of a training run that the benchmarks build from a config, as the Trainer does."""

import time
from typing import Any, Callable, NamedTuple

import jax

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


def compiled_train_step(config, *, channels: int = 3, images, labels
                        ) -> tuple[Callable[[], None], float, int]:
  """(run one train step in place and wait for it, compile seconds, parameter count) of the
  model `config` names on the global batch (`images`, `labels`)."""
  mesh, model, tx, schedule = build(config)
  state = train.create_train_state(config, model, tx, mesh, channels=channels)
  batch = parallel.host_batch_to_global({"image": images, "mask": labels}, mesh)
  step = jax.jit(lambda s, b: train.train_step(s, b, model=model, tx=tx, schedule=schedule,
                                               config=config), donate_argnums=0)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(metrics["loss"])

  return run, compile_s, train.count_params(state.params)
