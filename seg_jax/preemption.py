"""Graceful stop on SIGTERM/SIGINT: finish the step, save, exit cleanly.

Schedulers (SLURM, Kubernetes, preemptible VMs) send SIGTERM and wait a
grace period before SIGKILL. `PreemptionWatcher` turns the first SIGTERM or
SIGINT into a flag the training loop polls between steps; a second SIGINT
(Ctrl-C twice) interrupts at once.

With several processes, a signal may reach them at different steps, yet all
must save the same step together (a checkpoint is a collective). They agree
by an all-gather of the flag at steps every process polls (`every_steps`),
so a signalled job stops within that many steps.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np


class PreemptionWatcher:
  """Use as a context manager around the training loop."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, *, every_steps: int = 1):
    self.every_steps = max(1, int(every_steps)) if jax.process_count() > 1 else 1
    self.received: str | None = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # second Ctrl-C: stop now
    self.received = signal.Signals(signum).name

  def __enter__(self) -> "PreemptionWatcher":
    # Signal handlers can only be installed from the main thread (e.g. not in a
    # notebook's worker); elsewhere the loop simply never sees a stop request.
    if threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()
    return False

  def should_stop(self, step: int) -> bool:
    """True (on every process alike) once any process has been signalled."""
    if jax.process_count() == 1:
      return self.received is not None
    if step % self.every_steps:
      return False
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.array(self.received is not None))
    return bool(np.any(flags))
