"""Results of a sweep: each run's metrics.jsonl -> one row per variant, a table and curves.

Host-side only, no jax: it reads what `train.train_and_evaluate` wrote into
each run's workdir (config.json, metrics.jsonl) and nothing else, so it works
the same for runs the sweep ran itself and for runs a cluster scheduler ran
from `--print_commands`.

A run counts once it is *finished*: metrics.jsonl holds an evaluation at the
run's `num_train_steps` (from its config.json). Unfinished runs (interrupted,
failed, still running) are left out of the numbers, and the table says how
many seeds each row averages.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import statistics
from typing import Any, Sequence

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
DEFAULT_METRICS = ("eval/dice", "eval/miou")
FIGURE_SIZE_INCHES = (12.0, 4.5)
FIGURE_DPI = 100


class ReportError(ValueError):
  """The report cannot be made as asked (e.g. a metric no run wrote); the message is one line."""


@dataclasses.dataclass
class RunResult:
  """What the report needs from one finished run."""
  steps: int                           # num_train_steps, the step of the final evaluation
  curves: dict[str, dict[int, float]]  # metric -> {eval step: value}; NaN where null
  wall_seconds: float | None           # summed over restarts; None if not recorded
  num_params: int | None


@dataclasses.dataclass
class Variant:
  """One row of the table: a set of config overrides and the workdir of each seed's run."""
  name: str
  overrides: dict[str, Any]
  run_dirs: list[str]


# ---------------------------------------------------------------------------- one run

def read_records(workdir: str) -> list[dict]:
  """metrics.jsonl in file order ([] if absent); a torn last line (killed mid-write) is skipped."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  records = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def planned_steps(workdir: str) -> int | None:
  """num_train_steps from the run's config.json, or None before the run started."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return int(json.load(f)["num_train_steps"])


def _final_eval_written(records: list[dict], steps: int) -> bool:
  return any(r.get("step") == steps and any(k.startswith("eval/") for k in r) for r in records)


def is_finished(workdir: str) -> bool:
  """True once metrics.jsonl holds an evaluation at the run's num_train_steps."""
  steps = planned_steps(workdir)
  return steps is not None and _final_eval_written(read_records(workdir), steps)


def curve(records: list[dict], metric: str) -> dict[int, float]:
  """{step: value} of `metric`; a step written twice (re-done after a resume) keeps the later value."""
  out = {}
  for r in records:
    if metric in r:
      out[int(r["step"])] = math.nan if r[metric] is None else float(r[metric])
  return dict(sorted(out.items()))


def wall_seconds(records: list[dict]) -> float | None:
  """Total wall time of a run over all its processes.

  Each call of train_and_evaluate writes `num_params` first and then
  `wall_seconds` counted from its own start, so the run's time is the sum,
  over the segments that `num_params` opens, of each segment's last
  `wall_seconds` (an interrupted process counts up to its last write).
  """
  segments: list[float] = []
  for r in records:
    if "num_params" in r or not segments:
      segments.append(0.0)
    if r.get("wall_seconds") is not None:
      segments[-1] = max(segments[-1], float(r["wall_seconds"]))
  return sum(segments) if any(segments) else None


def read_run(workdir: str, metrics: Sequence[str]) -> RunResult | None:
  """The finished run in `workdir`, or None if it has not finished."""
  steps = planned_steps(workdir)
  records = read_records(workdir)
  if steps is None or not _final_eval_written(records, steps):
    return None
  params = [r["num_params"] for r in records if r.get("num_params") is not None]
  return RunResult(steps=steps, curves={m: curve(records, m) for m in metrics},
                   wall_seconds=wall_seconds(records),
                   num_params=int(params[-1]) if params else None)


# ---------------------------------------------------------------------------- statistics

def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (n-1); std is NaN for fewer than two values."""
  if not values:
    return math.nan, math.nan
  mean = statistics.fmean(values)
  return mean, (statistics.stdev(values) if len(values) > 1 else math.nan)


def lower_is_better(metric: str) -> bool:
  return "loss" in metric


def _best_over_evals(values: dict[int, float], metric: str) -> float:
  finite = [v for v in values.values() if math.isfinite(v)]
  if not finite:
    return math.nan
  return min(finite) if lower_is_better(metric) else max(finite)


def summarize(variants: Sequence[Variant], metrics: Sequence[str]) -> list[dict[str, Any]]:
  """One dict per variant: seeds, steps, (mean, std) of final/best metrics and wall time, params."""
  rows = []
  for variant in variants:
    runs = [r for r in (read_run(d, metrics) for d in variant.run_dirs) if r is not None]
    row: dict[str, Any] = {"variant": variant.name, "overrides": variant.overrides,
                           "seeds_finished": len(runs), "seeds_total": len(variant.run_dirs),
                           "runs": runs}
    row["steps"] = max((r.steps for r in runs), default=None)
    for m in metrics:
      finals = [r.curves[m].get(r.steps, math.nan) for r in runs]
      row[f"{m} final"] = mean_std(finals)
      row[f"{m} best"] = mean_std([_best_over_evals(r.curves[m], m) for r in runs])
    row["wall_seconds"] = mean_std([r.wall_seconds for r in runs if r.wall_seconds is not None])
    row["num_params"] = next((r.num_params for r in runs if r.num_params is not None), None)
    rows.append(row)
  return rows


def best_rows(rows: list[dict[str, Any]], column: str, lower: bool) -> set[int]:
  """Indices of the rows whose mean in `column` is best (ties all marked); none for < 2 rows."""
  means = [(i, row[column][0]) for i, row in enumerate(rows) if math.isfinite(row[column][0])]
  if len(means) < 2:
    return set()
  target = (min if lower else max)(m for _, m in means)
  return {i for i, m in means if m == target}


def _stat_columns(metrics: Sequence[str]) -> list[tuple[str, bool]]:
  """(column, lower is better) of every column that gets a best mark."""
  columns = []
  for m in metrics:
    columns += [(f"{m} final", lower_is_better(m)), (f"{m} best", lower_is_better(m))]
  return columns + [("wall_seconds", True)]


# ---------------------------------------------------------------------------- table files

def _format_stat(stat: tuple[float, float], digits: int, unit: str = "") -> str:
  mean, std = stat
  if not math.isfinite(mean):
    return "—"
  text = f"{mean:.{digits}f}"
  if math.isfinite(std):
    text += f" ± {std:.{digits}f}"
  return text + unit


def write_csv(path: str, rows: list[dict[str, Any]], metrics: Sequence[str]) -> None:
  """Machine-readable table: one column per axis key, means and stds as separate numbers."""
  keys = list(rows[0]["overrides"]) if rows else []
  marks = {c: best_rows(rows, c, lower) for c, lower in _stat_columns(metrics)}
  header = ["variant", *keys, "seeds_finished", "seeds_total", "steps"]
  for m in metrics:
    for kind in ("final", "best"):
      header += [f"{m} {kind} mean", f"{m} {kind} std"]
  header += ["wall_seconds mean", "wall_seconds std", "num_params", "best_in"]
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    for i, row in enumerate(rows):
      line = [row["variant"], *(row["overrides"][k] for k in keys), row["seeds_finished"],
              row["seeds_total"], "" if row["steps"] is None else row["steps"]]
      for column, _ in _stat_columns(metrics):
        line += ["" if not math.isfinite(v) else repr(v) for v in row[column]]
      line += ["" if row["num_params"] is None else row["num_params"],
               ";".join(c for c, _ in _stat_columns(metrics) if i in marks[c])]
      writer.writerow(line)


def markdown_table(rows: list[dict[str, Any]], metrics: Sequence[str]) -> str:
  keys = list(rows[0]["overrides"]) if rows else []
  marks = {c: best_rows(rows, c, lower) for c, lower in _stat_columns(metrics)}
  header = [*(keys or ["variant"]), "seeds", "steps"]
  header += [f"{kind} {m}" for m in metrics for kind in ("final", "best")]
  header += ["wall time", "params"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for i, row in enumerate(rows):
    cells = [str(row["overrides"][k]) for k in keys] if keys else [row["variant"]]
    cells += [f"{row['seeds_finished']}/{row['seeds_total']}",
              "—" if row["steps"] is None else str(row["steps"])]
    for column, _ in _stat_columns(metrics):
      text = (_format_stat(row[column], 0, " s") if column == "wall_seconds"
              else _format_stat(row[column], 4))
      cells.append(f"**{text}**" if i in marks[column] else text)
    cells.append("—" if row["num_params"] is None else f"{row['num_params']:,}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_markdown(path: str, rows: list[dict[str, Any]], metrics: Sequence[str],
                   description: str = "") -> None:
  seeds = max((row["seeds_total"] for row in rows), default=0)
  legend = (f"Mean ± sample standard deviation (n−1) over the finished seeds (of {seeds} per "
            "variant); **bold**: the best mean in its column. *final*: at the last step; "
            "*best*: the best value over all evaluations of a run, chosen on the evaluation "
            "split itself, so optimistic. Wall time: time in train_and_evaluate (data "
            "preparation, compilation, training, evaluations; not Python start-up), summed over "
            "restarts. Params: trainable parameters.")
  with open(path, "w", encoding="utf-8") as f:
    f.write("# Sweep results\n\n")
    if description:
      f.write(description.strip() + "\n\n")
    f.write(legend + "\n\n" + markdown_table(rows, metrics) + "\n")


# ---------------------------------------------------------------------------- plot

def labels(variants: Sequence[Variant]) -> list[str]:
  """Legend labels: `loss.name=ce+dice, model.norm=group` (the values unescaped)."""
  return [", ".join(f"{k}={v}" for k, v in variant.overrides.items()) or variant.name
          for variant in variants]


def plot_curves(path: str, variants: Sequence[Variant], rows: list[dict[str, Any]],
                metric: str) -> None:
  """Left: `metric` against step per variant (mean line, min-max band over seeds).
  Right: the final `metric` per variant (bar: mean, whisker: std, dots: seeds).

  Writes a PNG of exactly FIGURE_SIZE_INCHES * FIGURE_DPI pixels.
  """
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  import numpy as np

  names = labels(variants)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  fig, (ax_curve, ax_bar) = plt.subplots(
      1, 2, figsize=FIGURE_SIZE_INCHES, dpi=FIGURE_DPI, gridspec_kw={"width_ratios": [3, 2]})
  seeds = max((row["seeds_total"] for row in rows), default=0)
  for i, (label, row) in enumerate(zip(names, rows)):
    runs = row["runs"]
    if not runs:
      continue
    color = colors[i % len(colors)]
    steps = sorted(set.intersection(*(set(r.curves[metric]) for r in runs)))
    values = np.array([[r.curves[metric][s] for s in steps] for r in runs])
    ax_curve.plot(steps, values.mean(axis=0), marker="o", markersize=3, color=color, label=label)
    if len(runs) > 1:
      ax_curve.fill_between(steps, values.min(axis=0), values.max(axis=0), color=color,
                            alpha=0.2, linewidth=0)
    mean, std = row[f"{metric} final"]
    ax_bar.barh(i, mean, color=color, alpha=0.8,
                xerr=std if math.isfinite(std) else None, capsize=4)
    finals = [r.curves[metric].get(r.steps, math.nan) for r in runs]
    ax_bar.plot(finals, [i] * len(finals), "k.", markersize=6)
  ax_curve.set_xlabel("step")
  ax_curve.set_ylabel(metric)
  ax_curve.set_title(f"{metric} during training (line: mean, band: min–max over "
                     f"{seeds} seed{'s' if seeds != 1 else ''})", fontsize=10)
  ax_curve.grid(alpha=0.3)
  if any(row["runs"] for row in rows):
    ax_curve.legend(fontsize=8, loc="best")
  ax_bar.set_yticks(range(len(names)), [f"{label}\n{_format_stat(row[f'{metric} final'], 4)}"
                                        for label, row in zip(names, rows)], fontsize=8)
  ax_bar.invert_yaxis()
  finite = [v for row in rows for r in row["runs"] for v in [r.curves[metric].get(r.steps)]
            if v is not None and math.isfinite(v)]
  if finite:  # zoom to the data: differences between variants are often in the 2nd decimal
    lo, hi = min(finite), max(finite)
    pad = max(0.3 * (hi - lo), 0.01)
    ax_bar.set_xlim(lo - pad, hi + pad)
  ax_bar.set_xlabel(f"final {metric} (axis zoomed to the data)")
  ax_bar.set_title("final value (bar: mean, whisker: std, dots: seeds)", fontsize=10)
  ax_bar.grid(alpha=0.3, axis="x")
  fig.tight_layout()
  fig.savefig(path, dpi=FIGURE_DPI)
  plt.close(fig)


# ---------------------------------------------------------------------------- all of it

def write_report(sweep_dir: str, variants: Sequence[Variant], metrics: Sequence[str],
                 description: str = "") -> dict[str, str]:
  """Writes results.md, results.csv and (once some run finished) curves.png into `sweep_dir`.

  `metrics[0]` is the one plotted. Returns {kind: path} of the files written.
  """
  rows = summarize(variants, metrics)
  runs = [run for row in rows for run in row["runs"]]
  for metric in metrics:
    if runs and not any(run.curves[metric] for run in runs):
      written = sorted({k for d in variants for w in d.run_dirs for r in read_records(w)
                        for k in r if k.startswith("eval/") and k.count("/") == 1})
      raise ReportError(f"metric {metric!r} is in no finished run's {METRICS_FILE}; "
                        f"eval metrics there: {', '.join(written)}")
  paths = {"markdown": os.path.join(sweep_dir, "results.md"),
           "csv": os.path.join(sweep_dir, "results.csv")}
  write_markdown(paths["markdown"], rows, metrics, description)
  write_csv(paths["csv"], rows, metrics)
  if any(row["runs"] for row in rows):
    paths["plot"] = os.path.join(sweep_dir, "curves.png")
    plot_curves(paths["plot"], variants, rows, metrics[0])
  return paths
