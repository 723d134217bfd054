"""Metric writers: CLU's TensorBoard + console writers, plus WORKDIR/metrics.jsonl.

Only process 0 writes files; other processes log to their own console.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers


class JsonlWriter(metric_writers.MetricWriter):
  """Appends one JSON object per `write_scalars` call: {"step": s, "<name>": value, ...}.

  Non-finite values are written as null (JSON has no NaN). Other summaries
  (images, histograms, ...) are left to TensorBoard.
  """

  def __init__(self, path: str):
    self._path = path
    self._file = open(path, "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    record = {"step": int(step)}
    for name, value in scalars.items():
      value = float(np.asarray(value))
      record[name] = value if math.isfinite(value) else None
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def drop_records_after(path: str, step: int) -> None:
  """Removes records past `step` from a metrics.jsonl, e.g. on resuming from that step.

  Steps after the last checkpoint are trained (and logged) again on resume;
  dropping their first records keeps one record per step, as in a run that
  was never interrupted. The file is replaced atomically.
  """
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        kept.append(line)
    except (ValueError, KeyError):  # a line cut short by a kill: drop it
      continue
  if len(kept) == len(lines):
    return
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(kept)
  os.replace(tmp, path)


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """Console everywhere; TensorBoard events and metrics.jsonl on process 0 only."""
  if jax.process_index() > 0:
    return metric_writers.create_default_writer(just_logging=True, asynchronous=False)
  default = metric_writers.create_default_writer(workdir, asynchronous=False)
  return metric_writers.MultiWriter([default, JsonlWriter(os.path.join(workdir, "metrics.jsonl"))])
