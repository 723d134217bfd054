"""oneDNN convolutions for XLA:CPU: build `onednn_conv.cc` once, register its FFI handlers.

Host side only. The library is compiled on first use with the system C++ compiler against
the pinned oneDNN wheel (`onednn-cpu-gomp`, headers from `onednn-devel-cpu-gomp`) and
jaxlib's FFI headers, and kept in a cache directory keyed by everything that goes into it,
so later processes load it in milliseconds. `seg_jax/ops/conv.py` decides when to use it.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax
import numpy as np

SOURCE = pathlib.Path(__file__).with_name("onednn_conv.cc")
RUNTIME_PACKAGE = "onednn-cpu-gomp"
HEADERS_PACKAGE = "onednn-devel-cpu-gomp"
TARGETS = {  # FFI target name -> exported handler symbol
    "seg_jax_onednn_conv_forward": "SegJaxConvForward",
    "seg_jax_onednn_conv_backward_data": "SegJaxConvBackwardData",
    "seg_jax_onednn_conv_backward_weights": "SegJaxConvBackwardWeights",
}
CXX_FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC")


class OneDNNUnavailable(RuntimeError):
  """oneDNN convolutions cannot be used here; the message says why."""


def cache_dir() -> pathlib.Path:
  """Where built libraries are kept: $SEG_JAX_CACHE_DIR, else $XDG_CACHE_HOME/seg_jax."""
  root = os.environ.get("SEG_JAX_CACHE_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "seg_jax")
  return pathlib.Path(root) / "native"


def _package_file(package: str, suffix: str) -> pathlib.Path:
  try:
    files = importlib.metadata.files(package) or []
  except importlib.metadata.PackageNotFoundError:
    raise OneDNNUnavailable(f"the Python package {package} is not installed (requirements.txt "
                            "pins it on Linux x86-64)") from None
  for f in files:
    if str(f).endswith(suffix):
      return pathlib.Path(f.locate()).resolve()
  raise OneDNNUnavailable(f"{package} has no file ending in {suffix}")


def _compiler() -> str:
  cxx = os.environ.get("CXX")
  if cxx:
    if not shutil.which(cxx):
      raise OneDNNUnavailable(f"the C++ compiler $CXX={cxx} is missing (not found or not "
                              "executable); it is needed to build seg_jax/ops/onednn_conv.cc")
    return cxx
  cxx = shutil.which("g++") or shutil.which("c++")
  if not cxx:
    raise OneDNNUnavailable("no C++ compiler (g++, c++ or $CXX) to build seg_jax/ops/"
                            "onednn_conv.cc")
  return cxx


def _build_command(cxx: str, output: str) -> list[str]:
  library = _package_file(RUNTIME_PACKAGE, "/libdnnl.so.3")
  headers = _package_file(HEADERS_PACKAGE, "include/oneapi/dnnl/dnnl.hpp").parents[2]
  return [cxx, *CXX_FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{headers}", str(SOURCE),
          "-o", output, f"-L{library.parent}", f"-l:{library.name}",
          f"-Wl,-rpath,{library.parent}"]


def _library_path() -> pathlib.Path:
  """The built library, compiling it first if this source, compiler and oneDNN have none."""
  cxx = _compiler()
  key = hashlib.sha256()
  key.update(SOURCE.read_bytes())
  key.update(" ".join(_build_command(cxx, "OUT")).encode())
  key.update(subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.encode())
  key.update(importlib.metadata.version("jaxlib").encode())
  target = cache_dir() / key.hexdigest()[:16] / "libseg_jax_onednn_conv.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with open(target.parent / "build.lock", "w") as lock:  # concurrent first uses build once
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not target.exists():
      with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = os.path.join(tmp, target.name)
        result = subprocess.run(_build_command(cxx, built), capture_output=True, text=True)
        if result.returncode:
          raise OneDNNUnavailable(f"building {SOURCE.name} failed:\n{result.stderr[-3000:]}")
        os.replace(built, target)
  return target


@functools.cache
def _register() -> str:
  """Builds and loads the library and registers its targets; returns the library path."""
  path = _library_path()
  library = ctypes.cdll.LoadLibrary(str(path))
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                platform="cpu")
  return str(path)


_failure: list[str] = []  # why the first attempt failed; a failed build is not retried


def ensure_registered() -> str:
  """The loaded library's path; raises OneDNNUnavailable (saying why) if it cannot be used."""
  if _failure:
    raise OneDNNUnavailable(_failure[0])
  try:
    return _register()
  except OneDNNUnavailable as e:
    _failure.append(str(e))
    raise
  except OSError as e:  # the library or libdnnl cannot be loaded
    _failure.append(f"loading the oneDNN convolution library failed: {e}")
    raise OneDNNUnavailable(_failure[0]) from e


def version() -> str:
  """The oneDNN release in use, e.g. '3.2.0'."""
  library = ctypes.cdll.LoadLibrary(str(_package_file(RUNTIME_PACKAGE, "/libdnnl.so.3")))

  class Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int),
                ("hash", ctypes.c_char_p), ("cpu_runtime", ctypes.c_uint),
                ("gpu_runtime", ctypes.c_uint)]

  library.dnnl_version.restype = ctypes.POINTER(Version)
  v = library.dnnl_version().contents
  return f"{v.major}.{v.minor}.{v.patch}"


# ---------------------------------------------------------------------------- device side

def _attrs(strides, dilation, padding) -> dict:
  """The handlers' attributes; a 2-D convolution has depth stride and dilation 1, no padding."""
  if len(strides) == 2:
    strides, dilation, padding = (1, *strides), (1, *dilation), ((0, 0), *padding)
  (pad_front, pad_back), (pad_top, pad_bottom), (pad_left, pad_right) = padding
  values = dict(stride_d=strides[0], stride_h=strides[1], stride_w=strides[2],
                dilation_d=dilation[0], dilation_h=dilation[1], dilation_w=dilation[2],
                pad_front=pad_front, pad_back=pad_back, pad_top=pad_top, pad_bottom=pad_bottom,
                pad_left=pad_left, pad_right=pad_right)
  return {k: np.int64(v) for k, v in values.items()}


def _call(target: str, shape, *operands, strides, dilation, padding) -> jax.Array:
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, operands[0].dtype),
                          vmap_method="sequential")(
                              *operands, **_attrs(strides, dilation, padding))


def conv_forward(x, kernel, out_shape, **geometry) -> jax.Array:
  """NHWC `x` * HWIO `kernel` -> NHWC of `out_shape` (or NDHWC * DHWIO -> NDHWC); geometry:
  strides, dilation, padding, one entry per spatial axis."""
  return _call("seg_jax_onednn_conv_forward", out_shape, x, kernel, **geometry)


def conv_backward_data(dy, kernel, x_shape, **geometry) -> jax.Array:
  """The input gradient of `conv_forward` for output cotangent `dy`."""
  return _call("seg_jax_onednn_conv_backward_data", x_shape, dy, kernel, **geometry)


def conv_backward_weights(x, dy, kernel_shape, **geometry) -> jax.Array:
  """The kernel gradient of `conv_forward` for input `x` and output cotangent `dy`."""
  return _call("seg_jax_onednn_conv_backward_weights", kernel_shape, x, dy, **geometry)
