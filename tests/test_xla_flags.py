"""main.py turns on XLA:CPU's YNN fusions by default; they must not change what is computed."""

import os
import subprocess
import sys

import numpy as np

from seg_jax import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_GRADS = """
import sys
import jax, jax.numpy as jnp, numpy as np
from seg_jax.models import init_key
from seg_jax.models.unet import UNet
model = UNet(num_logits=3, width=8, depth=2, norm="batch")
x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
variables = model.init(init_key(0), x, train=False)
def loss(params):
  out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
  return jnp.mean(out ** 2)
grads = jax.jit(jax.grad(loss))(variables["params"])
np.save(sys.argv[1], np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)]))
"""


def _grads(tmp_path, name, xla_flags_value):
  env = {**os.environ, "XLA_FLAGS": xla_flags_value, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  path = str(tmp_path / f"{name}.npy")
  subprocess.run([sys.executable, "-c", _GRADS, path], env=env, check=True, timeout=300)
  return np.load(path)


def test_ynn_fusions_give_the_same_gradients(tmp_path):
  plain = _grads(tmp_path, "plain", "")
  fused = _grads(tmp_path, "ynn", xla_flags.YNN_FUSIONS)
  np.testing.assert_allclose(fused, plain, rtol=1e-4, atol=1e-6 * np.abs(plain).max())


def test_default_flags_respect_the_user(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1")
  monkeypatch.delenv("SEG_JAX_PLAIN_XLA", raising=False)
  xla_flags.set_default_xla_flags()
  assert os.environ["XLA_FLAGS"] == f"--xla_foo=1 {xla_flags.YNN_FUSIONS}"
  monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1")
  monkeypatch.setenv("SEG_JAX_PLAIN_XLA", "1")
  xla_flags.set_default_xla_flags()
  assert os.environ["XLA_FLAGS"] == "--xla_foo=1"
