"""`model.init_from`: start a run from parameters of another, local, model.

The source is a seg_jax workdir (its newest checkpoint), an Orbax checkpoint
directory (a step directory or the directory holding step directories), or
an `.npz` whose array names are '/'-joined paths such as
`params/backbone/stage1_block1/Conv_0/kernel` (a name without a leading
`params/` or `batch_stats/` is taken as a parameter). Arrays are matched by
path and shape; the report lists what was loaded, what had another shape,
what the model has that the source lacks, and what the source had that the
model does not use. Nothing is ever downloaded: weights from elsewhere (e.g.
torchvision's) are converted into an `.npz` first.

Host code: it reads files and builds the state's arrays once, before step 0.
"""

from __future__ import annotations

import dataclasses
import os
import re

from flax import traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp

COLLECTIONS = ("params", "batch_stats")


class InitFromError(ValueError):
  """model.init_from names nothing loadable, or nothing in it fits the model."""


@dataclasses.dataclass
class InitReport:
  source: str
  loaded: list[str]
  shape_mismatch: list[tuple[str, tuple, tuple]]  # (path, source shape, model shape)
  missing: list[str]                              # in the model, not in the source
  unused: list[str]                               # in the source, not in the model

  def summary(self, max_listed: int = 20) -> str:
    lines = [f"init_from {self.source}: loaded {len(self.loaded)} arrays; "
             f"{len(self.shape_mismatch)} with another shape, {len(self.missing)} not in the "
             f"source (kept as initialised), {len(self.unused)} in the source unused"]

    def listing(title, items):
      if items:
        lines.append(f"  {title}:")
        lines.extend(f"    {item}" for item in items[:max_listed])
        if len(items) > max_listed:
          lines.append(f"    ... and {len(items) - max_listed} more")

    listing("other shape (source -> model)",
            [f"{p}: {tuple(a)} -> {tuple(b)}" for p, a, b in self.shape_mismatch])
    listing("not in the source", self.missing)
    listing("unused from the source", self.unused)
    return "\n".join(lines)


def flatten(tree) -> dict[str, object]:
  """{'a': {'b': x}} -> {'a/b': x}."""
  return traverse_util.flatten_dict(tree, sep="/")


def save_npz(path: str, variables: dict) -> None:
  """Writes {'params': ..., 'batch_stats': ...} as an .npz that `model.init_from` reads."""
  flat = {name: np.asarray(value) for name, value in flatten(
      {k: v for k, v in variables.items() if k in COLLECTIONS and v}).items()}
  np.savez(path, **flat)


def _checkpoint_item_dir(path: str) -> str:
  """The Orbax item directory that `path` (workdir, checkpoints dir, step dir) leads to."""
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  steps = [int(n) for n in os.listdir(path) if re.fullmatch(r"\d+", n)
           and os.path.isdir(os.path.join(path, n))]
  if steps:
    path = os.path.join(path, str(max(steps)))
  if os.path.isdir(os.path.join(path, "default")):
    path = os.path.join(path, "default")
  if not os.path.exists(os.path.join(path, "_METADATA")):
    raise InitFromError(f"model.init_from={path!r}: no Orbax checkpoint there (expected a "
                        "workdir, a checkpoints directory, a step directory or an .npz file)")
  return path


def load_arrays(path: str) -> dict[str, np.ndarray]:
  """Flat {'params/...': array, 'batch_stats/...': array} from an .npz or an Orbax checkpoint."""
  path = os.path.expanduser(path)
  if not os.path.exists(path):
    raise InitFromError(f"model.init_from={path!r}: no such file or directory")
  if os.path.isfile(path):
    try:
      with np.load(path, allow_pickle=False) as data:
        flat = {name: data[name] for name in data.files}
    except (OSError, ValueError) as e:
      raise InitFromError(f"model.init_from={path!r}: not a readable .npz ({e})") from e
    return {name if name.split("/", 1)[0] in COLLECTIONS else f"params/{name}": array
            for name, array in flat.items()}
  item = _checkpoint_item_dir(path)
  try:
    restored = ocp.StandardCheckpointer().restore(item)
  except Exception as e:  # orbax/tensorstore raise many types for unreadable data
    raise InitFromError(f"model.init_from={path!r}: the checkpoint in {item} cannot be read "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from e
  tree = {k: restored[k] for k in COLLECTIONS if restored.get(k)}
  if "params" not in tree:
    raise InitFromError(f"model.init_from={path!r}: the checkpoint in {item} has no 'params'")
  return {name: np.asarray(value) for name, value in flatten(tree).items()}


def initialize(variables: dict, path: str) -> tuple[dict, InitReport]:
  """`variables` ({'params', 'batch_stats'} of jax arrays) with every array of the same path
  and shape in `path` replaced by it (placed like the array it replaces), and the report.

  InitFromError if nothing matches: a wrong path or another model entirely.
  """
  source = load_arrays(path)
  target = flatten({k: v for k, v in variables.items() if k in COLLECTIONS})
  loaded, mismatch, missing, new_flat = [], [], [], {}
  for name, array in target.items():
    if name not in source:
      missing.append(name)
      new_flat[name] = array
    elif tuple(source[name].shape) != tuple(array.shape):
      mismatch.append((name, tuple(source[name].shape), tuple(array.shape)))
      new_flat[name] = array
    else:
      loaded.append(name)
      new_flat[name] = jax.device_put(source[name].astype(array.dtype), array.sharding)
  unused = sorted(set(source) - set(target))
  report = InitReport(path, loaded, mismatch, missing, unused)
  if not loaded:
    raise InitFromError(f"model.init_from={path!r}: none of its {len(source)} arrays matches "
                        f"this model by path and shape\n{report.summary(max_listed=5)}")
  new = dict(variables)
  new.update({k: v for k, v in traverse_util.unflatten_dict(new_flat, sep="/").items()
              if variables.get(k)})
  return new, report
