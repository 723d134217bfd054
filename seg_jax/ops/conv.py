"""The convolution every seg_jax model runs: XLA's own, or oneDNN's on a single CPU device.

`conv_general_dilated` has `lax.conv_general_dilated`'s signature, so flax's `nn.Conv` takes
it as is (`seg_jax.models.layers.Conv`). Which implementation it traces is chosen by the
innermost `backend(...)` context, which the train, eval and predict steps enter with
`config.conv_backend`; outside any context it is XLA's.

- 'xla': `lax.conv_general_dilated`, on every platform and mesh.
- 'onednn': float32 NHWC/HWIO 2-D and NDHWC/DHWIO 3-D convolutions, forward and both
  gradients, through oneDNN (`seg_jax/ops/onednn.py`). XLA:CPU's kernels are 1.2-2.5x slower
  on this project's 2-D shapes, worst for the weight gradient, and its 3-D kernels 7x slower
  than even a 2-D oneDNN convolution over depth-stacked copies of the input (what 3-D
  convolutions ran as before oneDNN's native 3-D ones were used). Only on a single CPU device:
  XLA's partitioner cannot split a custom call over a mesh, so on several devices it would
  gather every activation first. Other convolutions (bf16, grouped, dilated) still go to XLA.
- 'auto': 'onednn' where it can run, else 'xla'.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from absl import logging
from jax import lax

from seg_jax.ops import onednn

BACKENDS = ("auto", "xla", "onednn")
_NHWC = ("NHWC", "HWIO", "NHWC")
_NDHWC = ("NDHWC", "DHWIO", "NDHWC")
_active = contextvars.ContextVar("seg_jax_conv_backend", default="xla")


def onednn_unavailable_reason() -> str | None:
  """Why oneDNN convolutions cannot run in this process, or None if they can."""
  if jax.default_backend() != "cpu":
    return f"the default backend is {jax.default_backend()}, not cpu"
  if jax.device_count() != 1:
    return (f"{jax.device_count()} devices: a oneDNN custom call cannot be partitioned over a "
            "mesh, so XLA's own convolution is used")
  try:
    onednn.ensure_registered()
  except onednn.OneDNNUnavailable as e:
    return str(e)
  return None


@functools.cache
def _log_fallback(reason: str) -> None:  # once per reason, not at every trace
  logging.info("conv_backend=auto: XLA convolutions (%s)", reason)


def resolve(name: str) -> str:
  """'xla' or 'onednn' for a configured backend name; OneDNNUnavailable if 'onednn' cannot run."""
  if name not in BACKENDS:
    raise ValueError(f"unknown conv backend {name!r}; allowed: {', '.join(BACKENDS)}")
  if name == "xla":
    return "xla"
  reason = onednn_unavailable_reason()
  if reason is None:
    return "onednn"
  if name == "onednn":
    raise onednn.OneDNNUnavailable(f"conv_backend=onednn cannot be used: {reason}")
  _log_fallback(reason)
  return "xla"


@contextlib.contextmanager
def backend(name: str):
  """Convolutions traced inside use backend `name` (resolved as by `resolve`)."""
  token = _active.set(resolve(name))
  try:
    yield _active.get()
  finally:
    _active.reset(token)


class Geometry(NamedTuple):  # one entry per spatial axis: (H, W) or (D, H, W)
  strides: tuple[int, ...]
  dilation: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]


def _output_shape(x_shape, kernel_shape, g: Geometry) -> tuple[int, ...]:
  spatial = []
  for size, k, s, d, (lo, hi) in zip(x_shape[1:-1], kernel_shape[:-2], g.strides, g.dilation,
                                      g.padding):
    spatial.append((size + lo + hi - (k - 1) * d - 1) // s + 1)
  return (x_shape[0], *spatial, kernel_shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _onednn_conv(x, kernel, geometry: Geometry):
  return onednn.conv_forward(x, kernel, _output_shape(x.shape, kernel.shape, geometry),
                             **geometry._asdict())


def _onednn_conv_fwd(x, kernel, geometry):
  return _onednn_conv(x, kernel, geometry), (x, kernel)


def _onednn_conv_bwd(geometry, residuals, dy):
  x, kernel = residuals
  return (onednn.conv_backward_data(dy, kernel, x.shape, **geometry._asdict()),
          onednn.conv_backward_weights(x, dy, kernel.shape, **geometry._asdict()))


_onednn_conv.defvjp(_onednn_conv_fwd, _onednn_conv_bwd)


def _onednn_geometry(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                     dimension_numbers, feature_group_count, batch_group_count,
                     preferred_element_type) -> Geometry | None:
  """The geometry of a convolution oneDNN can compute, or None to leave it to XLA."""
  if lhs.ndim not in (4, 5) or rhs.ndim != lhs.ndim:
    return None
  if lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
    return None
  if preferred_element_type not in (None, jnp.float32) or feature_group_count != 1:
    return None
  rank = lhs.ndim - 2
  if batch_group_count != 1 or any(d != 1 for d in (lhs_dilation or (1,) * rank)):
    return None
  layout = _NHWC if rank == 2 else _NDHWC
  if (dimension_numbers is None or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      != lax.conv_dimension_numbers(lhs.shape, rhs.shape, layout)):
    return None
  dilation = tuple(int(d) for d in (rhs_dilation or (1,) * rank))
  if any(d != 1 for d in dilation):
    # oneDNN 3.2 computes dilated weight gradients by im2col + GEMM: with them DeepLabv3+'s
    # ASPP made its train step 0.94x as fast as with XLA's convolutions.
    return None
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    dilated_kernel = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:rank], dilation)]
    padding = lax.padtype_to_pads(lhs.shape[1:-1], dilated_kernel, strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if any(p < 0 for pair in padding for p in pair):
    return None
  geometry = Geometry(strides, dilation, padding)
  if any(size < 1 for size in _output_shape(lhs.shape, rhs.shape, geometry)):
    return None
  return geometry


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`, through oneDNN inside `backend('onednn')` where it can."""
  if _active.get() == "onednn":
    geometry = _onednn_geometry(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                dimension_numbers, feature_group_count, batch_group_count,
                                preferred_element_type)
    if geometry is not None:
      return _onednn_conv(lhs, rhs, geometry)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)

