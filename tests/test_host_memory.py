"""seg_jax/host_memory.py (SEG_JAX_REUSE_HOST_MEMORY=1): XLA:CPU's per-step temporaries are
reused, not faulted in anew."""

import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A U-Net gradient at 128x128 (49 MB of XLA temporaries, above glibc's 32 MB mmap ceiling), run
# 12 times; prints the temp size in pages and each execution's page faults, saves the gradient.
_FAULTS = """
import json, resource, sys
from seg_jax import host_memory
kept = host_memory.keep_freed_memory()
import jax, jax.numpy as jnp, numpy as np
from seg_jax.models import init_key
from seg_jax.models.unet import UNet
model = UNet(num_logits=3, width=8, depth=2, norm="batch")
x = jax.random.normal(jax.random.key(1), (4, 128, 128, 3))
variables = model.init(init_key(0), x, train=False)
def loss(params):
  out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
  return jnp.mean(out ** 2)
compiled = jax.jit(jax.grad(loss)).lower(variables["params"]).compile()
faults = []
for _ in range(12):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  grads = jax.block_until_ready(compiled(variables["params"]))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
np.save(sys.argv[1], np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)]))
print(json.dumps({"kept": kept, "faults": faults,
                  "temp_pages": compiled.memory_analysis().temp_size_in_bytes // 4096}))
"""


def _run(tmp_path, name, **env):
  env = {**{k: v for k, v in os.environ.items() if k != "SEG_JAX_REUSE_HOST_MEMORY"},
         "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", **env}
  path = str(tmp_path / f"{name}.npy")
  out = subprocess.run([sys.executable, "-c", _FAULTS, path], env=env, check=True, timeout=300,
                       capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1]), np.load(path)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc settings")
def test_freed_host_memory_is_reused_across_steps(tmp_path):
  system, system_grads = _run(tmp_path, "system")
  kept, kept_grads = _run(tmp_path, "kept", SEG_JAX_REUSE_HOST_MEMORY="1")
  assert not system["kept"] and kept["kept"]
  pages = system["temp_pages"]
  assert pages > 32 * 2**20 // 4096, system  # above the ceiling of glibc's mmap threshold
  # glibc's default: the temporaries are mmap'd afresh and every page faults in on every step.
  assert min(system["faults"][4:]) > 0.5 * pages, system
  # Kept: once the heap has grown to the step's peak, later steps fault (almost) nothing. XLA's
  # threads may order the step's allocations differently from one step to the next, so the heap
  # may grow to a new peak once more (one step of steps 4-11 faulted in a full suite run on a
  # 2-core EPYC); the other steps fault almost nothing, where the system's every step faults.
  later = sorted(kept["faults"][4:])
  assert later[-1] < 1.5 * pages, kept
  assert sum(later[:-1]) < 0.05 * sum(system["faults"][4:]), kept
  # Where the buffers live changes nothing that is computed.
  np.testing.assert_array_equal(kept_grads, system_grads)
