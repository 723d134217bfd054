"""The convolution every seg_jax model runs: XLA's own, or oneDNN's on a single CPU device.

`conv_general_dilated` has `lax.conv_general_dilated`'s signature, so flax's `nn.Conv` takes
it as is (`seg_jax.models.layers.Conv`). Which implementation it traces is chosen by the
innermost `backend(...)` context, which the train, eval and predict steps enter with
`config.conv_backend`; outside any context it is XLA's.

- 'xla': `lax.conv_general_dilated`, on every platform and mesh.
- 'onednn': float32 NHWC/HWIO 2-D convolutions, forward and both gradients, through oneDNN
  (`seg_jax/ops/onednn.py`). XLA:CPU's kernels are 1.2-2.5x slower on this project's shapes,
  worst for the weight gradient. Only on a single CPU device: XLA's partitioner cannot split
  a custom call over a mesh, so on several devices it would gather every activation first.
  Other convolutions (bf16, grouped, dilated) still go to XLA. A 3-D (NDHWC/DHWIO)
  convolution is computed as one 2-D convolution over the depth-shifted copies of its input
  stacked on the channels (`_depth_unrolled`: kd x the input's memory, the same flops):
  XLA:CPU's 3-D kernels are 7x slower than that (forward and gradients of a 16-channel 3x3x3
  conv on [2, 32, 48, 48]: 5.6 s vs 0.77 s for the gradient on a loaded 2-core CPU).
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


class Geometry(NamedTuple):
  strides: tuple[int, int]
  dilation: tuple[int, int]
  padding: tuple[tuple[int, int], tuple[int, int]]


def _output_shape(x_shape, kernel_shape, g: Geometry) -> tuple[int, ...]:
  spatial = []
  for size, k, s, d, (lo, hi) in zip(x_shape[1:3], kernel_shape[:2], g.strides, g.dilation,
                                      g.padding):
    spatial.append((size + lo + hi - (k - 1) * d - 1) // s + 1)
  return (x_shape[0], *spatial, kernel_shape[3])


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
  if lhs.ndim != 4 or rhs.ndim != 4 or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
    return None
  if preferred_element_type not in (None, jnp.float32) or feature_group_count != 1:
    return None
  if batch_group_count != 1 or any(d != 1 for d in (lhs_dilation or (1, 1))):
    return None
  if (dimension_numbers is None or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)):
    return None
  dilation = tuple(int(d) for d in (rhs_dilation or (1, 1)))
  if dilation != (1, 1):
    # oneDNN 3.2 computes dilated weight gradients by im2col + GEMM: with them DeepLabv3+'s
    # ASPP made its train step 0.94x as fast as with XLA's convolutions.
    return None
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    dilated_kernel = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], dilation)]
    padding = lax.padtype_to_pads(lhs.shape[1:3], dilated_kernel, strides, padding)
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
  if _active.get() == "onednn" and lhs.ndim == 5:
    unrolled = _depth_unrolled(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                               dimension_numbers, feature_group_count, batch_group_count,
                               preferred_element_type)
    if unrolled is not None:
      return unrolled
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


def _depth_unrolled(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                    dimension_numbers, feature_group_count, batch_group_count,
                    preferred_element_type):
  """A float32 NDHWC x DHWIO convolution as a 2-D one (which oneDNN computes), or None.

  Output depth j of a kd-deep kernel reads input depths j*s - lo + i, i < kd. Stacking those
  kd slices on the channel axis ([N, D', H, W, kd*C], depth-major) and folding D' into the batch
  turns it into a 2-D convolution with the kernel reshaped to [kh, kw, kd*C, F].
  """
  if (lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32 or feature_group_count != 1
      or batch_group_count != 1 or preferred_element_type not in (None, jnp.float32)
      or any(d != 1 for d in (lhs_dilation or (1, 1, 1)))
      or any(d != 1 for d in (rhs_dilation or (1, 1, 1)))):
    return None
  if (dimension_numbers is None or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NDHWC)):
    return None
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:4], rhs.shape[:3], strides, padding)
  (lo, hi), *plane_padding = tuple((int(a), int(b)) for a, b in padding)
  if lo < 0 or hi < 0:
    return None
  n, d, h, w, c = lhs.shape
  kd, kh, kw, _, features = rhs.shape
  out_d = (d + lo + hi - kd) // strides[0] + 1
  if out_d < 1:
    return None
  padded = jnp.pad(lhs, ((0, 0), (lo, hi), (0, 0), (0, 0), (0, 0))) if lo or hi else lhs
  last = (out_d - 1) * strides[0] + 1
  slices = [padded[:, i:i + last:strides[0]] for i in range(kd)]
  stacked = slices[0] if kd == 1 else jnp.concatenate(slices, axis=-1)
  kernel = rhs.transpose(1, 2, 0, 3, 4).reshape(kh, kw, kd * c, features)
  out = conv_general_dilated(stacked.reshape(n * out_d, h, w, kd * c), kernel, strides[1:],
                             plane_padding, dimension_numbers=_NHWC)
  return out.reshape(n, out_d, *out.shape[1:])
