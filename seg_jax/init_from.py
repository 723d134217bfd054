"""`model.init_from`: start a run from parameters of another, local, model.

The source is
- a seg_jax workdir (its newest checkpoint), an Orbax checkpoint directory (a
  step directory or the directory holding step directories), or an `.npz`
  whose array names are '/'-joined paths such as
  `params/backbone/stage1_block1/Conv_0/kernel` (a name without a leading
  `params/` or `batch_stats/` is taken as a parameter);
- a public PyTorch checkpoint (`.pth`/`.pt`/`.bin`, `.safetensors`, or a
  Hugging Face directory; read by `seg_jax/torch_checkpoint.py` without
  running code from it) in a layout registered here (`register_layout`):
  the layout is recognised from the tensor names and converted into the
  variables of the module it holds (e.g. a ResNet: `stem_conv/kernel`, ...),
  which are then placed where that module sits in the model (DeepLabv3+'s
  `backbone`, Mask R-CNN's `backbone/backbone`, the U-Net's `encoder`).

Arrays are matched by path and shape; the report lists what was loaded, what
had another shape (e.g. a classifier for another number of classes), what the
model has that the source lacks, and what the source had that the model does
not use. Nothing is ever downloaded.

Host code: it reads files and builds the state's arrays once, before step 0.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Mapping

from flax import traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp

from seg_jax import torch_checkpoint

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
  layout: str = ""      # the recognised layout of a PyTorch checkpoint ('' for seg_jax's own)
  placed_at: str = ""   # where its module sits in the model ('' = the model itself)

  def summary(self, max_listed: int = 20) -> str:
    lines = [f"init_from {self.source}: loaded {len(self.loaded)} arrays; "
             f"{len(self.shape_mismatch)} with another shape, {len(self.missing)} not in the "
             f"source (kept as initialised), {len(self.unused)} in the source unused"]
    if self.layout:
      lines.append(f"  layout {self.layout}, placed at {self.placed_at or 'the model root'}")

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


# ---------------------------------------------------------------------------- layouts

Tensors = Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Layout:
  """A family of public checkpoints: `recognise(tensors)` says from the tensor names whether a
  checkpoint is one; `convert(tensors, hf_config)` returns the variables of the module it holds,
  nested in that module's naming: {'params': {...}, 'batch_stats': {...}} (kernels in flax's
  order, batch-norm running statistics in batch_stats)."""
  name: str
  recognise: Callable[[Tensors], bool]
  convert: Callable[[Tensors, dict | None], dict]


_LAYOUTS: dict[str, Layout] = {}


def register_layout(name: str, recognise: Callable[[Tensors], bool],
                    convert: Callable[[Tensors, dict | None], dict]) -> Layout:
  """Adds (or replaces, by name) a checkpoint layout that model.init_from recognises."""
  layout = Layout(name, recognise, convert)
  _LAYOUTS[name] = layout
  return layout


def layout_names() -> tuple[str, ...]:
  return tuple(_LAYOUTS)


def conv_kernel(weight: np.ndarray) -> np.ndarray:
  """A PyTorch conv weight [out, in, kh, kw] as a flax kernel [kh, kw, in, out]."""
  return np.ascontiguousarray(np.transpose(weight, (2, 3, 1, 0)))


def dense_kernel(weight: np.ndarray) -> np.ndarray:
  """A PyTorch linear weight [out, in] as a flax kernel [in, out]."""
  return np.ascontiguousarray(weight.T)


def set_path(tree: dict, path: str, value: np.ndarray) -> None:
  """tree['a']['b']['c'] = value for path 'a/b/c', creating the dicts on the way."""
  *parents, leaf = path.split("/")
  for name in parents:
    tree = tree.setdefault(name, {})
  tree[leaf] = value


_TORCH_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"),
             "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_RESNET_CONV = re.compile(r"layer(\d)\.(\d+)\.conv(\d)\.weight")
_RESNET_BN = re.compile(r"layer(\d)\.(\d+)\.bn(\d)\.(\w+)")
_RESNET_DOWNSAMPLE = re.compile(r"layer(\d)\.(\d+)\.downsample\.([01])\.(\w+)")


def _is_torchvision_resnet(tensors: Tensors) -> bool:
  return ("conv1.weight" in tensors and "bn1.running_mean" in tensors
          and "layer1.0.conv1.weight" in tensors and "layer4.0.conv1.weight" in tensors
          and tensors["conv1.weight"].ndim == 4)


def convert_torchvision_resnet(tensors: Tensors, hf_config: dict | None = None) -> dict:
  """torchvision's (and timm's) ResNet-18/34/50/101 state dict -> the variables of
  `seg_jax.models.resnet.ResNet` with the imagenet stem. `layerS.I.convK` is
  `stageS_block{I+1}/Conv_{K-1}`, its `bnK` is `BatchNorm_{K-1}`, and the shortcut's
  `downsample.0/1` is `proj` and the block's last BatchNorm; `fc` (the ImageNet classifier)
  becomes `fc/kernel|bias`, which no segmentation model has, so the report lists it unused.
  Counters (`num_batches_tracked`) carry no weights and are left out."""
  del hf_config
  bottleneck = "layer1.0.conv3.weight" in tensors
  proj_norm = f"BatchNorm_{3 if bottleneck else 2}"
  out: dict = {}

  def put_bn(module: str, field: str, value):
    if field in _TORCH_BN:
      collection, name = _TORCH_BN[field]
      set_path(out, f"{collection}/{module}/{name}", value)

  for name, value in tensors.items():
    if name == "conv1.weight":
      set_path(out, "params/stem_conv/kernel", conv_kernel(value))
    elif name.startswith("bn1."):
      put_bn("BatchNorm_0", name[len("bn1."):], value)
    elif name in ("fc.weight", "fc.bias"):
      set_path(out, f"params/fc/{'kernel' if name == 'fc.weight' else 'bias'}",
           dense_kernel(value) if name == "fc.weight" else value)
    elif m := _RESNET_CONV.fullmatch(name):
      stage, block, k = m.groups()
      set_path(out, f"params/stage{stage}_block{int(block) + 1}/Conv_{int(k) - 1}/kernel",
           conv_kernel(value))
    elif m := _RESNET_BN.fullmatch(name):
      stage, block, k, field = m.groups()
      put_bn(f"stage{stage}_block{int(block) + 1}/BatchNorm_{int(k) - 1}", field, value)
    elif m := _RESNET_DOWNSAMPLE.fullmatch(name):
      stage, block, index, field = m.groups()
      prefix = f"stage{stage}_block{int(block) + 1}"
      if index == "0":
        set_path(out, f"params/{prefix}/proj/kernel", conv_kernel(value))
      else:
        put_bn(f"{prefix}/{proj_norm}", field, value)
    elif not name.endswith("num_batches_tracked"):
      set_path(out, f"params/unrecognised/{name.replace('.', '/')}", value)
  return out


register_layout("torchvision_resnet", _is_torchvision_resnet, convert_torchvision_resnet)


def _convert_torch(path: str) -> tuple[dict[str, np.ndarray], str]:
  """A PyTorch checkpoint's arrays in the naming of the module it holds, flat, and its layout."""
  try:
    tensors, hf_config = torch_checkpoint.read_checkpoint(path)
  except torch_checkpoint.CheckpointError as e:
    raise InitFromError(f"model.init_from: {e}") from e
  for layout in _LAYOUTS.values():
    if layout.recognise(tensors):
      return flatten(layout.convert(tensors, hf_config)), layout.name
  sample = ", ".join(sorted(tensors)[:5])
  raise InitFromError(f"model.init_from={path!r}: its {len(tensors)} tensors ({sample}, ...) are "
                      f"in no known layout (known: {', '.join(_LAYOUTS)})")


def _placement(source: dict[str, np.ndarray], target: dict) -> str:
  """The module path P ('' = root) at which the most source arrays 'COLL/NAME' exist in the
  model as 'COLL/P/NAME' with the same shape: where the converted module sits."""
  votes: dict[str, int] = {}
  for name, array in source.items():
    collection, _, rest = name.partition("/")
    for candidate, value in target.items():
      if candidate == name:
        prefix = ""
      elif candidate.startswith(collection + "/") and candidate.endswith("/" + rest):
        prefix = candidate[len(collection) + 1:-len(rest) - 1]
      else:
        continue
      if tuple(value.shape) == tuple(array.shape):
        votes[prefix] = votes.get(prefix, 0) + 1
  return max(votes, key=lambda p: (votes[p], -len(p))) if votes else ""


def _place(source: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  """'COLL/NAME' -> 'COLL/prefix/NAME'."""
  if not prefix:
    return source
  out = {}
  for name, array in source.items():
    collection, _, rest = name.partition("/")
    out[f"{collection}/{prefix}/{rest}"] = array
  return out


# ---------------------------------------------------------------------------- sources

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
  target = flatten({k: v for k, v in variables.items() if k in COLLECTIONS})
  layout = placed_at = ""
  expanded = os.path.expanduser(path)
  if os.path.exists(expanded) and torch_checkpoint.is_checkpoint_path(expanded):
    source, layout = _convert_torch(expanded)
    placed_at = _placement(source, target)
    source = _place(source, placed_at)
  else:
    source = load_arrays(path)
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
  report = InitReport(path, loaded, mismatch, missing, unused, layout, placed_at)
  if not loaded:
    raise InitFromError(f"model.init_from={path!r}: none of its {len(source)} arrays matches "
                        f"this model by path and shape\n{report.summary(max_listed=5)}")
  new = dict(variables)
  new.update({k: v for k, v in traverse_util.unflatten_dict(new_flat, sep="/").items()
              if variables.get(k)})
  return new, report
