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
from flax import traverse_util
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
from seg_jax import registry
from seg_jax import tasks
from seg_jax import visualize
from seg_jax import workdir as workdir_lib
from seg_jax import writers
from seg_jax.data import image_io
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
  # Exponential moving average of params (optimizer.ema_decay > 0), else {}.
  ema_params: Any = flax.struct.field(default_factory=dict)


# ---------------------------------------------------------------------------- optimiser

def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """The learning rate as a function of the optimiser update count (with gradient accumulation,
  one update per optimizer.accumulate_steps train steps)."""
  o = config.optimizer
  peak, warmup = o.learning_rate, o.warmup_steps
  end = peak * o.end_learning_rate_factor
  total = config_lib.num_optimizer_updates(config)
  decay_steps = max(total - warmup, 1)
  if o.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, end)
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


BACKBONE, HEAD = "backbone", "head"  # the parameter groups: the pretrained backbone, the rest


def backbone_path(config: ml_collections.ConfigDict) -> str:
  """The '/'-joined path of the model's pretrained backbone in its params ('' = none)."""
  return registry.model_entry(config.model.name).backbone(config.model)


def has_backbone_group(config: ml_collections.ConfigDict) -> bool:
  """Whether the backbone gets its own learning rate (optimizer.backbone_* keys are set)."""
  o = config.optimizer
  return o.backbone_learning_rate_multiplier != 1.0 or o.backbone_frozen_steps > 0


def parameter_labels(params, backbone: str):
  """BACKBONE for every parameter under the module path `backbone`, HEAD for the others."""
  prefix = tuple(backbone.split("/")) if backbone else None
  return traverse_util.path_aware_map(
      lambda path, _: BACKBONE if prefix and path[:len(prefix)] == prefix else HEAD, params)


def backbone_schedule(config: ml_collections.ConfigDict, schedule: optax.Schedule
                      ) -> optax.Schedule:
  """The backbone's learning rate, by its own update count: the head's at the same step times
  the multiplier. Its updates start after the frozen steps, so its count is behind by them."""
  o = config.optimizer
  return lambda count: o.backbone_learning_rate_multiplier * schedule(
      count + o.backbone_frozen_steps)


def _base_optimizer(o: ml_collections.ConfigDict, schedule: optax.Schedule
                    ) -> optax.GradientTransformation:
  """The optimiser with its weight decay, at learning rate `schedule`."""
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
  return core


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimiser and the (head's) learning-rate schedule.

  With optimizer.backbone_learning_rate_multiplier != 1 or backbone_frozen_steps > 0 the
  parameters are labelled (`parameter_labels`) and `optax.multi_transform` gives the backbone
  its own optimiser: `backbone_schedule`, and no update at all (zero, its state unchanged) for
  the first backbone_frozen_steps steps. Clipping and the non-finite guard wrap both groups, so
  the global norm is over all gradients.
  """
  o = config.optimizer
  schedule = make_schedule(config)
  core = _base_optimizer(o, schedule)
  if has_backbone_group(config):
    backbone = _base_optimizer(o, backbone_schedule(config, schedule))
    if o.backbone_frozen_steps:
      frozen = o.backbone_frozen_steps
      backbone = optax.transforms.conditionally_mask(backbone, lambda count: count >= frozen)
    path = backbone_path(config)
    core = optax.multi_transform({BACKBONE: backbone, HEAD: core},
                                 functools.partial(parameter_labels, backbone=path))
  if o.grad_clip_norm:
    core = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), core)
  if o.accumulate_steps > 1:
    # Mean of k steps' gradients -> one update of `core` (clipping sees the mean); the
    # accumulator lives in the optimiser state, so checkpoints resume mid-accumulation.
    core = optax.MultiSteps(core, every_k_schedule=o.accumulate_steps).gradient_transformation()
  if config.on_nonfinite == "skip":
    # Outside the accumulation: a non-finite micro-batch is dropped alone, not the k-batch.
    # Non-finite gradients -> zero update, inner state (moments, schedule count) kept.
    # The limit on consecutive skips is enforced on the host, with a message.
    core = optax.apply_if_finite(core, max_consecutive_errors=np.iinfo(np.int32).max)
  return core, schedule


def describe_parameter_groups(config: ml_collections.ConfigDict, params) -> str:
  """The parameter groups, their sizes and learning rates, one line each (logged at start)."""
  o = config.optimizer
  sizes: dict[str, list[int]] = {BACKBONE: [0, 0], HEAD: [0, 0]}
  backbone = backbone_path(config) if has_backbone_group(config) else ""
  labels = parameter_labels(params, backbone)
  for label, array in zip(jax.tree.leaves(labels), jax.tree.leaves(params)):
    sizes[label][0] += 1
    sizes[label][1] += int(np.prod(array.shape))
  rate = f"{o.schedule} schedule, peak {o.learning_rate:g}"
  if not backbone:
    return f"parameter group: all {sizes[HEAD][1]:,} parameters ({sizes[HEAD][0]} arrays): {rate}"
  frozen = (f"; unchanged for the first {o.backbone_frozen_steps} steps"
            if o.backbone_frozen_steps else "")
  return "\n".join([
      "parameter groups:",
      f"  {BACKBONE} (params/{backbone}): {sizes[BACKBONE][1]:,} parameters "
      f"({sizes[BACKBONE][0]} arrays): {o.backbone_learning_rate_multiplier:g} x the {rate} "
      f"(peak {o.backbone_learning_rate_multiplier * o.learning_rate:g}){frozen}",
      f"  {HEAD} (the rest): {sizes[HEAD][1]:,} parameters ({sizes[HEAD][0]} arrays): {rate}"])


def schedule_count(opt_state) -> jax.Array:
  """The step count the optimiser's learning-rate schedule is at (its ScaleByScheduleState).

  It is what the optimiser will use for its next update. Under on_nonfinite="skip" it stays
  behind TrainState.step by the number of skipped steps, as a skipped step does not advance it.
  """
  is_schedule = lambda x: isinstance(x, (optax.ScaleByScheduleState, optax.MultiTransformState))
  counts = []
  for s in jax.tree.leaves(opt_state, is_leaf=is_schedule):
    if isinstance(s, optax.MultiTransformState):  # the head's: it is never frozen
      counts.append(schedule_count(s.inner_states[HEAD].inner_state))
    elif is_schedule(s):
      counts.append(s.count)
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
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      ema_params=params if config.optimizer.ema_decay else {})

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


def initialized_from(state: TrainState, path: str) -> tuple[TrainState, "init_from.InitReport"]:
  """`state` with the parameters and batch statistics `path` has for its model
  (`model.init_from`), and the report of what was loaded."""
  variables, report = init_from.initialize(
      {"params": state.params, "batch_stats": state.batch_stats}, path)
  return state.replace(params=variables["params"], batch_stats=variables["batch_stats"]), report


def inference_variables(state: TrainState) -> dict:
  """The variables evaluation, predict and export use: the EMA of the weights when the run
  keeps one (optimizer.ema_decay > 0), else the weights.

  Batch-norm statistics are the trained model's running averages in both cases: they are
  already moving averages (over batches of the raw weights' activations), the convention of
  big_vision and of timm's EMA with buffers copied.
  """
  variables = model_variables(state)
  if state.ema_params:
    variables["params"] = state.ema_params
  return variables


def _update_ema(state: TrainState, params, opt_state, decay: float):
  """The EMA after this step: moved towards `params` only if the optimiser applied an update
  (its schedule count advanced), so accumulation steps and skipped steps leave it unchanged."""
  applied = schedule_count(opt_state) > schedule_count(state.opt_state)
  moved = optax.incremental_update(params, state.ema_params, step_size=1.0 - decay)
  return jax.tree.map(lambda new, old: jnp.where(applied, new, old), moved, state.ema_params)


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
  ema_params = (_update_ema(state, params, opt_state, config.optimizer.ema_decay)
                if config.optimizer.ema_decay else state.ema_params)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, ema_params=ema_params)
  step_metrics.update(parts)
  return new_state, step_metrics


def eval_step(variables: dict, batch: dict, *, model: nn.Module,
              config: ml_collections.ConfigDict):
  """The task's eval outputs of one global batch (a confusion matrix and class ids, or
  detections) for the model `variables` (`inference_variables`, or `model_variables` for the
  raw weights), at `config.matmul_precision` and on `config.conv_backend`; padding examples
  (valid=False) never count."""
  with jax.default_matmul_precision(config.matmul_precision), conv_ops.backend(config.conv_backend):
    return tasks.get_task(config).eval_outputs(model, variables, batch)


# ---------------------------------------------------------------------------- host helpers

BEST_CHECKPOINT_DIR = "checkpoints_best"


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
    if with_data:
      self.builder, self.class_names = pipeline.prepare_dataset(config)
      # Keys the data determines (coco_json: class count, budgets); `self.config` has them.
      config = self.config = pipeline.resolve_config(config, self.builder)
      self.channels = pipeline.image_channels(config, self.builder)
      wanted = image_io.NORMALIZATIONS[config.model.input_normalization].get("channels")
      if wanted and self.channels != wanted:
        raise config_lib.ConfigError(
            f"config.model.input_normalization={config.model.input_normalization!r} needs "
            f"{wanted}-channel images; dataset {config.dataset.name} has {self.channels}")
      self.category_ids = pipeline.category_ids(config, self.builder)
      pipeline.check_eval_split(config, self.builder)  # fail now, not at the first eval
    else:
      info = workdir_lib.read_model_info(workdir)
      self.builder, self.class_names = None, info["class_names"]
      self.channels = info["input_channels"]
      self.category_ids = info.get("category_ids")
    self.model = models.build_model(config)
    self.task = tasks.get_task(config)
    self.tx, self.schedule = make_optimizer(config)
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
    # The best evaluation's checkpoint: a second manager, as best_fn in the first one would
    # make keep_checkpoints keep the best instead of the newest.
    self.best_checkpoints = None
    metric = config.checkpoint.best_metric
    if metric:
      self.best_checkpoints = ocp.CheckpointManager(
          os.path.join(os.path.abspath(workdir), BEST_CHECKPOINT_DIR),
          options=ocp.CheckpointManagerOptions(
              max_to_keep=1, best_fn=lambda metrics: metrics[metric],
              best_mode=config.checkpoint.best_mode, create=True))

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
    failures = []
    for step in steps:
      try:
        state = self._restore(self.checkpoints, step)
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
    state, report = initialized_from(state, path)
    summary = report.summary()
    logging.info("%s", summary)
    if jax.process_index() == 0:
      with open(os.path.join(self.workdir, "init_from.txt"), "w") as f:
        f.write(report.summary(max_listed=10**9) + "\n")
    return state

  def _restore(self, manager: ocp.CheckpointManager, step: int) -> TrainState:
    create = lambda: create_train_state(self.config, self.model, self.tx, self.mesh,
                                        channels=self.channels)
    replicated = parallel.replicated(self.mesh)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                            jax.eval_shape(create))
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def latest_checkpoint_state(self) -> TrainState:
    """The newest checkpoint's state; FileNotFoundError if there is none."""
    if self.checkpoints.latest_step() is None:
      raise FileNotFoundError(f"no checkpoint in {self.checkpoints.directory}; train first")
    return self.initial_state()

  def checkpoint_to_use(self) -> tuple[ocp.CheckpointManager, int]:
    """The manager and step that config.checkpoint.use names (latest, best or a step), for eval,
    predict and export; FileNotFoundError naming what is there if it does not exist."""
    use = str(self.config.checkpoint.use)
    if use == "best":
      manager = self.best_checkpoints
      step = manager.best_step() if manager is not None else None
      if step is None:
        raise FileNotFoundError(f"no best checkpoint in {self.workdir}/{BEST_CHECKPOINT_DIR} "
                                f"(checkpoint.best_metric={self.config.checkpoint.best_metric!r})")
      return manager, step
    manager = self.checkpoints
    steps = sorted(manager.all_steps())
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {manager.directory}; train first")
    if use == "latest":
      return manager, steps[-1]
    if int(use) in steps:
      return manager, int(use)
    best = self.best_checkpoints.all_steps() if self.best_checkpoints is not None else []
    if int(use) in best:
      return self.best_checkpoints, int(use)
    raise FileNotFoundError(f"checkpoint.use={use}: no checkpoint at that step in {self.workdir}; "
                            f"steps there: {', '.join(map(str, sorted({*steps, *best})))}")

  def inference_state(self) -> TrainState:
    """The state of the checkpoint config.checkpoint.use names (`checkpoint_to_use`); its
    `inference_variables` are what eval, predict and export run."""
    manager, step = self.checkpoint_to_use()
    logging.info("Using the checkpoint at step %d in %s", step, manager.directory)
    return self._restore(manager, step)

  def close(self) -> None:
    for manager in (self.checkpoints, self.best_checkpoints):
      if manager is not None:
        manager.wait_until_finished()
        manager.close()

  def evaluate(self, variables: dict, split: str, *, step: int | None = None
               ) -> tuple[dict, dict]:
    """Dataset-level scores of the model `variables` over every example of `split`, and arrays
    for the visuals. The scores' "per_image" entry, where the task has one, holds per-image
    results (`write_per_image`). Where the dataset scores in its own terms (coco_json), the
    detections of the checkpoint at `step` also go, on process 0, to
    WORKDIR/eval/detections_step_<step>.json."""
    if config_lib.task(self.config) == "volumetric":  # whole cases, by sliding windows
      return self.task.evaluate_cases(self.model, variables, self.mesh,
                                      self.builder.splits[split], self.class_names)
    evaluator = self.task.evaluator(
        self.class_names, reference=pipeline.eval_reference(self.config, self.builder, split))
    for batch in pipeline.eval_batches(self.config, self.builder, split, with_ids=True):
      ids = batch.pop("id")
      device_batch = parallel.host_batch_to_global(batch, self.mesh)
      evaluator.add(batch, device_batch, self.eval_step(variables, device_batch), ids=ids)
    scores = evaluator.compute()
    if (step is not None and getattr(evaluator, "results", None) is not None
        and jax.process_index() == 0):
      out_dir = os.path.join(self.workdir, "eval")
      os.makedirs(out_dir, exist_ok=True)
      workdir_lib.write_json(os.path.join(out_dir, f"detections_step_{step}.json"),
                             evaluator.results)
    return scores, evaluator.visuals


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str
                          ) -> tuple[Trainer, dict, int]:
  """For predict and export: a Trainer without data, and the inference variables (the EMA if
  the run kept one) and step of the checkpoint config.checkpoint.use names."""
  trainer = Trainer(config, workdir, with_data=False)
  try:
    state = trainer.inference_state()
  finally:
    trainer.close()
  return trainer, inference_variables(state), int(jax.device_get(state.step))


def write_per_image(trainer: Trainer, scores: dict, step: int) -> str | None:
  """WORKDIR/eval/per_image_step_<step>.csv from the scores' per-image table, if the task has one;
  with several processes each writes the rows of its own images (..._process_<i>.csv)."""
  table = scores.get("per_image")
  if table is None:
    return None
  out_dir = os.path.join(trainer.workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  suffix = f"_process_{jax.process_index()}" if jax.process_count() > 1 else ""
  path = os.path.join(out_dir, f"per_image_step_{step}{suffix}.csv")
  trainer.task.write_per_image(path, table, trainer.class_names)
  return path


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
  config = trainer.config  # with what the data determines
  if jax.process_index() == 0:
    workdir_lib.write(workdir, config, class_names=trainer.class_names, channels=trainer.channels,
                      category_ids=trainer.category_ids,
                      preprocessing=getattr(trainer.builder, "preprocessing", None))
  state = trainer.initial_state()
  logging.info("%s", describe_parameter_groups(config, state.params))
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
      evaluated = False  # the first evaluation (of this process) also scores the raw weights
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
        is_eval = step % config.eval_every_steps == 0 or is_last
        stop = watcher.should_stop(step)
        # Evaluations may save the best checkpoint: they too come after a finite check.
        if is_log or is_save or is_eval or stop or step % check_every == 0:
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

        if is_eval:
          t0 = time.monotonic()
          with progress.timed("eval"):
            final_scalars = _evaluate_and_record(trainer, state, step, writer,
                                                 with_raw=not evaluated, started=started)
          evaluated = True
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
        scores, visuals = trainer.evaluate(inference_variables(state), config.dataset.eval_split,
                                           step=start_step)
        final_scalars = trainer.task.scalars(scores, trainer.class_names)
        logging.info("eval at step %d:\n%s", start_step, trainer.task.table(scores, trainer.class_names))
    finally:
      # Also on errors (a non-finite loss, bad data): let a save in flight commit, so
      # the last good checkpoint is complete on disk.
      trainer.close()
      writer.flush()
      writer.close()
  return final_scalars


def _evaluate_and_record(trainer: Trainer, state: TrainState, step: int, writer, *,
                         with_raw: bool, started: float) -> dict[str, float]:
  """Evaluates the inference weights at `step`: writes the scalars, pictures and the per-image
  CSV, offers the state to the best-checkpoint manager; returns the eval scalars.

  With an EMA and `with_raw`, the raw weights are evaluated too and written as eval_raw/*, so
  that the first evaluation shows what the average gains.
  """
  config, t0 = trainer.config, time.monotonic()
  split = config.dataset.eval_split
  scores, visuals = trainer.evaluate(inference_variables(state), split, step=step)
  scalars = trainer.task.scalars(scores, trainer.class_names)
  record = dict(scalars)
  if with_raw and state.ema_params:
    raw, _ = trainer.evaluate(model_variables(state), split)
    record.update({"eval_raw/" + k[len("eval/"):]: v
                   for k, v in trainer.task.scalars(raw, trainer.class_names).items()})
    logging.info("eval at step %d, raw weights (without EMA): %s", step, trainer.task.headline(raw))
  writer.write_scalars(step, {**record, "wall_seconds": time.perf_counter() - started})
  _write_visuals(trainer, writer, visuals, step)
  write_per_image(trainer, scores, step)
  logging.info("eval at step %d (%.1f s)%s: %s\n%s", step, time.monotonic() - t0,
               " of the EMA weights" if state.ema_params else "", trainer.task.headline(scores),
               trainer.task.table(scores, trainer.class_names))
  metric = config.checkpoint.best_metric
  if trainer.best_checkpoints is not None:
    if metric not in scalars:
      raise config_lib.ConfigError(
          f"config.checkpoint.best_metric={metric!r}: not an eval scalar of this run; it writes "
          f"{', '.join(k for k in scalars if k.count('/') == 1)}")
    if math.isfinite(scalars[metric]):
      trainer.best_checkpoints.save(step, args=ocp.args.StandardSave(state),
                                    metrics={metric: scalars[metric]})
    else:
      logging.warning("%s is %s at step %d: not a candidate for the best checkpoint", metric,
                      scalars[metric], step)
  return scalars


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
  """--mode=eval: restores the checkpoint config.checkpoint.use names (latest, best, a step) and
  prints the per-class table of its inference weights (the EMA if the run kept one, with the
  raw weights' headline beside it)."""
  trainer = Trainer(config, workdir)
  config = trainer.config  # with what the data determines
  try:
    state = trainer.inference_state()
    step = int(jax.device_get(state.step))
    scores, _ = trainer.evaluate(inference_variables(state), config.dataset.eval_split, step=step)
    which = " (EMA weights)" if state.ema_params else ""
    print(f"{config.dataset.name}/{config.dataset.eval_split} at step {step}{which}:\n"
          f"{trainer.task.table(scores, trainer.class_names)}")
    if state.ema_params:
      raw, _ = trainer.evaluate(model_variables(state), config.dataset.eval_split)
      print(f"raw weights (without EMA): {trainer.task.headline(raw)}")
  finally:
    trainer.close()
  return trainer.task.scalars(scores, trainer.class_names)
