"""Ablation sweeps: every combination of some config values, each with several seeds.

  python -m seg_jax.sweep --config=configs/unet.py --workdir=runs/ablation \\
      --sweep=loss.name=ce,dice,ce+dice --sweep=model.norm=batch,group --seeds=3 \\
      [--config.key=value ...] [--print_commands] [--report]
  python -m seg_jax.sweep --config=configs/sweeps/unet_losses.py --workdir=runs/losses

A sweep file is an ordinary experiment config (`get_config()`, trainable on its
own with main.py) plus `get_sweep()`, which returns
`{"axes": {"loss.name": ["ce", "ce+dice"], ...}, "seeds": 2, "metrics": ["eval/dice", ...],
"baseline": "loss.name=ce"}` ("seeds", "metrics" and "baseline" optional; `--baseline` adds the
paired comparison of every variant with its baseline to the report, sweep_report.differences). `--sweep` flags add axes or replace a file's
axis of the same key; `--seeds` replaces its seed count. Axis keys are checked
against `config.base_config()` and every run's config is validated before the
first run starts, so a typo fails at once with one line.

Layout of WORKDIR: `sweep.json` (the spec, read back by `--report`), one
workdir per run named after its overrides, keys sorted, e.g.
`loss.name=ce+dice,model.norm=group/seed=1` (characters other than letters,
digits and `._+-~` in values are %-escaped), and the report: `results.md`,
`results.csv`, `curves.png` (seg_jax/sweep_report.py).

Each run is a separate `python main.py` process, the very command that
`--print_commands` prints for a cluster scheduler, rather than a call of
`train.train_and_evaluate` in this process: every run starts from a fresh
JAX/XLA/TensorFlow state (no compiled programs, memory or flags carried from
one variant to the next, so wall times compare fairly), a run that fails (NaN
loss, out of memory, a crash in native code) cannot take the sweep down, and
killing the sweep leaves an ordinary interrupted workdir that main.py resumes.
The price is a few seconds of imports per run.

Runs go seed by seed (every variant with the first seed, then the second...),
so an interrupted sweep already compares all variants. A run is skipped once
finished (its metrics.jsonl has an evaluation at its num_train_steps); an
unfinished one is started again and main.py resumes it from its newest
checkpoint. A run workdir whose config.json differs from the run's config
stops the sweep instead of mixing two experiments.
"""

from __future__ import annotations

import dataclasses
import fcntl
import importlib.util
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.parse
from typing import Any, Sequence

from flax import traverse_util
import ml_collections

from seg_jax import cli
from seg_jax import config as config_lib
from seg_jax import sweep_report

SPEC_FILE = "sweep.json"
SPEC_KEYS = ("axes", "seeds", "metrics", "baseline")
MAIN_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "main.py")
# Keys that may differ between a run's config.json and its config without
# changing what it trains (machine-local paths, how often it logs or saves).
NOT_COMPARED = ("compilation_cache_dir", "dataset.data_dir", "log_every_steps", "checkpoint.use",
                "checkpoint_every_steps", "keep_checkpoints", "num_eval_visuals")


class SweepError(ValueError):
  """The sweep is malformed or its workdir holds something else; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Run:
  variant: str               # variant_name(overrides)
  overrides: dict[str, Any]  # axis key -> value, in axis order
  seed: int
  workdir: str


# ---------------------------------------------------------------------------- axes

def _default(key: str, source: str, base: ml_collections.ConfigDict | None = None) -> Any:
  """The schema default of an axis key for `base`'s model and dataset (its type is the type of
  the axis values)."""
  try:
    default = config_lib.schema_default(key, base)
  except config_lib.ConfigError as e:
    raise SweepError(f"{source}: {e}") from None
  if key == "seed":
    raise SweepError(f"{source}: config.seed: seeds are not an axis; use --seeds=N")
  if not isinstance(default, (bool, int, float, str)):
    raise SweepError(f"{source}: config.{key}: only str, int, float and bool keys can be swept")
  return default


def coerce_value(key: str, value: Any, default: Any, source: str) -> Any:
  """`value` (a string from the command line, or a Python value from a sweep file) as
  the type of the key's `default`, or SweepError."""
  kind = type(default)
  def bad(why):
    return SweepError(f"{source}: config.{key}={value!r}: {why}")
  if isinstance(value, str) and kind is not str:
    text = value.strip()
    if kind is bool:
      if text.lower() in ("true", "1", "yes"):
        return True
      if text.lower() in ("false", "0", "no"):
        return False
      raise bad("not a bool (true/false)")
    try:
      return kind(text)
    except ValueError:
      raise bad(f"not {'an' if kind is int else 'a'} {kind.__name__}") from None
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if type(value) is not kind:
    raise bad(f"must be a {kind.__name__} like the default {default!r}")
  return value


def parse_axis_flag(text: str, base: ml_collections.ConfigDict | None = None
                    ) -> tuple[str, list[Any]]:
  """'model.width=8,16' -> ('model.width', [8, 16]) typed like the base config."""
  key, sep, values = text.partition("=")
  key = key.strip()
  if not sep or not values.strip():
    raise SweepError(f"--sweep={text}: expected key=value1,value2,...")
  default = _default(key, "--sweep", base)
  return key, [coerce_value(key, v, default, "--sweep") for v in values.split(",")]


def check_axes(axes: dict[str, Any], source: str, base: ml_collections.ConfigDict | None = None
               ) -> dict[str, list[Any]]:
  """The axes with keys checked against the schema and values typed like its defaults."""
  out = {}
  for key, values in axes.items():
    default = _default(key, source, base)
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
      raise SweepError(f"{source}: config.{key}: expected a non-empty list of values")
    typed = [coerce_value(key, v, default, source) for v in values]
    if len(set(map(format_value, typed))) != len(typed):
      raise SweepError(f"{source}: config.{key}: a value is listed twice in {typed}")
    out[key] = typed
  return out


def variants(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
  """Cartesian product of the axes, first axis slowest; [{}] for no axes."""
  keys = list(axes)
  return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


def format_value(value: Any) -> str:
  """A value as main.py's `--config.key=` parses it back (floats via repr: 0.001, 1e-05)."""
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, (tuple, list)):
    return "(" + ", ".join(format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def variant_name(overrides: dict[str, Any]) -> str:
  """Directory name of a variant: `key=value` joined by ',', keys sorted so that the
  order of the axes does not matter; 'base' when nothing is swept."""
  if not overrides:
    return "base"
  return ",".join(f"{key}={urllib.parse.quote(format_value(overrides[key]), safe='+')}"
                  for key in sorted(overrides))


def plan(axes: dict[str, list[Any]], seeds: Sequence[int], sweep_dir: str) -> list[Run]:
  """Every variant with every seed, seed by seed."""
  runs = []
  for seed in seeds:
    for overrides in variants(axes):
      name = variant_name(overrides)
      runs.append(Run(name, overrides, seed, os.path.join(sweep_dir, name, f"seed={seed}")))
  return runs


def run_config(base: ml_collections.ConfigDict, run: Run) -> ml_collections.ConfigDict:
  config = base.copy_and_resolve_references()
  config.update_from_flattened_dict({**run.overrides, "seed": run.seed})
  return config


def validate_runs(base: ml_collections.ConfigDict, runs: Sequence[Run]) -> None:
  """Each distinct variant's config passes config.validate, or SweepError naming the variant."""
  for run in {r.variant: r for r in runs}.values():
    try:
      config_lib.validate(run_config(base, run))
    except config_lib.ConfigError as e:
      raise SweepError(f"variant {run.variant}: {e}") from None


# ---------------------------------------------------------------------------- the spec

def load_sweep_file(config_arg: str) -> dict[str, Any]:
  """`get_sweep()` of the config file (path or path:preset), or {} if it defines none."""
  path = config_arg.split(":", 1)[0]
  spec = importlib.util.spec_from_file_location("seg_jax_sweep_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    return {}
  sweep = module.get_sweep()
  if not isinstance(sweep, dict):
    raise SweepError(f"{path}: get_sweep() must return a dict with keys {', '.join(SPEC_KEYS)}")
  unknown = set(sweep) - set(SPEC_KEYS)
  if unknown:
    raise SweepError(f"{path}: get_sweep() has unknown key(s) {', '.join(sorted(unknown))}; "
                     f"allowed: {', '.join(SPEC_KEYS)}")
  return sweep


def seed_list(base: ml_collections.ConfigDict, count: int) -> list[int]:
  """config.seed, config.seed + 1, ...: `--config.seed` picks another set of seeds."""
  if not isinstance(count, int) or isinstance(count, bool) or count < 1:
    raise SweepError(f"seeds={count!r}: must be an int >= 1")
  return [base.seed + i for i in range(count)]


def write_spec(sweep_dir: str, spec: dict[str, Any]) -> None:
  os.makedirs(sweep_dir, exist_ok=True)
  with open(os.path.join(sweep_dir, SPEC_FILE), "w", encoding="utf-8") as f:
    json.dump(spec, f, indent=2)
    f.write("\n")


def read_spec(sweep_dir: str) -> dict[str, Any]:
  path = os.path.join(sweep_dir, SPEC_FILE)
  if not os.path.exists(path):
    raise SweepError(f"{path} not found: --report needs the workdir of a sweep")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def parse_baseline(text: str, axes: dict[str, list[Any]]) -> tuple[str, Any]:
  """'loss.name=ce' -> ('loss.name', 'ce'), the value typed like the axis's; SweepError unless
  the key is an axis and the value one of its values."""
  key, sep, value = text.partition("=")
  key = key.strip()
  if not sep or not value.strip():
    raise SweepError(f"--baseline={text}: expected key=value (an axis and one of its values)")
  if key not in axes:
    raise SweepError(f"--baseline={text}: {key} is not an axis of this sweep "
                     f"(axes: {', '.join(axes) or 'none'})")
  for candidate in axes[key]:
    if format_value(candidate) == value.strip() or str(candidate) == value.strip():
      return key, candidate
  raise SweepError(f"--baseline={text}: {value} is not a value of {key} "
                   f"({', '.join(map(format_value, axes[key]))})")


def report(sweep_dir: str, metrics: Sequence[str] | None = None,
           baseline: str | None = None) -> dict[str, str]:
  """Writes results.md, results.csv and curves.png for the sweep in `sweep_dir`; `baseline`
  ('key=value', default: the spec's) adds the paired comparisons against it."""
  spec = read_spec(sweep_dir)
  metrics = list(metrics or spec["metrics"])
  baseline = baseline or spec.get("baseline")
  runs = plan(spec["axes"], spec["seeds"], sweep_dir)
  rows = []
  for overrides in variants(spec["axes"]):
    name = variant_name(overrides)
    rows.append(sweep_report.Variant(name, overrides,
                                     [r.workdir for r in runs if r.variant == name]))
  description = f"`{spec['command']}`" if spec.get("command") else ""
  return sweep_report.write_report(
      sweep_dir, rows, metrics, description,
      parse_baseline(baseline, spec["axes"]) if baseline else None)


# ---------------------------------------------------------------------------- running

def main_command(config_arg: str, run: Run, fixed_overrides: dict[str, Any],
                 main_py: str = "main.py", python: str = "python") -> list[str]:
  """argv of the main.py process that trains `run`."""
  args = [python, main_py, f"--config={config_arg}", f"--workdir={run.workdir}"]
  for key, value in {**fixed_overrides, **run.overrides, "seed": run.seed}.items():
    args.append(f"--config.{key}={format_value(value)}")
  return args


def _flat_json(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
  """{'model.width': 16, ...} of a config as config.json stores it (JSON types)."""
  if isinstance(config, ml_collections.ConfigDict):
    config = json.loads(config.to_json_best_effort())
  return traverse_util.flatten_dict(config, sep=".")


def check_existing_workdir(run: Run, config: ml_collections.ConfigDict) -> None:
  """SweepError if the run's workdir was trained with a different config."""
  path = os.path.join(run.workdir, sweep_report.CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    old = _flat_json(json.load(f))
  new = _flat_json(config)
  for key in sorted(set(old) | set(new)):
    if key not in NOT_COMPARED and old.get(key) != new.get(key):
      raise SweepError(f"{run.workdir} was trained with {key}={old.get(key)!r}, this sweep "
                       f"has {new.get(key)!r}; use another --workdir or delete that run")


def _run_process(argv: list[str], log_path: str) -> int:
  """Runs argv, its output both on our stderr and appended to log_path; its exit code.

  SIGTERM or Ctrl-C of the sweep stops the run too (it resumes on the next start).
  """
  with open(log_path, "a", encoding="utf-8") as log:
    log.write(f"\n$ {shlex.join(argv)}\n")
    log.flush()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               bufsize=1, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
      for line in process.stdout:
        sys.stderr.write(line)
        log.write(line)
      return process.wait()
    finally:
      if process.poll() is None:
        process.terminate()
        try:
          process.wait(timeout=60)
        except subprocess.TimeoutExpired:
          process.kill()
          process.wait()


def execute(runs: Sequence[Run], base: ml_collections.ConfigDict, config_arg: str,
            fixed_overrides: dict[str, Any]) -> list[Run]:
  """Trains every unfinished run in order; returns the runs that failed."""
  for run in runs:  # all checks before the first (possibly hours-long) run
    check_existing_workdir(run, run_config(base, run))
  failed = []
  for i, run in enumerate(runs, start=1):
    title = f"[{i}/{len(runs)}] {run.variant}/seed={run.seed}"
    if sweep_report.is_finished(run.workdir):
      print(f"{title}: finished before, skipped", file=sys.stderr, flush=True)
      continue
    os.makedirs(run.workdir, exist_ok=True)
    with open(os.path.join(run.workdir, ".sweep.lock"), "w") as lock:
      try:  # a second sweep on the same workdir must not train the same run at once
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        print(f"{title}: another process is running it, skipped", file=sys.stderr, flush=True)
        continue
      resuming = os.path.exists(os.path.join(run.workdir, "checkpoints"))
      print(f"{title}: {'resuming' if resuming else 'starting'}", file=sys.stderr, flush=True)
      t0 = time.perf_counter()
      argv = main_command(config_arg, run, fixed_overrides, main_py=MAIN_PY, python=sys.executable)
      code = _run_process(argv, os.path.join(run.workdir, "train.log"))
    if code != 0 or not sweep_report.is_finished(run.workdir):
      failed.append(run)
      print(f"{title}: FAILED (exit code {code}); see {run.workdir}/train.log",
            file=sys.stderr, flush=True)
    else:
      print(f"{title}: finished in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
  return failed


# ---------------------------------------------------------------------------- command line

def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Base config file; may define get_sweep().",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Sweep directory: one sub-workdir per run, and the report.")
  flags.DEFINE_multi_string("sweep", [], "An axis, key=value1,value2,...; repeat for more axes.")
  flags.DEFINE_integer("seeds", None, "Seeds per variant: config.seed, config.seed+1, ... "
                       "(default: the sweep file's, else 1).")
  flags.DEFINE_list("metrics", None, "Eval metrics of the table; the first is plotted "
                    f"(default: the sweep file's, else {','.join(sweep_report.DEFAULT_METRICS)}).")
  flags.DEFINE_string("baseline", None, "key=value: the variants with this axis value are the "
                      "baselines; the report adds each other variant's difference in the first "
                      "metric with a 95% interval and p-value (paired bootstrap over images).")
  flags.DEFINE_bool("print_commands", False, "Print one main.py command per run and exit.")
  flags.DEFINE_bool("report", False, "Only write the report of the runs in --workdir.")
  flags.mark_flag_as_required("workdir")
  return flags.FLAGS


def main(argv: list[str]) -> None:
  from absl import flags
  from ml_collections import config_flags
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  sweep_dir = FLAGS.workdir
  try:
    if FLAGS.report:
      paths = report(sweep_dir, FLAGS.metrics, FLAGS.baseline)
      print("\n".join(f"wrote {p}" for p in paths.values()))
      return
    if FLAGS.config is None:
      cli.fail("--config is required (unless --report)")
    config_arg = config_flags.get_config_filename(FLAGS["config"])
    fixed = dict(config_flags.get_override_values(FLAGS["config"]))
    base = FLAGS.config
    spec = load_sweep_file(config_arg)
    axes = check_axes(dict(spec.get("axes", {})), f"{config_arg} get_sweep()", base)
    for text in FLAGS.sweep:
      key, values = parse_axis_flag(text, base)
      axes[key] = values
    clash = sorted(set(axes) & set(fixed))
    if clash:
      raise SweepError(f"--config.{clash[0]} is also a sweep axis; drop one of them")
    seeds = seed_list(base, FLAGS.seeds if FLAGS.seeds is not None else spec.get("seeds", 1))
    metrics = list(FLAGS.metrics or spec.get("metrics", sweep_report.DEFAULT_METRICS))
    baseline = FLAGS.baseline or spec.get("baseline")
    if baseline:
      parse_baseline(baseline, axes)  # fails now, not after the runs
    runs = plan(axes, seeds, sweep_dir)
    validate_runs(base, runs)
    if FLAGS.print_commands:
      main_py = os.path.relpath(MAIN_PY)
      for run in runs:
        print(shlex.join(main_command(config_arg, run, fixed, main_py=main_py)))
    command = shlex.join(["python", "-m", "seg_jax.sweep", *(
        a for a in sys.argv[1:] if a.lstrip("-").split("=")[0] not in ("print_commands", "report"))])
    write_spec(sweep_dir, {"config": config_arg, "overrides": fixed, "axes": axes,
                           "seeds": seeds, "metrics": metrics, "command": command,
                           **({"baseline": baseline} if baseline else {})})
    if FLAGS.print_commands:
      return
    print(f"sweep: {len(runs) // len(seeds)} variants x {len(seeds)} seeds = {len(runs)} runs "
          f"in {sweep_dir}", file=sys.stderr, flush=True)
    failed = execute(runs, base, config_arg, fixed)
    paths = report(sweep_dir, metrics)
    print("\n".join(f"wrote {p}" for p in paths.values()))
    if failed:
      cli.fail(f"{len(failed)} of {len(runs)} runs failed: " +
            ", ".join(f"{r.variant}/seed={r.seed}" for r in failed), code=1)
  except (SweepError, sweep_report.ReportError, config_lib.ConfigError) as e:
    cli.fail(str(e))
  except OSError as e:  # ml_collections: the config file could not be loaded
    cli.fail(" ".join(str(e).split()))


if __name__ == "__main__":
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # runs the finally that stops the child
  from absl import app
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
