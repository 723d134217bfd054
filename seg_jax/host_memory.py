"""Optional glibc malloc settings for CPU runs (SEG_JAX_REUSE_HOST_MEMORY=1); set before jax starts.

XLA:CPU allocates each execution's temporary buffer afresh (519 MB for the U-Net train step at
128x128, width 32, batch 8; `compiled.memory_analysis().temp_size_in_bytes`). glibc serves an
allocation that large with a new mmap and unmaps it on free, so the kernel page-faults and zeroes
all of it again on every step: 127,000 page faults and 0.28-0.34 s of system CPU time per 1.3 s
step on a 2-core Xeon. XLA's worker threads allocate from glibc's per-thread arenas, whose heaps
are capped at 64 MB, so a buffer that size is always mmap'd there. With one arena, no mmap and
no trimming, freed memory goes back to the heap and later steps reuse it: 0 faults, 10-15 ms of
system time, and the 128x128 step 4.5 % faster against an in-process reference workload
(benchmarks/train_step.py reports `page_faults_per_step` and `system_cpu_ms`).

It is off by default because of what it costs: the heap fragments (a step's outputs land in the
hole the last step's temporaries left), and peak RSS of that step was 1.7-3.2 GB in four runs
against 1.7-1.8 GB with glibc's defaults.

Only glibc is touched; elsewhere this does nothing.
"""

import ctypes
import ctypes.util
import os
import platform

# mallopt(3) parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def keep_freed_memory() -> bool:
  """If SEG_JAX_REUSE_HOST_MEMORY is set, makes glibc malloc reuse freed memory instead of
  returning it to the kernel; True if it did.

  Must run before jax (or anything else) starts threads: a thread keeps the arena it first
  allocated from.
  """
  if not os.environ.get("SEG_JAX_REUSE_HOST_MEMORY") or platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  settings = ((_M_ARENA_MAX, 1),          # every thread allocates from the main arena...
              (_M_MMAP_MAX, 0),           # ...which grows its heap instead of mmapping...
              (_M_TRIM_THRESHOLD, 2**31 - 1))  # ...and keeps what is freed for reuse
  return all(libc.mallopt(param, value) == 1 for param, value in settings)
