"""Reading public PyTorch checkpoint files as numpy arrays, without running code from them.

`read_checkpoint(path)` returns ({name: array}, the Hugging Face config or None) for

- a `.safetensors` file (read by the safetensors package's numpy API);
- a Hugging Face model directory: `config.json` beside `model.safetensors`;
- a `.pth` / `.pt` / `.bin` written by `torch.save` (PyTorch >= 1.6: a zip holding a pickled
  index, `*/data.pkl`, and one raw file per storage, `*/data/<key>`).

A pickle can make its reader call any function it names, so the index is read by an
unpickler that resolves only the names a state dict of tensors needs (`ALLOWED_GLOBALS`:
tensor and parameter rebuilding, storage types, OrderedDict); any other name stops the read
before anything it names is called, and the storages are read from the zip with numpy. Torch
itself is never imported. A legacy (pre-zip) torch file or a bare pickle is refused: re-save
it with a current `torch.save`, or as `.safetensors`.

Host code, run once before step 0.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
from safetensors import numpy as safetensors_numpy

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"

# torch's typed storage classes (what `torch.save` names in a storage's persistent id) -> dtype
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class CheckpointError(ValueError):
  """The file is not a checkpoint that can be read safely; the message is one line."""


def _fail(path: str, why: str) -> None:
  raise CheckpointError(f"{path}: {why}")


class _StorageType:
  """Stands in for torch.FloatStorage etc.: only its dtype is needed."""

  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  """torch._utils._rebuild_tensor_v2 as numpy: a (copied) strided view of the storage."""
  del requires_grad, backward_hooks, metadata
  itemsize = storage.dtype.itemsize
  if not size:
    return np.array(storage[storage_offset], copy=True)
  view = np.lib.stride_tricks.as_strided(
      storage[storage_offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride))
  return np.array(view, copy=True)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused_state):
  del requires_grad, backward_hooks
  return data


ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _TensorIndexUnpickler(pickle.Unpickler):
  """Unpickles torch.save's data.pkl, resolving only ALLOWED_GLOBALS and reading each storage
  from the zip."""

  def __init__(self, file, *, archive: zipfile.ZipFile, prefix: str, path: str,
               byteorder: str):
    super().__init__(file)
    self._archive, self._prefix, self._path = archive, prefix, path
    self._byteorder = byteorder
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module, name):
    if (module, name) in ALLOWED_GLOBALS:
      return ALLOWED_GLOBALS[(module, name)]
    raise pickle.UnpicklingError(
        f"it names {module}.{name}, which is not part of a state dict of tensors; refused "
        "without running it (only tensors, storages and OrderedDict are allowed)")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:80]}")
    storage_type, key = pid[1], str(pid[2])
    if key not in self._storages:
      try:
        raw = self._archive.read(f"{self._prefix}/data/{key}")
      except KeyError:
        raise pickle.UnpicklingError(f"storage {key} is missing from the archive") from None
      dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
      self._storages[key] = np.frombuffer(raw, dtype=dtype).astype(storage_type.dtype)
    return self._storages[key]


def _read_torch_zip(path: str) -> dict[str, np.ndarray]:
  if not zipfile.is_zipfile(path):
    _fail(path, "not a zip archive: a legacy torch pickle or another pickle cannot be read "
          "without running code from it; re-save it with torch.save (PyTorch >= 1.6) or as "
          ".safetensors")
  with zipfile.ZipFile(path) as archive:
    indexes = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(indexes) != 1:
      _fail(path, f"a zip, but not one written by torch.save (expected one */data.pkl, found "
            f"{len(indexes)})")
    prefix = indexes[0][:-len("/data.pkl")]
    byteorder = "little"
    if f"{prefix}/byteorder" in archive.namelist():
      byteorder = archive.read(f"{prefix}/byteorder").decode().strip()
    with archive.open(indexes[0]) as index:
      try:
        state = _TensorIndexUnpickler(index, archive=archive, prefix=prefix, path=path,
                                      byteorder=byteorder).load()
      except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        _fail(path, f"cannot be read as a state dict of tensors: {e}")
  for wrapper in ("state_dict", "model"):  # training scripts often save {'model': state_dict}
    if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
      state = state[wrapper]
  if not isinstance(state, dict):
    _fail(path, f"holds a {type(state).__name__}, not a state dict (a dict of tensors)")
  arrays = {str(k): v for k, v in state.items() if isinstance(v, np.ndarray)}
  if not arrays:
    _fail(path, "holds no tensors")
  return arrays


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    return dict(safetensors_numpy.load_file(path))
  except Exception as e:  # safetensors raises its own SafetensorError and OSError variants
    _fail(path, f"not a readable .safetensors file ({type(e).__name__}: "
          f"{' '.join(str(e).split())[:200]})")


def is_checkpoint_path(path: str) -> bool:
  """Whether `path` is a file or directory this module reads (by its name and contents)."""
  if os.path.isdir(path):
    return os.path.isfile(os.path.join(path, HF_WEIGHTS))
  return path.endswith((SAFETENSORS_SUFFIX, *TORCH_SUFFIXES))


def read_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict | None]:
  """({tensor name: array}, the Hugging Face config.json dict or None); CheckpointError
  (one line naming the file) for anything that cannot be read safely."""
  if os.path.isdir(path):
    weights = os.path.join(path, HF_WEIGHTS)
    if not os.path.isfile(weights):
      _fail(path, f"a directory without {HF_WEIGHTS} (a Hugging Face model directory holds "
            f"{HF_CONFIG} and {HF_WEIGHTS})")
    hf_config = None
    config_path = os.path.join(path, HF_CONFIG)
    if os.path.isfile(config_path):
      try:
        with open(config_path) as f:
          hf_config = json.load(f)
      except (OSError, ValueError) as e:
        _fail(config_path, f"cannot be read as JSON ({e})")
    return _read_safetensors(weights), hf_config
  if path.endswith(SAFETENSORS_SUFFIX):
    return _read_safetensors(path), None
  if path.endswith(TORCH_SUFFIXES):
    return _read_torch_zip(path), None
  _fail(path, f"unknown checkpoint type (expected {SAFETENSORS_SUFFIX}, "
        f"{', '.join(TORCH_SUFFIXES)} or a Hugging Face model directory)")


def read_tensors(path: str) -> dict[str, np.ndarray]:
  """{tensor name: array} of a checkpoint file or Hugging Face directory (`read_checkpoint`)."""
  return read_checkpoint(path)[0]
