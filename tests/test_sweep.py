"""Sweeps: the product and names of variants, skipping finished runs, and a report whose
numbers are recomputed here from the values written into each run's metrics.jsonl."""

import csv
import importlib.util
import json
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from seg_jax import sweep
from seg_jax import sweep_report
from tests.conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, cwd=REPO):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "seg_jax.sweep", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------------------- variants and names

def test_variants_are_the_product_and_runs_go_seed_by_seed(tmp_path):
  axes = dict(sweep.parse_axis_flag(t) for t in ("loss.name=ce,dice,ce+dice",
                                                  "model.norm=batch,group"))
  assert sweep.variants(axes) == [
      {"loss.name": l, "model.norm": n} for l in ("ce", "dice", "ce+dice") for n in ("batch", "group")]
  runs = sweep.plan(axes, [0, 1, 2], str(tmp_path))
  assert len(runs) == 18
  assert [r.seed for r in runs] == [0] * 6 + [1] * 6 + [2] * 6
  assert os.path.relpath(runs[11].workdir, tmp_path) == "loss.name=ce+dice,model.norm=group/seed=1"
  assert len({r.workdir for r in runs}) == 18


def test_names_are_stable_typed_and_filesystem_safe():
  # The same variant has one name whatever the order of the axes.
  assert (sweep.variant_name({"model.norm": "group", "loss.name": "ce"}) ==
          sweep.variant_name({"loss.name": "ce", "model.norm": "group"}) ==
          "loss.name=ce,model.norm=group")
  # Values take the type of the schema's key, and print as main.py parses them back.
  key, values = sweep.parse_axis_flag("optimizer.learning_rate=1e-3,0.01,1e-5")
  assert values == [0.001, 0.01, 1e-05] and all(type(v) is float for v in values)
  assert sweep.variant_name({key: values[2]}) == "optimizer.learning_rate=1e-05"
  assert sweep.parse_axis_flag("model.width=8,16") == ("model.width", [8, 16])
  assert sweep.parse_axis_flag("dataset.augment.hflip=false,True") == (
      "dataset.augment.hflip", [False, True])
  # Separators and path characters inside a value are %-escaped: one directory level.
  assert (sweep.variant_name({"dataset.data_dir": "/tmp/a b,c=d"}) ==
          "dataset.data_dir=%2Ftmp%2Fa%20b%2Cc%3Dd")
  assert sweep.variant_name({}) == "base"


@pytest.mark.parametrize("flag,message", [
    ("model.widht=8,16", "--sweep: config.model.widht: unknown config key (did you mean model.width?)"),
    ("model.width=8,x", "--sweep: config.model.width='x': not an int"),
    ("seed=1,2", "seeds are not an axis; use --seeds=N"),
    ("model.width", "expected key=value1,value2,..."),
])
def test_bad_axis_flags_fail_with_one_line(flag, message):
  with pytest.raises(sweep.SweepError) as error:
    sweep.parse_axis_flag(flag)
  assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_sweep_file_axes_and_values_fail_before_any_run(data_dir, tmp_path):
  with pytest.raises(sweep.SweepError, match="a value is listed twice"):
    sweep.check_axes({"model.width": [8, 8]}, "f.py get_sweep()")
  with pytest.raises(sweep.SweepError, match="must be a str"):
    sweep.check_axes({"model.norm": [1]}, "f.py get_sweep()")
  assert sweep.check_axes({"optimizer.learning_rate": [1, 0.5]}, "f") == {
      "optimizer.learning_rate": [1.0, 0.5]}
  runs = sweep.plan({"model.norm": ["batch", "bach"]}, [0], str(tmp_path))
  with pytest.raises(sweep.SweepError, match=r"^variant model.norm=bach: config.model.norm='bach': "
                                             r"must be one of batch, group, instance, none$"):
    sweep.validate_runs(tiny_config(data_dir), runs)


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(os.path.join(REPO, "configs", "sweeps"))
                                         if n.endswith(".py")))
def test_sweep_files_in_configs_are_valid(name, tmp_path):
  sys.path.insert(0, REPO)  # the files import configs/*.py
  path = os.path.join(REPO, "configs", "sweeps", name)
  spec = sweep.load_sweep_file(path)
  assert spec["axes"] and set(spec) <= set(sweep.SPEC_KEYS)
  module_spec = importlib.util.spec_from_file_location("sweep_file", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  base = module.get_config()
  runs = sweep.plan(sweep.check_axes(spec["axes"], name), sweep.seed_list(base, spec["seeds"]),
                    str(tmp_path))
  sweep.validate_runs(base, runs)


def test_cli_misspelled_key_fails_at_start_with_one_line(tmp_path):
  result = _cli("--config=configs/unet.py", f"--workdir={tmp_path}/sw", "--sweep=loss.name=ce,dice",
                "--sweep=model.widht=8,16")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      "error: --sweep: config.model.widht: unknown config key (did you mean model.width?)")
  assert "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "sw")


def test_cli_print_commands_one_main_py_command_per_run(tmp_path):
  result = _cli("--config=configs/unet.py", f"--workdir={tmp_path}/sw", "--sweep=model.width=8,16",
                "--seeds=2", "--config.num_train_steps=500", "--print_commands")
  assert result.returncode == 0, result.stderr
  expected = [f"python main.py --config=configs/unet.py --workdir={tmp_path}/sw/model.width={w}/"
              f"seed={s} --config.num_train_steps=500 --config.model.width={w} --config.seed={s}"
              for s in (0, 1) for w in (8, 16)]
  assert result.stdout.splitlines() == expected
  assert not os.path.exists(tmp_path / "sw" / "model.width=8")  # nothing trained
  spec = json.loads((tmp_path / "sw" / "sweep.json").read_text())
  assert spec["axes"] == {"model.width": [8, 16]} and spec["seeds"] == [0, 1]


# ---------------------------------------------------------------------------- skipping and resuming

def _write_run(workdir, config, evals, extra=()):
  """A fake run: config.json and metrics.jsonl with eval/dice at the given steps."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for record in [*extra, *({"step": s, "eval/dice": 0.5} for s in evals)]:
      f.write(json.dumps(record) + "\n")


def test_finished_runs_are_skipped_unfinished_ones_started(data_dir, tmp_path, monkeypatch):
  base = tiny_config(data_dir)  # num_train_steps = 30
  runs = sweep.plan({"model.width": [8, 16]}, [0, 1], str(tmp_path))
  finished, interrupted = runs[0], runs[1]
  _write_run(finished.workdir, sweep.run_config(base, finished), evals=[30])
  # Trained to step 20 (eval there and a train record at 30 do not make it finished).
  _write_run(interrupted.workdir, sweep.run_config(base, interrupted), evals=[20],
             extra=[{"step": 30, "train/loss": 0.1}])
  launched = []

  def fake_process(argv, log_path):
    launched.append(argv)
    workdir = next(a.split("=", 1)[1] for a in argv if a.startswith("--workdir="))
    run = next(r for r in runs if r.workdir == workdir)
    if run.seed == 0:  # the interrupted run completes; seed 1 of width 16 "crashes"
      _write_run(workdir, sweep.run_config(base, run), evals=[20, 30])
    elif run.overrides["model.width"] == 16:
      return 1
    else:
      _write_run(workdir, sweep.run_config(base, run), evals=[30])
    return 0

  monkeypatch.setattr(sweep, "_run_process", fake_process)
  failed = sweep.execute(runs, base, "cfg.py", {"num_train_steps": 30})
  assert [a[3] for a in launched] == [f"--workdir={r.workdir}" for r in runs[1:]]
  assert launched[0][4:] == ["--config.num_train_steps=30", "--config.model.width=16",
                             "--config.seed=0"]
  assert failed == [runs[3]]
  assert [sweep_report.is_finished(r.workdir) for r in runs] == [True, True, True, False]

  # Second pass: only the failed run is started again.
  launched.clear()
  sweep.execute(runs, base, "cfg.py", {})
  assert [a[3] for a in launched] == [f"--workdir={runs[3].workdir}"]


def test_a_run_trained_with_another_config_stops_the_sweep(data_dir, tmp_path, monkeypatch):
  base = tiny_config(data_dir)
  runs = sweep.plan({"model.width": [8]}, [0], str(tmp_path))
  other = sweep.run_config(base, runs[0])
  other.num_train_steps = 60
  _write_run(runs[0].workdir, other, evals=[30])
  monkeypatch.setattr(sweep, "_run_process", lambda *a: pytest.fail("must not run"))
  with pytest.raises(sweep.SweepError, match="trained with num_train_steps=60, this sweep has 30"):
    sweep.execute(runs, base, "cfg.py", {})


# ---------------------------------------------------------------------------- the report

EVAL_STEPS = (10, 20, 30)


@pytest.fixture(scope="module")
def synthetic_sweep(tmp_path_factory):
  """2 variants x 3 seeds of synthetic metrics.jsonl; returns (dir, {variant: [per-run truth]})."""
  sweep_dir = str(tmp_path_factory.mktemp("sweep"))
  axes = {"loss.name": ["ce", "ce+dice"]}
  seeds = [0, 1, 2]
  sweep.write_spec(sweep_dir, {"config": "c.py", "overrides": {}, "axes": axes, "seeds": seeds,
                               "metrics": ["eval/dice", "eval/miou"]})
  rng = np.random.default_rng(0)
  truth = {}
  for run in sweep.plan(axes, seeds, sweep_dir):
    with_dice = run.overrides["loss.name"] == "ce+dice"
    dice = {s: float(v) for s, v in zip(EVAL_STEPS, rng.uniform(0.5, 0.8, 3) + 0.1 * with_dice)}
    miou = {s: float(v) for s, v in zip(EVAL_STEPS, rng.uniform(0.3, 0.6, 3) + 0.1 * with_dice)}
    records = [{"step": 0, "num_params": 1000}]
    last_wall = 100.0 + run.seed + 20.0 * with_dice  # wall_seconds of the last write
    wall = last_wall
    if not with_dice and run.seed == 1:
      # Interrupted after its step-20 eval at 40 s, resumed from a step-10 checkpoint: the
      # steps from 10 on are written twice and the later values count; wall time 40 + 70 s.
      records += [{"step": 10, "train/loss": 1.0, "wall_seconds": 20.0},
                  {"step": 10, "eval/dice": 0.1, "eval/miou": 0.1, "wall_seconds": 21.0},
                  {"step": 20, "eval/dice": 0.99, "eval/miou": 0.99, "wall_seconds": 40.0},
                  {"step": 10, "num_params": 1000}]
      last_wall, wall = 70.0, 110.0
    for step in EVAL_STEPS:
      records.append({"step": step, "train/loss": 0.5, "wall_seconds": last_wall * step / 31})
      records.append({"step": step, "eval/dice": dice[step], "eval/miou": miou[step],
                      "wall_seconds": last_wall * step / 30})
    finished = not (run.overrides["loss.name"] == "ce+dice" and run.seed == 2)
    if not finished:
      records = records[:-2]  # killed before its last evaluation
    os.makedirs(run.workdir)
    with open(os.path.join(run.workdir, "config.json"), "w") as f:
      json.dump({"num_train_steps": 30}, f)
    with open(os.path.join(run.workdir, "metrics.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)
    if finished:
      truth.setdefault(run.variant, []).append({"dice": dice, "miou": miou, "wall": wall})
  paths = sweep.report(sweep_dir)
  return sweep_dir, truth, paths


def test_report_numbers_equal_each_runs_metrics(synthetic_sweep):
  sweep_dir, truth, paths = synthetic_sweep
  assert set(paths) == {"markdown", "csv", "plot"}
  with open(os.path.join(sweep_dir, "results.csv")) as f:
    rows = {row["variant"]: row for row in csv.DictReader(f)}
  assert list(rows) == ["loss.name=ce", "loss.name=ce+dice"]
  for variant, runs in truth.items():
    row = rows[variant]
    assert int(row["seeds_finished"]) == len(runs) and int(row["seeds_total"]) == 3
    assert int(row["steps"]) == 30 and int(row["num_params"]) == 1000
    for metric, key in (("eval/dice", "dice"), ("eval/miou", "miou")):
      finals = [r[key][30] for r in runs]
      bests = [max(r[key].values()) for r in runs]
      assert float(row[f"{metric} final mean"]) == pytest.approx(statistics.mean(finals), abs=1e-12)
      assert float(row[f"{metric} final std"]) == pytest.approx(statistics.stdev(finals), abs=1e-12)
      assert float(row[f"{metric} best mean"]) == pytest.approx(statistics.mean(bests), abs=1e-12)
      assert float(row[f"{metric} best std"]) == pytest.approx(statistics.stdev(bests), abs=1e-12)
    walls = [r["wall"] for r in runs]
    assert float(row["wall_seconds mean"]) == pytest.approx(statistics.mean(walls))
  # The resumed run counts its later values, not 0.99 from before the restart.
  assert all(max(r["dice"].values()) < 0.99 for r in truth["loss.name=ce"])
  assert [r["wall"] for r in truth["loss.name=ce"]] == [100.0, 110.0, 102.0]
  for variant, columns in _expected_best(truth).items():
    assert rows[variant]["best_in"] == ";".join(columns)


def _expected_best(truth):
  """{variant: [columns where its mean is the highest (metrics) or lowest (wall time)]}."""
  columns = {f"eval/{m} {kind}": (lambda r, m=m, kind=kind:
                                   r[m][30] if kind == "final" else max(r[m].values()))
             for m in ("dice", "miou") for kind in ("final", "best")}
  out = {v: [] for v in truth}
  for column, value in columns.items():
    means = {v: statistics.mean(value(r) for r in runs) for v, runs in truth.items()}
    out[max(means, key=means.get)].append(column)
  walls = {v: statistics.mean(r["wall"] for r in runs) for v, runs in truth.items()}
  out[min(walls, key=walls.get)].append("wall_seconds")
  return out


def test_markdown_marks_the_best_mean_per_column(synthetic_sweep):
  sweep_dir, truth, _ = synthetic_sweep
  lines = open(os.path.join(sweep_dir, "results.md")).read().splitlines()
  table = [l for l in lines if l.startswith("|")]
  assert table[0] == ("| loss.name | seeds | steps | final eval/dice | best eval/dice | "
                      "final eval/miou | best eval/miou | wall time | params |")
  cells = {}
  for row in table[2:]:
    parts = row.strip("| ").split(" | ")
    cells[parts[0]] = parts
  dice = [r["dice"][30] for r in truth["loss.name=ce+dice"]]
  text = f"{statistics.mean(dice):.4f} ± {statistics.stdev(dice):.4f}"
  best = "eval/dice final" in _expected_best(truth)["loss.name=ce+dice"]
  assert cells["ce+dice"][1:4] == ["2/3", "30", f"**{text}**" if best else text]
  assert cells["ce"][7] == "**104 ± 5 s**"  # walls 100, 110, 102 s; ce+dice 120, 121 s
  assert cells["ce"][8] == "1,000"
  header = table[0].strip("| ").split(" | ")
  marked = {column for parts in cells.values() for column, cell in zip(header, parts)
            if cell.startswith("**")}
  assert len(marked) == 5  # four metric columns and wall time, each marked once


def test_plot_is_a_png_of_the_expected_size_with_both_variants(synthetic_sweep):
  sweep_dir, _, _ = synthetic_sweep
  with Image.open(os.path.join(sweep_dir, "curves.png")) as image:
    assert image.format == "PNG"
    assert image.size == (1200, 450)
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
  for color in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):  # the first two default line colours
    assert (np.abs(pixels - color).sum(axis=1) < 30).sum() > 200, color


# ---------------------------------------------------------------------------- end to end

def test_tiny_sweep_end_to_end(data_dir, tmp_path, monkeypatch):
  """One real run (a main.py process): main.py parses the command the sweep builds, the
  report reads what train.py writes, and a second pass skips the finished run."""
  config_file = tmp_path / "tiny_sweep.py"
  config_file.write_text(
      f"import sys\nsys.path.insert(0, {REPO!r})\nfrom tests.conftest import tiny_config\n\n"
      f"def get_config():\n  config = tiny_config({data_dir!r})\n"
      "  config.num_train_steps = 4\n  config.eval_every_steps = 2\n"
      "  config.checkpoint_every_steps = 2\n  config.num_eval_visuals = 0\n  return config\n")
  base = tiny_config(data_dir)
  base.num_train_steps, base.eval_every_steps, base.checkpoint_every_steps = 4, 2, 2
  base.num_eval_visuals = 0
  sweep_dir = tmp_path / "sw"
  axes, seeds = {"model.upsample": ["resize"]}, [0]
  runs = sweep.plan(axes, seeds, str(sweep_dir))
  assert sweep.execute(runs, base, str(config_file), {}) == []
  sweep.write_spec(str(sweep_dir), {"axes": axes, "seeds": seeds, "metrics": ["eval/dice"]})
  sweep.report(str(sweep_dir))

  workdir = sweep_dir / "model.upsample=resize" / "seed=0"
  records = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  dice = {r["step"]: r["eval/dice"] for r in records if "eval/dice" in r}
  assert sorted(dice) == [2, 4]
  with open(sweep_dir / "results.csv") as f:
    (row,) = list(csv.DictReader(f))
  assert float(row["eval/dice final mean"]) == dice[4]
  assert float(row["eval/dice best mean"]) == max(dice.values())
  assert float(row["wall_seconds mean"]) == max(r["wall_seconds"] for r in records
                                                if "wall_seconds" in r) > 0
  # Parameters of the tiny U-Net with resize upsampling, counted from the model's shapes.
  import jax
  from seg_jax import models
  config = tiny_config(data_dir)
  config.model.upsample = "resize"
  model = models.build_model(config)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                          jax.ShapeDtypeStruct((1, 32, 32, 3), jax.numpy.float32))
  assert int(row["num_params"]) == sum(int(np.prod(x.shape))
                                       for x in jax.tree.leaves(shapes["params"]))
  assert (sweep_dir / "curves.png").exists()

  monkeypatch.setattr(sweep, "_run_process", lambda *a: pytest.fail("a finished run was started"))
  assert sweep.execute(runs, base, str(config_file), {}) == []


# ---------------------------------------------------------------------------- --report by hand

# A sweep directory written here by hand: {variant dir: {seed: (dice, train loss, wall seconds)}}
# with dice and loss as {step: value} at the evaluations (steps 10 and 20 of 20).
HAND_RUNS = {
    "loss.name=ce,optimizer.learning_rate=0.001": {
        0: ({10: 0.60, 20: 0.70}, {10: 0.6, 20: 0.9}, 100.0),
        1: ({10: 0.65, 20: 0.68}, {10: 1.1, 20: 0.95}, 110.0),
        2: ({10: 0.72, 20: 0.71}, {10: 0.5, 20: 1.0}, 120.0)},
    "loss.name=ce,optimizer.learning_rate=0.003": {
        0: ({10: 0.75, 20: 0.80}, {10: 1.0, 20: 0.7}, 90.0),
        1: ({10: 0.78, 20: 0.74}, {10: 0.9, 20: 0.85}, 95.0),
        2: ({10: 0.70, 20: 0.77}, {10: 1.3, 20: 0.6}, 130.0)},
    "loss.name=ce+dice,optimizer.learning_rate=0.001": {   # one of three seeds finished
        0: ({10: 0.50, 20: 0.55}, {10: 1.5, 20: 1.4}, 80.0)},
    "loss.name=ce+dice,optimizer.learning_rate=0.003": {},  # none finished
}


def _write_hand_run(workdir, dice, loss, wall, *, last_step=20):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"num_train_steps": 20}, f)
  records = [{"step": 0, "num_params": 1234567}]
  for step in (10, 20)[:1 + (last_step == 20)]:
    records.append({"step": step, "train/loss": loss[step], "wall_seconds": wall * step / 21})
    records.append({"step": step, "eval/dice": dice[step], "eval/miou": 0.1,
                    "wall_seconds": wall * step / 20})
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


def _expected_table(runs_by_variant):
  """results.md's table, computed here with numpy from HAND_RUNS-like data."""
  columns = {  # column -> (value of one run, lower is better)
      "final eval/dice": (lambda d, l, w: d[20], False),
      "best eval/dice": (lambda d, l, w: max(d.values()), False),
      "final train/loss": (lambda d, l, w: l[20], True),
      "best train/loss": (lambda d, l, w: min(l.values()), True),
      "wall time": (lambda d, l, w: w, True)}
  stats = {}
  for variant, runs in runs_by_variant.items():
    for column, (value, _) in columns.items():
      values = np.array([value(*run) for run in runs.values()])
      stats[variant, column] = ((values.mean(), values.std(ddof=1) if len(values) > 1 else None)
                                if len(values) else None)
  best = {}
  for column, (_, lower) in columns.items():
    means = {v: stats[v, column][0] for v in runs_by_variant if stats[v, column]}
    best[column] = (min if lower else max)(means.values())
  lines = ["| loss.name | optimizer.learning_rate | seeds | steps | final eval/dice | "
           "best eval/dice | final train/loss | best train/loss | wall time | params |",
           "|" + "---|" * 10]
  for variant, runs in runs_by_variant.items():
    loss_name, lr = (part.split("=")[1] for part in variant.split(","))
    cells = [loss_name, lr, f"{len(runs)}/3", "20" if runs else "—"]
    for column in columns:
      if stats[variant, column] is None:
        cells.append("—")
        continue
      mean, std = stats[variant, column]
      digits, unit = (0, " s") if column == "wall time" else (4, "")
      text = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "") + unit
      cells.append(f"**{text}**" if mean == best[column] else text)
    cells.append("1,234,567" if runs else "—")
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def test_report_flag_rewrites_the_table_of_a_hand_made_sweep(tmp_path):
  """`python -m seg_jax.sweep --workdir=DIR --report` on a sweep directory written by hand
  (the README's layout DIR/<key=value,...>/seed=N/): the table's means and sample stds are
  numpy's over the finished seeds; an unfinished or unstarted seed does not count. A second
  --report after one more run finished rewrites it."""
  sweep_dir = tmp_path / "sweep"
  sweep_dir.mkdir()
  (sweep_dir / "sweep.json").write_text(json.dumps({
      "axes": {"loss.name": ["ce", "ce+dice"], "optimizer.learning_rate": [0.001, 0.003]},
      "seeds": [0, 1, 2], "metrics": ["eval/dice", "eval/miou"]}))
  for variant, runs in HAND_RUNS.items():
    for seed, run in runs.items():
      _write_hand_run(sweep_dir / variant / f"seed={seed}", *run)
  # Not finished: stopped after its step-10 evaluation; a workdir with nothing in it.
  _write_hand_run(sweep_dir / "loss.name=ce+dice,optimizer.learning_rate=0.001" / "seed=1",
                  {10: 0.99}, {10: 0.01}, 5.0, last_step=10)
  (sweep_dir / "loss.name=ce+dice,optimizer.learning_rate=0.001" / "seed=2").mkdir()
  (sweep_dir / "results.md").write_text("stale\n")

  def report_table():
    result = _cli(f"--workdir={sweep_dir}", "--report", "--metrics=eval/dice,train/loss")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["wrote", str(sweep_dir / "results.md"), "wrote",
                                     str(sweep_dir / "results.csv"), "wrote",
                                     str(sweep_dir / "curves.png")]
    return [l for l in (sweep_dir / "results.md").read_text().splitlines() if l.startswith("|")]

  expected = _expected_table(HAND_RUNS)
  assert all("**" in line for line in expected[2:5])  # each finished variant is best somewhere
  assert report_table() == expected
  with open(sweep_dir / "results.csv") as f:
    rows = {row["variant"]: row for row in csv.DictReader(f)}
  finals = np.array([d[20] for d, _, _ in HAND_RUNS[next(iter(HAND_RUNS))].values()])
  row = rows[next(iter(HAND_RUNS))]
  assert float(row["eval/dice final mean"]) == pytest.approx(finals.mean(), rel=1e-12)
  assert float(row["eval/dice final std"]) == pytest.approx(finals.std(ddof=1), rel=1e-12)

  # One more run finishes: --report alone picks it up.
  late = ({10: 0.40, 20: 0.45}, {10: 2.0, 20: 1.8}, 300.0)
  _write_hand_run(sweep_dir / "loss.name=ce+dice,optimizer.learning_rate=0.003" / "seed=1", *late)
  now = {**HAND_RUNS, "loss.name=ce+dice,optimizer.learning_rate=0.003": {1: late}}
  assert report_table() == _expected_table(now)


# ---------------------------------------------------------------------------- against a baseline

COUNT_KINDS = ("intersection", "truth", "predicted")


def _counts_from_confusions(confusions):
  """Per-image counts [N, K] from per-image confusion matrices [N, K, K] (rows = truth)."""
  return {"intersection": np.einsum("nkk->nk", confusions), "truth": confusions.sum(2),
          "predicted": confusions.sum(1)}


def _random_confusions(rng, images, classes, skew=0.0):
  """[N, K, K] pixel counts; class K-1 never occurs (its scores are NaN and left out)."""
  confusions = rng.integers(0, 30, (images, classes, classes))
  confusions[:, np.arange(classes), np.arange(classes)] += int(200 * (1 + skew))
  confusions[:, -1, :] = 0
  confusions[:, :, -1] = 0
  return confusions


def test_metrics_recomputed_from_counts_equal_the_confusion_matrix_scores():
  from seg_jax import metrics
  rng = np.random.default_rng(0)
  confusions = _random_confusions(rng, 7, 4)
  counts = _counts_from_confusions(confusions)
  scores = metrics.scores_from_confusion(confusions.sum(0))
  classes = ["bg", "a", "b", "never"]
  summed = [counts[k].sum(0) for k in COUNT_KINDS]
  for metric, want in (("eval/dice", scores["mean_dice"]), ("eval/miou", scores["mean_jaccard"]),
                       ("eval/jaccard", scores["mean_jaccard"]),
                       ("eval/pixel_accuracy", scores["pixel_accuracy"]),
                       ("eval/dice_foreground", scores["mean_dice_foreground"]),
                       ("eval/miou_foreground", scores["mean_jaccard_foreground"]),
                       ("eval/dice/a", scores["dice"][1]), ("eval/iou/b", scores["jaccard"][2])):
    assert sweep_report.metric_from_counts(metric, classes, *summed) == pytest.approx(want,
                                                                                       rel=1e-12)
  with pytest.raises(sweep_report.ReportError, match="eval/box_AP cannot be recomputed"):
    sweep_report.metric_from_counts("eval/box_AP", classes, *summed)


def _pixel_accuracy_run(correct, pixels=100):
  """Per-image counts of a 2-class run in which image i has correct[i] of `pixels` right."""
  correct = np.asarray(correct)
  truth = np.stack([np.full_like(correct, pixels), np.zeros_like(correct)], 1)
  return {"id": [f"img{i}" for i in range(len(correct))], "classes": ["bg", "fg"],
          "intersection": np.stack([correct, np.zeros_like(correct)], 1), "truth": truth,
          "predicted": np.stack([correct, pixels - correct], 1)}


def test_paired_bootstrap_on_a_hand_computed_case():
  """Pixel accuracy, two images of 100 pixels. Seed 0: baseline 50 and 50 right, variant 60 and
  80: the redrawn pairs {1,1}, {1,2}, {2,2} (chances 1/4, 1/2, 1/4) differ by 0.10, 0.20, 0.30.
  Seed 1: the same in both runs (difference 0). Stratified by seed and averaged, the draws are
  0.05, 0.10, 0.15 with chances 1/4, 1/2, 1/4: interval [0.05, 0.15], estimate 0.10, and no draw
  <= 0, so p = 2 / (R + 1)."""
  baseline = [_pixel_accuracy_run([50, 50]), _pixel_accuracy_run([70, 30])]
  variant = [_pixel_accuracy_run([60, 80]), _pixel_accuracy_run([70, 30])]
  estimate, low, high, p, draws = sweep_report.paired_bootstrap("eval/pixel_accuracy", baseline,
                                                               variant, resamples=4000)
  assert estimate == pytest.approx(0.10)
  assert (low, high) == (pytest.approx(0.05), pytest.approx(0.15))
  assert p == pytest.approx(2 / 4001)
  shares = [np.mean(np.isclose(draws, v)) for v in (0.05, 0.10, 0.15)]
  assert shares == pytest.approx([0.25, 0.5, 0.25], abs=0.03)
  # No difference at all: every draw is 0, the interval [0, 0], p = 1, not significant.
  estimate, low, high, p, _ = sweep_report.paired_bootstrap("eval/pixel_accuracy", baseline,
                                                            baseline, resamples=500)
  assert (estimate, low, high, p) == (0.0, 0.0, 0.0, 1.0)


def test_paired_bootstrap_agrees_with_scipy_bootstrap():
  """One seed, mean Dice over classes (a ratio of sums, no closed form): the interval of
  scipy.stats.bootstrap (paired by resampling image indices, percentile method) within Monte
  Carlo error of ours."""
  from scipy import stats
  rng = np.random.default_rng(1)
  a = _counts_from_confusions(_random_confusions(rng, 30, 3))
  b = _counts_from_confusions(_random_confusions(rng, 30, 3, skew=0.1))
  run = lambda counts: {"id": [str(i) for i in range(30)], "classes": ["x", "y", "z"], **counts}
  estimate, low, high, _, _ = sweep_report.paired_bootstrap("eval/dice", [run(a)], [run(b)])

  def dice(counts, rows):  # rows [..., images] -> [...]
    i, t, p = (counts[k][rows].sum(-2).astype(float) for k in COUNT_KINDS)
    with np.errstate(invalid="ignore"):
      return np.nanmean(2 * i / (t + p), axis=-1)

  statistic = lambda rows, axis=-1: dice(b, rows) - dice(a, rows)
  result = stats.bootstrap((np.arange(30),), statistic, vectorized=True, method="percentile",
                           n_resamples=10000, confidence_level=0.95, random_state=3)
  assert estimate == pytest.approx(statistic(np.arange(30)), rel=1e-12)
  width = high - low
  assert width > 0
  assert result.confidence_interval.low == pytest.approx(low, abs=0.1 * width)
  assert result.confidence_interval.high == pytest.approx(high, abs=0.1 * width)


def test_paired_bootstrap_interval_is_close_to_the_paired_t_interval():
  """Equal pixel counts per image make pixel accuracy the mean of per-image accuracies, so the
  classical paired t-test applies: same centre, width within the bootstrap's known shrinkage
  (sqrt((n-1)/n) and z vs t quantiles), the same verdict."""
  from scipy import stats
  rng = np.random.default_rng(2)
  a = rng.integers(60, 90, 40)
  b = np.clip(a + rng.integers(-6, 12, 40), 0, 100)
  estimate, low, high, p, _ = sweep_report.paired_bootstrap(
      "eval/pixel_accuracy", [_pixel_accuracy_run(a)], [_pixel_accuracy_run(b)])
  t = stats.ttest_rel(b / 100, a / 100)
  interval = t.confidence_interval(0.95)
  assert estimate == pytest.approx(np.mean(b - a) / 100, rel=1e-12)
  assert (low + high) / 2 == pytest.approx((interval.low + interval.high) / 2,
                                           abs=0.1 * (interval.high - interval.low))
  assert 0.85 < (high - low) / (interval.high - interval.low) < 1.05
  assert (p < 0.05) == (t.pvalue < 0.05) and (low > 0) == (interval.low > 0)


def _write_per_image(workdir, step, counts, classes):
  """WORKDIR/eval/per_image_step_<step>.csv in the layout seg_jax/tasks/semantic.py writes."""
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  with open(os.path.join(workdir, "eval", f"per_image_step_{step}.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["image_id", "pixels", "mean_dice", "mean_iou",
                     *(f"{k}/{c}" for c in classes for k in COUNT_KINDS)])
    for n in range(len(counts["truth"])):
      writer.writerow([f"val_{n}", 0, "", "", *(counts[k][n, c] for c in range(len(classes))
                                                for k in COUNT_KINDS)])


def test_report_against_a_baseline_writes_the_differences_and_a_forest_plot(tmp_path):
  """Two loss variants x two seeds with per-image results: results.md and results.csv give the
  variant's difference (the mean over seeds of the eval/dice difference, computed here with
  numpy), an interval around it, the mark where it excludes 0; curves.png gains a panel."""
  sweep_dir = str(tmp_path)
  axes = {"loss.name": ["ce", "ce+dice"]}
  sweep.write_spec(sweep_dir, {"axes": axes, "seeds": [0, 1], "metrics": ["eval/dice"],
                               "baseline": "loss.name=ce"})
  rng = np.random.default_rng(4)
  classes = ["bg", "a", "b"]
  finals = {}
  for run in sweep.plan(axes, [0, 1], sweep_dir):
    counts = _counts_from_confusions(_random_confusions(
        rng, 20, 3, skew=0.5 * (run.overrides["loss.name"] == "ce+dice")))
    i, t, p = (counts[k].sum(0).astype(float) for k in COUNT_KINDS)
    with np.errstate(invalid="ignore"):
      finals[run.variant, run.seed] = np.nanmean(np.where(t + p > 0, 2 * i / (t + p), np.nan))
    _write_hand_run(run.workdir, {10: 0.1, 20: finals[run.variant, run.seed]}, {10: 1, 20: 1}, 9)
    _write_per_image(run.workdir, 20, counts, classes)
  paths = sweep.report(sweep_dir)
  want = np.mean([finals["loss.name=ce+dice", s] - finals["loss.name=ce", s] for s in (0, 1)])
  with open(paths["csv"]) as f:
    rows = {row["variant"]: row for row in csv.DictReader(f)}
  row = rows["loss.name=ce+dice"]
  assert row["baseline"] == "loss.name=ce" and row["paired seeds"] == "2"
  assert float(row["difference"]) == pytest.approx(want, rel=1e-9)
  low, high = float(row["difference low"]), float(row["difference high"])
  assert low < want < high and 0 < float(row["p value"]) <= 1
  assert row["significant"] == str(low > 0 or high < 0)
  assert rows["loss.name=ce"]["difference"] == ""
  markdown = open(paths["markdown"]).read()
  assert "paired bootstrap over eval images stratified by seed" in markdown
  line = next(l for l in markdown.splitlines() if l.startswith("| loss.name=ce+dice | "))
  assert f"{want:+.4f}" in line and f"[{low:+.4f}, {high:+.4f}]" in line
  assert line.rstrip(" |").endswith("✱") == (low > 0 or high < 0)
  with Image.open(paths["plot"]) as image:
    assert image.size == (1700, 450)
  with pytest.raises(sweep.SweepError, match=r"--baseline=loss.name=dice: dice is not a value "
                     r"of loss.name \(ce, ce\+dice\)"):
    sweep.report(sweep_dir, baseline="loss.name=dice")
  with pytest.raises(sweep.SweepError, match="model.norm is not an axis of this sweep"):
    sweep.report(sweep_dir, baseline="model.norm=batch")
