"""The parts of a training run that the benchmarks build from a config, as the Trainer does,
and the worker protocol of the peer benchmarks (compare_*.py).

Each peer benchmark runs each framework in its own worker process, so neither shares thread
pools or OpenMP runtime with the other (PyTorch and seg_jax's oneDNN convolutions both use
libgomp), and steps the two alternately, one step each in turn while the other waits idle, so
that a machine whose speed drifts during the run (a shared VM) slows both alike.
"""

import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from benchmarks import synthetic_data
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


class SyntheticStep(NamedTuple):
  compiled: Any          # the compiled step: train (state, batch) -> (state, metrics), eval -> outputs
  state: Any
  batch: dict
  compile_s: float
  jitted: Callable       # config -> the jitted step of that config (e.g. to lower it for cost analysis)


def synthetic_step(config, which: str = "train") -> SyntheticStep:
  """The jitted train or eval step the Trainer runs, compiled for one batch of
  `benchmarks/synthetic_data.batch`, with the state and that (global) batch."""
  mesh, model, tx, schedule = build(config)
  host_batch = synthetic_data.batch(config)
  state = train.create_train_state(config, model, tx, mesh, channels=host_batch["image"].shape[-1])
  if config.model.init_from:  # as the Trainer starts a run
    state, _ = train.initialized_from(state, config.model.init_from)
  if which == "eval":
    host_batch["valid"] = np.ones((config.batch_size,), bool)
  batch = parallel.host_batch_to_global(host_batch, mesh)

  def jitted(config):
    if which == "train":
      return jax.jit(lambda s, x: train.train_step(s, x, model=model, tx=tx, schedule=schedule,
                                                   config=config), donate_argnums=0)
    return jax.jit(lambda s, x: train.eval_step(train.inference_variables(s), x, model=model,
                                                config=config))

  t0 = time.perf_counter()
  compiled = jitted(config).lower(state, batch).compile()
  return SyntheticStep(compiled, state, batch, time.perf_counter() - t0, jitted)


_PROTOCOL = "@@"  # prefixes the workers' protocol lines; anything else on stdout is ignored


def serve(run: Callable[[], dict | None], info: dict) -> None:
  """Worker side: announce `info`, then run one step per 'step' line read, reporting its
  seconds and whatever numbers `run` returns (e.g. how many RoIs the step had)."""
  print(_PROTOCOL + json.dumps(info), flush=True)
  for line in sys.stdin:
    if line.strip() != "step":
      return
    t0 = time.perf_counter()
    extra = run() or {}
    print(_PROTOCOL + json.dumps({"seconds": time.perf_counter() - t0, **extra}), flush=True)


def _reply(worker: subprocess.Popen) -> str:
  for line in worker.stdout:
    if line.startswith(_PROTOCOL):
      return line[len(_PROTOCOL):].strip()
  raise RuntimeError(f"benchmark worker {worker.args[2]} exited with {worker.wait()}")


def start_worker(script: str, name: str, extra_args: tuple[str, ...] = ()
                 ) -> tuple[subprocess.Popen, dict]:
  """Starts `script --worker=name` with this process's flags and `extra_args`; (the process,
  its info)."""
  worker = subprocess.Popen([sys.executable, os.path.abspath(script), f"--worker={name}",
                             *sys.argv[1:], *extra_args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
  return worker, json.loads(_reply(worker))


def interleaved_steps(workers: list, steps: int, warmup: int = 3) -> list[dict]:
  """Per worker, the median seconds per step and the mean of the other numbers it reports,
  stepping the workers in turn `steps` times after `warmup` rounds; then stops them."""
  reports = [[] for _ in workers]
  for i in range(warmup + steps):
    for worker, own in zip(workers, reports):
      worker.stdin.write("step\n")
      worker.stdin.flush()
      report = json.loads(_reply(worker))
      if i >= warmup:
        own.append(report)
  for worker in workers:
    worker.stdin.close()
    worker.wait()
  return [{key: float(np.median([r[key] for r in own]) if key == "seconds"
                      else np.mean([r[key] for r in own])) for key in own[0]}
          for own in reports]


def interleaved_median_seconds(workers: list, steps: int, warmup: int = 3) -> list[float]:
  """`interleaved_steps`' median seconds per step of each worker."""
  return [report["seconds"] for report in interleaved_steps(workers, steps, warmup)]
