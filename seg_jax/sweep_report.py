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

import numpy as np

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
PER_IMAGE_FILE = os.path.join("eval", "per_image_step_{step}.csv")  # train.write_per_image
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # the report is the same every time it is written
CONFIDENCE = 0.95
DEFAULT_METRICS = ("eval/dice", "eval/miou")
FIGURE_SIZE_INCHES = (12.0, 4.5)
FOREST_FIGURE_SIZE_INCHES = (17.0, 4.5)
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


# ---------------------------------------------------------------------------- differences

@dataclasses.dataclass
class Difference:
  """variant minus baseline in one metric, paired over seeds and eval images."""
  variant: str
  baseline: str
  metric: str
  seeds: list[int]        # seeds both finished, with per-image results
  images: int             # eval images per seed
  estimate: float         # mean over seeds of (variant - baseline) on all images
  low: float              # CONFIDENCE interval of the paired bootstrap (percentile)
  high: float
  p_value: float          # two-sided, from the bootstrap distribution
  draws: np.ndarray       # the bootstrap distribution of the difference [BOOTSTRAP_RESAMPLES]

  @property
  def significant(self) -> bool:
    """The interval excludes 0."""
    return self.low > 0 or self.high < 0


BOOTSTRAP_METHOD = (
    "Differences: variant − baseline in the first metric, the mean over the seeds both finished "
    "of the difference on the whole eval split (the same seed's runs paired). 95% interval and "
    "two-sided p-value from a paired bootstrap over eval images stratified by seed: "
    f"{BOOTSTRAP_RESAMPLES:,} times, in every seed the same images are drawn with replacement "
    "for both runs and the dataset-level metric is recomputed from the drawn images' pixel "
    "counts (WORKDIR/eval/per_image_step_N.csv); the interval is the 2.5th to 97.5th "
    "percentile of the redrawn differences, p = 2·min(share ≤ 0, share ≥ 0) with a +1 "
    "correction. It measures how much the difference depends on which images were evaluated, "
    "with the trained models fixed: seed-to-seed variation of training is averaged, not "
    "resampled. ✱: the interval excludes 0.")


def read_per_image(path: str) -> dict[str, Any]:
  """A per-image CSV (seg_jax/tasks/semantic.py) as {"id": [N], "classes": [K],
  "intersection"/"truth"/"predicted": int64 [N, K]}."""
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  if not rows:
    raise ReportError(f"{path}: no images")
  classes = [k.split("/", 1)[1] for k in rows[0] if k.startswith("truth/")]
  out = {"id": [r["image_id"] for r in rows], "classes": classes}
  for kind in ("intersection", "truth", "predicted"):
    out[kind] = np.array([[int(r[f"{kind}/{c}"]) for c in classes] for r in rows], np.int64)
  return out


def metric_from_counts(metric: str, classes: Sequence[str], intersection: np.ndarray,
                       truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
  """The dataset-level `metric` from pixel counts summed over images, [..., K] -> [...]; the
  formulas of metrics.scores_from_confusion (classes in neither truth nor prediction left out
  of the means). ReportError for a metric the counts do not define."""
  i, t, p = (np.asarray(a, np.float64) for a in (intersection, truth, predicted))
  with np.errstate(divide="ignore", invalid="ignore"):
    dice = np.where(t + p > 0, 2 * i / (t + p), np.nan)
    iou = np.where(t + p - i > 0, i / (t + p - i), np.nan)

  def nanmean(x):
    present = ~np.isnan(x)
    with np.errstate(divide="ignore", invalid="ignore"):
      return np.where(present.any(-1), np.nansum(x, -1) / present.sum(-1), np.nan)

  name = metric[len("eval/"):] if metric.startswith("eval/") else None
  if name == "dice":
    return nanmean(dice)
  if name in ("jaccard", "miou"):
    return nanmean(iou)
  if name == "dice_foreground":
    return nanmean(dice[..., 1:])
  if name == "miou_foreground":
    return nanmean(iou[..., 1:])
  if name == "pixel_accuracy":
    return i.sum(-1) / t.sum(-1)
  kind, _, cls = (name or "").partition("/")
  if kind in ("dice", "iou") and cls in classes:
    return (dice if kind == "dice" else iou)[..., list(classes).index(cls)]
  raise ReportError(f"{metric} cannot be recomputed from per-image pixel counts (the paired "
                    "bootstrap needs eval/dice, eval/miou, eval/jaccard, eval/pixel_accuracy, "
                    "eval/dice_foreground, eval/miou_foreground, eval/dice/CLASS or eval/iou/CLASS)")


def paired_bootstrap(metric: str, baseline: Sequence[dict], variant: Sequence[dict], *,
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
                     ) -> tuple[float, float, float, float, np.ndarray]:
  """(estimate, low, high, p-value, draws) of mean over seeds of metric(variant) -
  metric(baseline); `baseline[s]` and `variant[s]` are seed s's per-image counts
  (`read_per_image`) on the same images. See BOOTSTRAP_METHOD."""
  rng = np.random.default_rng(seed)
  estimate, draws = 0.0, np.zeros(resamples)
  for a, b in zip(baseline, variant, strict=True):
    if a["id"] != b["id"]:
      raise ReportError("the runs of a pair were evaluated on different images")
    value = lambda run, w: metric_from_counts(
        metric, run["classes"], *(w @ run[k] for k in ("intersection", "truth", "predicted")))
    n = len(a["id"])
    ones = np.ones(n, np.int64)
    estimate += float(value(b, ones) - value(a, ones))
    for start in range(0, resamples, 1000):  # [chunk, images] draw counts, bounded memory
      chunk = min(1000, resamples - start)
      weights = rng.multinomial(n, np.full(n, 1.0 / n), size=chunk)
      draws[start:start + chunk] += value(b, weights) - value(a, weights)
  estimate, draws = estimate / len(baseline), draws / len(baseline)
  tail = (1 - CONFIDENCE) / 2
  low, high = np.quantile(draws, [tail, 1 - tail])
  share = lambda count: (1 + count) / (resamples + 1)
  p_value = min(1.0, 2 * min(share(int(np.sum(draws <= 0))), share(int(np.sum(draws >= 0)))))
  return estimate, float(low), float(high), p_value, draws


def baseline_pairs(variants: Sequence[Variant], key: str, value: Any
                   ) -> list[tuple[Variant, Variant]]:
  """(baseline, variant) for every variant whose `key` differs from `value`: its baseline is the
  variant with key=value and the same values of the other axes. ReportError if `key` is not an
  axis or `value` not one of its values."""
  if not variants or key not in variants[0].overrides:
    raise ReportError(f"--baseline={key}=...: {key} is not an axis of this sweep")
  text = lambda v: str(v).lower() if isinstance(v, bool) else str(v)
  values = [text(v.overrides[key]) for v in variants]
  if text(value) not in values:
    raise ReportError(f"--baseline={key}={value}: not a value of the axis (values: "
                      f"{', '.join(dict.fromkeys(values))})")
  others = lambda v: {k: x for k, x in v.overrides.items() if k != key}
  pairs = []
  for variant in variants:
    if text(variant.overrides[key]) == text(value):
      continue
    base = next(b for b in variants
                if text(b.overrides[key]) == text(value) and others(b) == others(variant))
    pairs.append((base, variant))
  return pairs


def _seed_of(run_dir: str) -> str:
  return os.path.basename(os.path.normpath(run_dir))


def differences(variants: Sequence[Variant], metric: str, key: str, value: Any
                ) -> tuple[list[Difference], list[str]]:
  """The paired comparison of each variant with its baseline (`baseline_pairs`) in `metric`,
  over the seeds both finished; and notes on pairs that could not be compared."""
  out, notes = [], []
  for base, variant in baseline_pairs(variants, key, value):
    per_seed = []
    for base_dir in base.run_dirs:
      other = next((d for d in variant.run_dirs if _seed_of(d) == _seed_of(base_dir)), None)
      runs = [read_run(d, [metric]) for d in (base_dir, other) if d is not None]
      if len(runs) < 2 or None in runs:
        continue
      paths = [os.path.join(d, PER_IMAGE_FILE.format(step=r.steps))
               for d, r in zip((base_dir, other), runs)]
      if not all(os.path.exists(p) for p in paths):
        notes.append(f"{variant.name} {_seed_of(base_dir)}: no per-image results "
                     f"({paths[0]}); not paired")
        continue
      per_seed.append((_seed_of(base_dir), read_per_image(paths[0]), read_per_image(paths[1])))
    if not per_seed:
      notes.append(f"{variant.name}: no seed finished with per-image results in both it and "
                   f"{base.name}")
      continue
    estimate, low, high, p, draws = paired_bootstrap(
        metric, [a for _, a, _ in per_seed], [b for _, _, b in per_seed])
    out.append(Difference(variant.name, base.name, metric,
                          [int(s.split("=")[1]) for s, _, _ in per_seed],
                          len(per_seed[0][1]["id"]), estimate, low, high, p, draws))
  return out, notes


def differences_table(found: Sequence[Difference], labels_of: dict[str, str]) -> str:
  lines = ["| variant | baseline | seeds | images | difference | 95% interval | p | |",
           "|" + "---|" * 8]
  for d in found:
    lines.append(f"| {labels_of[d.variant]} | {labels_of[d.baseline]} | {len(d.seeds)} | "
                 f"{d.images} | {d.estimate:+.4f} | [{d.low:+.4f}, {d.high:+.4f}] | "
                 f"{d.p_value:.4f} | {'✱' if d.significant else ''} |")
  return "\n".join(lines)


# ---------------------------------------------------------------------------- table files

def _format_stat(stat: tuple[float, float], digits: int, unit: str = "") -> str:
  mean, std = stat
  if not math.isfinite(mean):
    return "—"
  text = f"{mean:.{digits}f}"
  if math.isfinite(std):
    text += f" ± {std:.{digits}f}"
  return text + unit


def write_csv(path: str, rows: list[dict[str, Any]], metrics: Sequence[str],
              found: Sequence[Difference] = ()) -> None:
  """Machine-readable table: one column per axis key, means and stds as separate numbers; with
  differences against a baseline, their columns (empty on the baseline rows)."""
  keys = list(rows[0]["overrides"]) if rows else []
  marks = {c: best_rows(rows, c, lower) for c, lower in _stat_columns(metrics)}
  header = ["variant", *keys, "seeds_finished", "seeds_total", "steps"]
  for m in metrics:
    for kind in ("final", "best"):
      header += [f"{m} {kind} mean", f"{m} {kind} std"]
  header += ["wall_seconds mean", "wall_seconds std", "num_params", "best_in"]
  by_variant = {d.variant: d for d in found}
  if found:
    header += ["baseline", "difference", "difference low", "difference high", "p value",
               "paired seeds", "significant"]
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
      d = by_variant.get(row["variant"])
      if found:
        line += ([d.baseline, repr(d.estimate), repr(d.low), repr(d.high), repr(d.p_value),
                  len(d.seeds), d.significant] if d else [""] * 7)
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
                   description: str = "", comparison: str = "") -> None:
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
    if comparison:
      f.write("\n" + comparison.strip() + "\n")


# ---------------------------------------------------------------------------- plot

def labels(variants: Sequence[Variant]) -> list[str]:
  """Legend labels: `loss.name=ce+dice, model.norm=group` (the values unescaped)."""
  return [", ".join(f"{k}={v}" for k, v in variant.overrides.items()) or variant.name
          for variant in variants]


def plot_curves(path: str, variants: Sequence[Variant], rows: list[dict[str, Any]],
                metric: str, found: Sequence[Difference] = ()) -> None:
  """Left: `metric` against step per variant (mean line, min-max band over seeds).
  Middle: the final `metric` per variant (bar: mean, whisker: std, dots: seeds).
  Right, with differences against a baseline: their forest plot (dot: difference, line: 95%
  interval, filled where it excludes 0).

  Writes a PNG of exactly FIGURE_SIZE_INCHES * FIGURE_DPI pixels, FOREST_FIGURE_SIZE_INCHES
  with the forest plot.
  """
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  import numpy as np

  names = labels(variants)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  if found:
    fig, (ax_curve, ax_bar, ax_forest) = plt.subplots(
        1, 3, figsize=FOREST_FIGURE_SIZE_INCHES, dpi=FIGURE_DPI,
        gridspec_kw={"width_ratios": [3, 2, 2]})
    plot_forest(ax_forest, found, dict(zip((v.name for v in variants), names)))
  else:
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


def plot_forest(ax, found: Sequence[Difference], labels_of: dict[str, str]) -> None:
  """One row per comparison: the difference (dot) and its 95% interval (line); a filled dot
  where the interval excludes 0."""
  import matplotlib.ticker
  for i, d in enumerate(found):
    ax.plot([d.low, d.high], [i, i], color="k", linewidth=1.5)
    ax.plot([d.estimate], [i], "o", color="k", markersize=7,
            markerfacecolor="k" if d.significant else "white")
  ax.axvline(0.0, color="tab:red", linewidth=1, linestyle="--")
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(4))
  ax.set_yticks(range(len(found)), [f"{labels_of[d.variant]}\nvs {labels_of[d.baseline]}\n"
                                    f"p={d.p_value:.3g}" for d in found], fontsize=7)
  ax.set_ylim(len(found) - 0.5, -0.5)
  ax.set_xlabel(f"difference in final {found[0].metric}" if found else "difference")
  ax.set_title("vs baseline: 95% interval (paired bootstrap\nover images, by seed); "
               "filled: excludes 0", fontsize=9)
  ax.grid(alpha=0.3, axis="x")


# ---------------------------------------------------------------------------- all of it

def write_report(sweep_dir: str, variants: Sequence[Variant], metrics: Sequence[str],
                 description: str = "", baseline: tuple[str, Any] | None = None
                 ) -> dict[str, str]:
  """Writes results.md, results.csv and (once some run finished) curves.png into `sweep_dir`.

  `metrics[0]` is the one plotted and, with `baseline` (axis key, value), the one compared:
  each other variant against it (`differences`), in a table, columns of results.csv and a
  forest plot. Returns {kind: path} of the files written.
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
  found, comparison = [], ""
  if baseline is not None and runs:
    key, value = baseline
    found, notes = differences(variants, metrics[0], key, value)
    labels_of = dict(zip((v.name for v in variants), labels(variants)))
    comparison = (f"## Against the baseline {key}={value}\n\n{BOOTSTRAP_METHOD}\n\n" +
                  (differences_table(found, labels_of) if found else "No pair to compare.") +
                  "".join(f"\n\n- {note}" for note in notes))
  write_markdown(paths["markdown"], rows, metrics, description, comparison)
  write_csv(paths["csv"], rows, metrics, found)
  if any(row["runs"] for row in rows):
    paths["plot"] = os.path.join(sweep_dir, "curves.png")
    plot_curves(paths["plot"], variants, rows, metrics[0], found)
  return paths
