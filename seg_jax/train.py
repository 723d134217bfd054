"""Training and evaluation: `train_and_evaluate(config, workdir)` and `evaluate(config, workdir)`.

Reads top to bottom: optimiser, state, train step, eval step, the loop.
Device code (the steps) is pure and jitted over the mesh; everything else
(data, checkpoints, writers, pictures) is host code around it.
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from clu import periodic_actions

from seg_jax import config as config_lib
from seg_jax import init_from
from seg_jax import models
from seg_jax import parallel
from seg_jax import preemption
from seg_jax import tasks
from seg_jax import visualize
from seg_jax import workdir as workdir_lib
from seg_jax import writers
from seg_jax.data import pipeline
from seg_jax.ops import conv as conv_ops
from seg_jax.ops import onednn


class NonFiniteError(RuntimeError):
  """Training produced a NaN/Inf; the message names the step and the quantity."""


WorkdirError = workdir_lib.WorkdirError


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


# ---------------------------------------------------------------------------- optimiser

def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  o = config.optimizer
  peak, warmup = o.learning_rate, o.warmup_steps
  end = peak * o.end_learning_rate_factor
  decay_steps = max(config.num_train_steps - warmup, 1)
  if o.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, config.num_train_steps, end)
  if o.schedule == "polynomial":
    after = optax.polynomial_schedule(peak, end, o.power, decay_steps)
  elif o.schedule == "constant":
    after = optax.constant_schedule(peak)
  else:
    raise ValueError(f"unknown schedule {o.schedule!r}")
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def _decay_mask(params):
  """Weight decay on conv/dense kernels only, not on biases or norm scales."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
  o = config.optimizer
  schedule = make_schedule(config)
  if o.name == "adamw":
    core = optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=_decay_mask)
  else:
    if o.name == "sgd":
      base = optax.sgd(schedule, momentum=o.momentum or None, nesterov=o.nesterov)
    elif o.name == "adam":
      base = optax.adam(schedule, b1=o.b1, b2=o.b2)
    else:
      raise ValueError(f"unknown optimizer {o.name!r}")
    # Classic L2: the decay is added to the gradient before the optimiser sees it.
    core = optax.chain(optax.add_decayed_weights(o.weight_decay, mask=_decay_mask), base)
  if o.grad_clip_norm:
    core = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), core)
  if config.on_nonfinite == "skip":
    # Non-finite gradients -> zero update, inner state (moments, schedule count) kept.
    # The limit on consecutive skips is enforced on the host, with a message.
    core = optax.apply_if_finite(core, max_consecutive_errors=np.iinfo(np.int32).max)
  return core, schedule


def schedule_count(opt_state) -> jax.Array:
  """The step count the optimiser's learning-rate schedule is at (its ScaleByScheduleState).

  It is what the optimiser will use for its next update. Under on_nonfinite="skip" it stays
  behind TrainState.step by the number of skipped steps, as a skipped step does not advance it.
  """
  is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
  counts = [s.count for s in jax.tree.leaves(opt_state, is_leaf=is_schedule) if is_schedule(s)]
  if len(counts) != 1:
    raise ValueError(f"expected one learning-rate schedule state in the optimiser state, found "
                     f"{len(counts)}")
  return counts[0]


# ---------------------------------------------------------------------------- state

def create_train_state(config, model: nn.Module, tx: optax.GradientTransformation,
                       mesh, *, channels: int = 3) -> TrainState:
  """Initialises parameters on device, replicated over the mesh.

  `channels`: input channels of the dataset's images (the model infers its
  input channels from the dummy input).
  """
  if config_lib.task(config) == "volumetric":
    shape = (1, *config.dataset.patch_size, channels)
  else:
    shape = (1, config.dataset.image_size, config.dataset.image_size, channels)

  def init(key):
    variables = model.init(key, jnp.zeros(shape, jnp.float32), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))

  return jax.jit(init, out_shardings=parallel.replicated(mesh))(models.init_key(config.seed))


def count_params(params) -> int:
  """Number of trainable parameters (batch-norm statistics not included)."""
  return int(sum(x.size for x in jax.tree.leaves(params)))


def model_variables(state: TrainState) -> dict:
  """The variables `model.apply` takes: params, and batch-norm statistics if any."""
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  return variables


# ---------------------------------------------------------------------------- steps

def train_step(state: TrainState, batch: dict, *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               config: ml_collections.ConfigDict) -> tuple[TrainState, dict]:
  """One optimiser step on a global batch; returns the new state and scalar metrics.

  The task (`seg_jax/tasks`) defines the loss; the step is the same for all. Its matmuls and
  convolutions run at `config.matmul_precision`, its convolutions on `config.conv_backend`.
  """
  with jax.default_matmul_precision(config.matmul_precision), conv_ops.backend(config.conv_backend):
    return _train_step(state, batch, model=model, tx=tx, schedule=schedule, config=config)


def _train_step(state, batch, *, model, tx, schedule, config):
  # Dropout (semantic) or RoI sampling (instance) randomness of this step.
  step_key = jax.random.fold_in(jax.random.key(config.seed), state.step + 1)
  task = tasks.get_task(config)

  def loss_fn(params):
    total, parts, batch_stats = task.loss(model, {**model_variables(state), "params": params},
                                          batch, rng=step_key)
    return total, (parts, batch_stats)

  (loss, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  step_metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
                  "param_norm": optax.global_norm(params),
                  "learning_rate": schedule(schedule_count(state.opt_state))}
  if isinstance(opt_state, optax.ApplyIfFiniteState):  # on_nonfinite="skip"
    # A skipped step must not leave batch statistics of a non-finite forward pass either.
    batch_stats = jax.tree.map(lambda new, old: jnp.where(opt_state.last_finite, new, old),
                               batch_stats, state.batch_stats)
    step_metrics["skipped"] = 1 - opt_state.last_finite.astype(jnp.int32)
    step_metrics["consecutive_skips"] = opt_state.notfinite_count
    step_metrics["total_skips"] = opt_state.total_notfinite
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
  step_metrics.update(parts)
  return new_state, step_metrics


def eval_step(state: TrainState, batch: dict, *, model: nn.Module,
              config: ml_collections.ConfigDict):
  """The task's eval outputs of one global batch (a confusion matrix and class ids, or
  detections), at `config.matmul_precision` and on `config.conv_backend`; padding examples
  (valid=False) never count."""
  with jax.default_matmul_precision(config.matmul_precision), conv_ops.backend(config.conv_backend):
    return tasks.get_task(config).eval_outputs(model, model_variables(state), batch)


# ---------------------------------------------------------------------------- host helpers

class Trainer:
  """Everything a run needs, built once from the config: model, mesh, jitted steps, data, checkpoints.

  `with_data=False` (prediction) prepares no dataset: the class names and input channels come
  from the workdir (`seg_jax/workdir.py`), and `builder` is None.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, with_data: bool = True):
    if with_data:
      pipeline.configure(config)  # before the model: a Decathlon folder decides num_classes
    self.config = config
    self.workdir = workdir
    self.mesh = parallel.make_mesh()
    try:  # the steps resolve it again when traced; this fails at start and says which it is
      self.conv_backend = conv_ops.resolve(config.conv_backend)
    except onednn.OneDNNUnavailable as e:
      raise config_lib.ConfigError(str(e)) from e
    logging.info("Convolutions: %s (conv_backend=%s)", "oneDNN " + onednn.version()
                 if self.conv_backend == "onednn" else "XLA", config.conv_backend)
    self.model = models.build_model(config)
    self.task = tasks.get_task(config)
    self.tx, self.schedule = make_optimizer(config)
    if with_data:
      self.builder, self.class_names = pipeline.prepare_dataset(config)
      self.channels = pipeline.image_channels(config, self.builder)
      pipeline.check_eval_split(config, self.builder)  # fail now, not at the first eval
    else:
      info = workdir_lib.read_model_info(workdir)
      self.builder, self.class_names = None, info["class_names"]
      self.channels = info["input_channels"]
    replicated = parallel.replicated(self.mesh)
    data = parallel.batch_sharding(self.mesh)
    self.train_step = jax.jit(
        functools.partial(train_step, model=self.model, tx=self.tx, schedule=self.schedule,
                          config=config),
        in_shardings=(replicated, data), out_shardings=(replicated, replicated),
        donate_argnums=0)
    self.eval_step = jax.jit(
        functools.partial(eval_step, model=self.model, config=config),
        in_shardings=(replicated, data), out_shardings=self.task.eval_out_shardings(self.mesh))
    self.checkpoints = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True))

  def initial_state(self) -> TrainState:
    """The newest readable checkpoint's state if there is one, else fresh parameters.

    Orbax commits a checkpoint by renaming its temporary directory, so a save
    killed midway is never listed. A listed checkpoint that still fails to
    load (a damaged disk, files deleted by hand) is skipped for the one
    before it, with a warning; if none loads, nothing is overwritten and the
    error says why.
    """
    create = lambda: create_train_state(self.config, self.model, self.tx, self.mesh,
                                        channels=self.channels)
    steps = sorted(self.checkpoints.all_steps(), reverse=True)
    if not steps:
      state = create()
      if self.config.model.init_from:
        state = self._init_from(state, self.config.model.init_from)
      return state
    replicated = parallel.replicated(self.mesh)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                            jax.eval_shape(create))
    failures = []
    for step in steps:
      try:
        state = self.checkpoints.restore(step, args=ocp.args.StandardRestore(abstract))
      except Exception as e:  # orbax/tensorstore raise many types for unreadable data
        message = " ".join(str(e).split())[:300]
        logging.warning("Checkpoint at step %d in %s cannot be restored (%s: %s); trying an "
                        "older one.", step, self.checkpoints.directory, type(e).__name__, message)
        failures.append(f"step {step}: {type(e).__name__}: {message}")
        continue
      logging.info("Resuming from checkpoint at step %d in %s", step, self.checkpoints.directory)
      return state
    raise WorkdirError(f"no checkpoint in {self.checkpoints.directory} can be restored for this "
                       f"config (a different model or optimiser?); newest error: {failures[0]}")

  def _init_from(self, state: TrainState, path: str) -> TrainState:
    """`state` with the parameters and batch statistics `path` has for this model; logs the
    report and, on process 0, writes it to WORKDIR/init_from.txt."""
    variables, report = init_from.initialize(
        {"params": state.params, "batch_stats": state.batch_stats}, path)
    summary = report.summary()
    logging.info("%s", summary)
    if jax.process_index() == 0:
      with open(os.path.join(self.workdir, "init_from.txt"), "w") as f:
        f.write(report.summary(max_listed=10**9) + "\n")
    return state.replace(params=variables["params"], batch_stats=variables["batch_stats"])

  def latest_checkpoint_state(self) -> TrainState:
    """The newest checkpoint's state, for eval and predict; FileNotFoundError if there is none."""
    if self.checkpoints.latest_step() is None:
      raise FileNotFoundError(f"no checkpoint in {self.checkpoints.directory}; train first")
    return self.initial_state()

  def evaluate(self, state: TrainState, split: str) -> tuple[dict, dict]:
    """Dataset-level scores over every example of `split`, and arrays for the visuals (volumes:
    over every case, segmented whole by sliding windows)."""
    if config_lib.task(self.config) == "volumetric":
      return self.task.evaluate_cases(self.model, model_variables(state), self.mesh,
                                      self.builder.splits[split], self.class_names)
    evaluator = self.task.evaluator(self.class_names)
    for batch in pipeline.eval_batches(self.config, self.builder, split):
      device_batch = parallel.host_batch_to_global(batch, self.mesh)
      evaluator.add(batch, device_batch, self.eval_step(state, device_batch))
    return evaluator.compute(), evaluator.visuals


def _write_visuals(trainer: Trainer, writer, visuals: dict, step: int) -> None:
  if visuals is None or jax.process_index() != 0:
    return
  grid = trainer.task.picture(visuals, trainer.class_names)
  out_dir = os.path.join(trainer.workdir, "visuals")
  os.makedirs(out_dir, exist_ok=True)
  visualize.write_png(os.path.join(out_dir, f"eval_step_{step:06d}.png"), grid)
  writer.write_images(step, {"eval/image_truth_prediction": grid[None]})


FINITE_CHECKED = ("loss", "grad_norm", "param_norm")  # in the order a NaN spreads


def _check_finite(history: list[tuple[int, dict]], trainer: Trainer) -> None:
  """Raises NonFiniteError naming the first step and quantity that went non-finite.

  With on_nonfinite="skip", non-finite loss and gradients were skipped on
  device; only too many consecutive skips, or non-finite parameters, stop.
  """
  config = trainer.config
  last = trainer.checkpoints.latest_step()
  where = (f"last good checkpoint: step {last} in {trainer.checkpoints.directory}"
           if last is not None else "no checkpoint was written")
  for step, values in history:
    if "consecutive_skips" in values:
      if values["consecutive_skips"] > config.max_consecutive_skips:
        raise NonFiniteError(
            f"{int(values['consecutive_skips'])} consecutive steps with non-finite loss or "
            f"gradients up to step {step} (max_consecutive_skips={config.max_consecutive_skips}); "
            f"training stopped without saving; {where}")
      if values["skipped"]:
        logging.warning("step %d: non-finite loss (%s) or gradients; update skipped (%d skipped "
                        "so far)", step, values["loss"], values["total_skips"])
        continue
    for name in FINITE_CHECKED:
      if not math.isfinite(values[name]):
        raise NonFiniteError(f"non-finite {name} ({values[name]}) at step {step}; training "
                             f"stopped without saving; {where}")


# ---------------------------------------------------------------------------- the loop

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (resuming from WORKDIR/checkpoints if present) and evaluates; returns final eval scalars.

  On SIGTERM/SIGINT it finishes the current step, saves a checkpoint and
  returns early (the scalars then hold {"preempted_at_step": step}); running
  the same command again resumes there.

  Besides the train and eval scalars, metrics.jsonl gets `num_params` once per call (at the
  start step, so it also marks where a resumed process begins) and `wall_seconds` (time since
  this call began) with every log and eval record: summed over calls, the run's wall time.
  """
  started = time.perf_counter()
  _prepare_workdir(workdir)
  trainer = Trainer(config, workdir)
  if jax.process_index() == 0:
    workdir_lib.write(workdir, config, class_names=trainer.class_names, channels=trainer.channels,
                      preprocessing=getattr(trainer.builder, "preprocessing", None))
  state = trainer.initial_state()
  start_step = int(jax.device_get(state.step))
  if jax.process_index() == 0:
    writers.drop_records_after(os.path.join(workdir, "metrics.jsonl"), start_step)
  writer = writers.create_writer(workdir)
  total_steps = config.num_train_steps
  writer.write_scalars(start_step, {"num_params": count_params(state.params)})
  final_scalars: dict[str, float] = {}
  if start_step >= total_steps:
    logging.info("Already trained to step %d (num_train_steps=%d); evaluating only.",
                 start_step, total_steps)
  check_every = config.check_finite_every_steps or config.log_every_steps
  # steps/s and the ETA at every log step (CLU writes `steps_per_sec` and `uptime` and logs
  # "Setting work unit notes: ... ETA"). It is given a clock that stops during evaluations, so
  # their time counts in neither.
  progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                             every_steps=config.log_every_steps, every_secs=None)
  eval_seconds = 0.0
  profile = None
  if config.profile_steps and jax.process_index() == 0:
    # A trace of profile_steps steps from the second one of this call (the first compiles),
    # for TensorBoard's profile tab (WORKDIR/plugins/profile).
    profile = periodic_actions.Profile(logdir=workdir, num_profile_steps=config.profile_steps,
                                       profile_duration_ms=None, first_profile=start_step + 2,
                                       every_secs=None)

  with preemption.PreemptionWatcher(every_steps=config.log_every_steps) as watcher:
    try:
      train_iter = pipeline.train_batches(config, trainer.builder, start_step=start_step)
      pending: list[tuple[int, dict]] = []   # device metrics not yet fetched and checked
      history: list[tuple[int, dict]] = []   # checked host metrics since the last log
      compiled = None
      for step in range(start_step + 1, total_steps + 1):
        batch = parallel.host_batch_to_global(next(train_iter), trainer.mesh)
        if compiled is None:
          t0 = time.perf_counter()
          compiled = trainer.train_step.lower(state, batch).compile()
          compile_s = time.perf_counter() - t0
          logging.info("Compiled the train step in %.1f s", compile_s)
          writer.write_scalars(step, {"compile_seconds": compile_s})
        state, step_metrics = compiled(state, batch)
        if profile is not None:
          profile(step)
        pending.append((step, step_metrics))

        is_last = step == total_steps
        is_log = step % config.log_every_steps == 0 or is_last
        is_save = step % config.checkpoint_every_steps == 0 or is_last
        stop = watcher.should_stop(step)
        if is_log or is_save or stop or step % check_every == 0:
          # Nothing is saved or logged before the steps since the last check are known finite.
          fetched = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in pending]
          _check_finite(fetched, trainer)
          history += fetched
          pending = []
        # At log steps the metrics were just fetched, so the device has finished the step.
        progress(step, t=time.monotonic() - eval_seconds)

        if is_log:
          means = {f"train/{k}": float(np.mean([m[k] for _, m in history]))
                   for k in history[0][1] if k not in ("skipped", "consecutive_skips", "total_skips")}
          means["train/learning_rate"] = history[-1][1]["learning_rate"]
          if "total_skips" in history[-1][1]:
            means["train/skipped_steps"] = history[-1][1]["total_skips"]
          means["wall_seconds"] = time.perf_counter() - started
          writer.write_scalars(step, means)
          parts = " ".join(f"{k[len('train/loss_'):]} {v:.4f}" for k, v in means.items()
                           if k.startswith("train/loss_"))
          logging.info("step %d/%d | loss %.4f (%s) | lr %.2e", step, total_steps,
                       means["train/loss"], parts, means["train/learning_rate"])
          history = []

        if step % config.eval_every_steps == 0 or is_last:
          t0 = time.monotonic()
          with progress.timed("eval"):
            scores, visuals = trainer.evaluate(state, config.dataset.eval_split)
          final_scalars = trainer.task.scalars(scores, trainer.class_names)
          writer.write_scalars(step, {**final_scalars, "wall_seconds": time.perf_counter() - started})
          _write_visuals(trainer, writer, visuals, step)
          logging.info("eval at step %d (%.1f s): %s\n%s", step, time.monotonic() - t0,
                       trainer.task.headline(scores), trainer.task.table(scores, trainer.class_names))
          eval_seconds += time.monotonic() - t0

        if is_save or stop:
          trainer.checkpoints.save(step, args=ocp.args.StandardSave(state))
        if stop:
          trainer.checkpoints.wait_until_finished()
          logging.warning("%s received: stopped after step %d and saved a checkpoint in %s; run the "
                          "same command again to resume.", watcher.received or "stop request", step,
                          trainer.checkpoints.directory)
          return {"preempted_at_step": float(step)}

      if start_step >= total_steps:
        scores, visuals = trainer.evaluate(state, config.dataset.eval_split)
        final_scalars = trainer.task.scalars(scores, trainer.class_names)
        logging.info("eval at step %d:\n%s", start_step, trainer.task.table(scores, trainer.class_names))
    finally:
      # Also on errors (a non-finite loss, bad data): let a save in flight commit, so
      # the last good checkpoint is complete on disk.
      trainer.checkpoints.wait_until_finished()
      trainer.checkpoints.close()
      writer.flush()
      writer.close()
  return final_scalars


def _prepare_workdir(workdir: str) -> None:
  """Creates WORKDIR and proves it writable before anything is trained."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test_{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"workdir {workdir} is not writable: {e.strerror or e}") from None


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """--mode=eval: restores the latest checkpoint and prints the per-class table."""
  trainer = Trainer(config, workdir)
  state = trainer.latest_checkpoint_state()
  scores, _ = trainer.evaluate(state, config.dataset.eval_split)
  print(f"{config.dataset.name}/{config.dataset.eval_split} at step "
        f"{int(jax.device_get(state.step))}:\n{trainer.task.table(scores, trainer.class_names)}")
  trainer.checkpoints.close()
  return trainer.task.scalars(scores, trainer.class_names)
