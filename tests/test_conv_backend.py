"""seg_jax/ops: oneDNN convolutions compute what XLA's do, forward and both gradients."""

import itertools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from seg_jax import config as config_lib
from seg_jax.models import init_key
from seg_jax.models.unet import UNet
from seg_jax.ops import conv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NHWC = ("NHWC", "HWIO", "NHWC")
NDHWC = ("NDHWC", "DHWIO", "NDHWC")

# (batch, height, width, in, out, kernel, strides, padding, dilation): odd batches split into
# uneven chunks over the thread pool; strided, asymmetric and 1x1 cases; a dilated one, which
# stays with XLA.
GEOMETRIES = [
    (8, 16, 17, 3, 8, 3, (1, 1), "SAME", (1, 1)),
    (5, 17, 18, 4, 6, 7, (2, 2), ((3, 3), (3, 3)), (1, 1)),     # a ResNet stem
    (3, 12, 13, 8, 8, 3, (1, 1), ((2, 2), (2, 2)), (2, 2)),     # atrous: XLA's
    (2, 9, 10, 5, 7, 1, (1, 1), "VALID", (1, 1)),
    (1, 10, 11, 4, 4, 3, (2, 1), ((0, 1), (1, 0)), (1, 1)),
]


@pytest.fixture
def needs_onednn():
  """Skips (saying why) where the oneDNN library cannot be built or loaded, e.g. no compiler."""
  reason = conv.onednn_unavailable_reason()
  if reason is not None:
    pytest.skip(f"oneDNN convolutions unavailable here: {reason}")


def _numpy_conv(x, w, strides, padding, dilation):
  """Direct convolution (any number of spatial axes, channels last) and its kernel gradient for
  cotangent `dy`, by explicit loops over the kernel's taps."""
  rank = x.ndim - 2
  xp = np.pad(x.astype(np.float64), ((0, 0), *padding, (0, 0)))
  out = [(xp.shape[1 + a] - (w.shape[a] - 1) * dilation[a] - 1) // strides[a] + 1
         for a in range(rank)]
  taps = list(itertools.product(*(range(k) for k in w.shape[:rank])))

  def window(tap):  # [N, *out, Cin]: the input under kernel tap `tap`
    return xp[(slice(None), *(slice(t * dilation[a], t * dilation[a] + strides[a] * (out[a] - 1) + 1,
                                    strides[a]) for a, t in enumerate(tap)))]

  y = sum(np.einsum("n...c,cd->n...d", window(t), w[t]) for t in taps)

  def kernel_grad(dy):
    grad = np.zeros(w.shape)
    for t in taps:
      grad[t] = window(t).reshape(-1, w.shape[-2]).T @ dy.reshape(-1, w.shape[-1])
    return grad

  return y, kernel_grad


def _pads(x_shape, w_shape, strides, padding, dilation):
  if not isinstance(padding, str):
    return padding
  rank = len(x_shape) - 2
  dilated = [(k - 1) * d + 1 for k, d in zip(w_shape[:rank], dilation)]
  return lax.padtype_to_pads(x_shape[1:-1], dilated, strides, padding)


def _conv_and_grads(backend, x, w, strides, padding, dilation, dy):
  def f(x, w):
    with conv.backend(backend):
      return conv.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation,
                                       dimension_numbers=NHWC if x.ndim == 4 else NDHWC)
  y, vjp = jax.vjp(f, x, w)
  return (y, *vjp(dy))


def _check_against_numpy_and_xla(x_shape, w_shape, strides, padding, dilation, seed):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(x_shape).astype(np.float32)
  w = rng.standard_normal(w_shape).astype(np.float32)
  expected_y, kernel_grad = _numpy_conv(x, w, strides, _pads(x.shape, w.shape, strides, padding,
                                                                dilation), dilation)
  dy = rng.standard_normal(expected_y.shape).astype(np.float32)
  y, dx, dw = jax.jit(lambda x, w, dy: _conv_and_grads("onednn", x, w, strides, padding,
                                                       dilation, dy))(x, w, dy)
  _, dx_xla, _ = jax.jit(lambda x, w, dy: _conv_and_grads("xla", x, w, strides, padding,
                                                          dilation, dy))(x, w, dy)
  scale = lambda a: np.abs(a).max()
  np.testing.assert_allclose(y, expected_y, atol=1e-5 * scale(expected_y))
  np.testing.assert_allclose(dw, kernel_grad(dy.astype(np.float64)), atol=1e-5 * scale(dw))
  np.testing.assert_allclose(dx, dx_xla, atol=1e-5 * scale(dx_xla))


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[5]}x{g[5]}/s{g[6][0]}/d{g[8][0]}/n{g[0]}")
def test_onednn_matches_numpy_and_xla(geometry, needs_onednn):
  n, h, w_, cin, cout, k, strides, padding, dilation = geometry
  _check_against_numpy_and_xla((n, h, w_, cin), (k, k, cin, cout), strides, padding, dilation,
                               seed=n * 100 + k)


# (batch, depth, height, width, in, out, kernel, strides, padding) of the 3D U-Net's
# convolutions: 3x3x3 'SAME', stride 2 on even sizes (XLA pads (0, 1)), an anisotropic stride
# (1, 2, 2) with uneven padding, the 1x1x1 strided shortcut and the 1x1x1 upsampling/head; odd batches split into
# uneven chunks over the thread pool.
VOLUME_GEOMETRIES = [
    (3, 5, 6, 7, 3, 4, 3, (1, 1, 1), "SAME"),
    (2, 6, 8, 8, 4, 5, 3, (2, 2, 2), "SAME"),
    (1, 4, 8, 6, 2, 3, 3, (1, 2, 2), ((0, 1), (1, 1), (2, 0))),
    (2, 6, 6, 4, 4, 3, 1, (2, 2, 2), "SAME"),
    (3, 3, 4, 5, 6, 16, 1, (1, 1, 1), "VALID"),
]


@pytest.mark.parametrize("geometry", VOLUME_GEOMETRIES,
                         ids=lambda g: f"{g[6]}x{g[6]}x{g[6]}/s{''.join(map(str, g[7]))}/n{g[0]}")
def test_onednn_3d_matches_numpy_and_xla(geometry, needs_onednn):
  """Native oneDNN NDHWC x DHWIO convolutions, forward and both gradients."""
  n, d, h, w_, cin, cout, k, strides, padding = geometry
  _check_against_numpy_and_xla((n, d, h, w_, cin), (k, k, k, cin, cout), strides, padding,
                               (1, 1, 1), seed=n * 10 + k)


def _lowered_text(backend, x, w, **kwargs):
  def f(x, w):
    with conv.backend(backend):
      return conv.conv_general_dilated(x, w, (1,) * (x.ndim - 2), "SAME",
                                       dimension_numbers=NHWC if x.ndim == 4 else NDHWC, **kwargs)
  return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(f(x, w)), argnums=(0, 1))).lower(
      x, w).as_text()


def test_only_supported_convolutions_leave_xla(needs_onednn):
  x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
  text = _lowered_text("onednn", x, w)
  for target in ("forward", "backward_data", "backward_weights"):
    assert f"seg_jax_onednn_conv_{target}" in text
  assert "seg_jax_onednn" not in _lowered_text("xla", x, w)
  # bf16 and grouped convolutions stay with XLA, whatever the backend.
  assert "seg_jax_onednn" not in _lowered_text("onednn", x.astype(jnp.bfloat16),
                                               w.astype(jnp.bfloat16))
  assert "seg_jax_onednn" not in _lowered_text("onednn", x, jnp.ones((3, 3, 2, 4)),
                                               feature_group_count=2)
  assert "seg_jax_onednn" not in _lowered_text("onednn", x, w, rhs_dilation=(2, 2))
  # A volume's convolution is one native 3-D oneDNN call each way, no depth-shifted copies.
  volume, kernel = jnp.ones((2, 4, 8, 8, 4)), jnp.ones((3, 3, 3, 4, 4))
  text = _lowered_text("onednn", volume, kernel)
  for target in ("forward", "backward_data", "backward_weights"):
    assert text.count(f"seg_jax_onednn_conv_{target}") == 1
  assert "concatenate" not in text
  assert "seg_jax_onednn" not in _lowered_text("onednn", volume.astype(jnp.bfloat16),
                                               kernel.astype(jnp.bfloat16))
  # Outside any backend context a model traces XLA's convolution.
  text = jax.jit(lambda x, w: conv.conv_general_dilated(x, w, (1, 1), "SAME",
                                                        dimension_numbers=NHWC)).lower(x, w).as_text()
  assert "seg_jax_onednn" not in text


def test_unet_gradients_agree_between_backends(needs_onednn):
  model = UNet(num_logits=3, width=8, depth=2, norm="batch")
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  variables = model.init(init_key(0), x, train=False)

  def grads(backend):
    def loss(params):
      with conv.backend(backend):
        out, _ = model.apply({**variables, "params": params}, x, train=True,
                             mutable=["batch_stats"])
      return jnp.mean(jnp.sin(out))
    return jax.jit(jax.value_and_grad(loss))(variables["params"])

  (loss_onednn, g_onednn), (loss_xla, g_xla) = grads("onednn"), grads("xla")
  assert float(loss_onednn) == pytest.approx(float(loss_xla), rel=1e-5)
  for a, b in zip(jax.tree.leaves(g_onednn), jax.tree.leaves(g_xla)):
    np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max() + 1e-7)


def test_backend_names_are_checked():
  with pytest.raises(ValueError, match="unknown conv backend 'mkldnn'"):
    conv.resolve("mkldnn")
  assert conv.resolve("xla") == "xla"
  reason = conv.onednn_unavailable_reason()
  if reason is None:
    assert conv.resolve("auto") == "onednn"   # one CPU device, the library builds
  else:  # no compiler or oneDNN wheel here: 'auto' falls back (checked in detail below)
    assert conv.resolve("auto") == "xla", reason
  config = config_lib.base_config()
  config.conv_backend = "cudnn"
  with pytest.raises(config_lib.ConfigError, match="config.conv_backend=.*must be one of auto"):
    config_lib.validate(config)


_ON_TWO_DEVICES = """
import jax
from seg_jax.ops import conv, onednn
assert jax.device_count() == 2
assert conv.resolve("auto") == "xla"
try:
  conv.resolve("onednn")
except onednn.OneDNNUnavailable as e:
  print("REFUSED", e)
"""


def test_several_devices_keep_xla_convolutions():
  """XLA's partitioner cannot split a custom call over a mesh: 'auto' falls back, 'onednn' says why."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  result = subprocess.run([sys.executable, "-c", _ON_TWO_DEVICES], env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "REFUSED conv_backend=onednn cannot be used: 2 devices" in result.stdout


def test_a_failed_build_is_reported_once_and_not_retried(monkeypatch):
  from seg_jax.ops import onednn
  calls = []

  def failing_build():
    calls.append(1)
    raise onednn.OneDNNUnavailable("building onednn_conv.cc failed: no space left")

  monkeypatch.setattr(onednn, "_failure", [])
  monkeypatch.setattr(onednn, "_register", failing_build)
  for _ in range(3):
    assert "no space left" in conv.onednn_unavailable_reason()
  assert conv.resolve("auto") == "xla"
  assert len(calls) == 1


_FAILED_BUILDS = r"""
import logging, os, sys
from seg_jax.ops import conv, onednn

messages = []
class Collect(logging.Handler):
  def emit(self, record):
    messages.append(record.getMessage())
logging.getLogger("absl").addHandler(Collect())
logging.getLogger("absl").setLevel(logging.INFO)

def attempt(name, env):
  # A fresh process state: no library registered, no failure remembered, no fallback logged.
  onednn._register.cache_clear()
  onednn._failure.clear()
  conv._log_fallback.cache_clear()
  os.environ.pop("CXX", None)
  os.environ.update(env)
  del messages[:]
  print(name, "AUTO", conv.resolve("auto"))
  print(name, "AUTO_AGAIN", conv.resolve("auto"))
  print(name, "LOGGED", len(messages), "|".join(messages).replace(chr(10), " "))
  try:
    conv.resolve("onednn")
    print(name, "ONEDNN accepted")
  except onednn.OneDNNUnavailable as e:
    print(name, "ONEDNN", str(e).replace(chr(10), " "))

bin_dir, real_path = sys.argv[1], os.environ["PATH"]
attempt("nocompiler", {"PATH": os.path.join(bin_dir, "empty")})
attempt("failing", {"PATH": os.path.join(bin_dir, "empty"), "CXX": os.path.join(bin_dir, "failing-cxx")})
attempt("broken", {"PATH": os.path.join(bin_dir, "empty"), "CXX": os.path.join(bin_dir, "garbage-cxx")})
# The real PATH (which may have a g++): $CXX, when set, is the compiler asked for.
attempt("missing", {"PATH": real_path, "CXX": os.path.join(bin_dir, "no-such-cxx")})
"""

_FAILING_CXX = """#!/bin/sh
echo "$@" >> {log}
echo "fake-cxx: fatal error: dnnl.hpp: simulated failure" >&2
exit 1
"""

# "Compiles" by writing a file that is no shared library: the build succeeds, loading fails.
_GARBAGE_CXX = """#!/bin/sh
while [ $# -gt 0 ]; do
  if [ "$1" = "-o" ]; then echo "not an ELF file" > "$2"; fi
  shift
done
exit 0
"""


def test_a_real_failed_build_falls_back_to_xla_and_onednn_says_why(tmp_path):
  """No C++ compiler on PATH; a compiler that fails; a 'library' that cannot be loaded; $CXX
  naming a compiler that does not exist (a missing compiler, not a failed load). Each
  time: resolve('auto') is 'xla', logged once with the reason; resolve('onednn') raises
  OneDNNUnavailable naming it; a failed build is not retried. In a subprocess, with its own
  build cache, so this process's registered library is untouched."""
  bin_dir = tmp_path / "bin"
  (bin_dir / "empty").mkdir(parents=True)
  for name, text in (("failing-cxx", _FAILING_CXX), ("garbage-cxx", _GARBAGE_CXX)):
    (bin_dir / name).write_text(text.format(log=bin_dir / "failing.log"))
    (bin_dir / name).chmod(0o755)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
         "SEG_JAX_CACHE_DIR": str(tmp_path / "cache")}
  env.pop("CXX", None)
  result = subprocess.run([sys.executable, "-c", _FAILED_BUILDS, str(bin_dir)], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  out = {}
  for line in result.stdout.splitlines():  # "<attempt> <FIELD> <value>"
    name, field, value = line.split(" ", 2)
    out[f"{name} {field}"] = value
  reasons = {
      "nocompiler": "no C++ compiler (g++, c++ or $CXX) to build seg_jax/ops/onednn_conv.cc",
      "failing": "building onednn_conv.cc failed: fake-cxx: fatal error: dnnl.hpp: simulated "
                 "failure",
      "broken": "loading the oneDNN convolution library failed: ",
      "missing": f"the C++ compiler $CXX={bin_dir / 'no-such-cxx'} is missing (not found or not "
                 "executable); it is needed to build seg_jax/ops/onednn_conv.cc",
  }
  for name, reason in reasons.items():
    assert out[f"{name} AUTO"] == "xla", result.stdout
    assert out[f"{name} AUTO_AGAIN"] == "xla", result.stdout
    logged = out[f"{name} LOGGED"]
    assert logged.startswith("1 conv_backend=auto: XLA convolutions (" + reason), result.stdout
    assert out[f"{name} ONEDNN"].startswith("conv_backend=onednn cannot be used: " + reason), \
        result.stdout
  # The failing compiler ran exactly once: the failure is remembered, not rebuilt at each call.
  builds = (bin_dir / "failing.log").read_text().splitlines()
  assert len([b for b in builds if "-o" in b.split()]) == 1, builds
