"""Stopping on request: SIGTERM (a preemption) or Ctrl-C ends the run at a step boundary.

While a `StopRequests` is active, the first SIGTERM or SIGINT is only recorded: the loop sees
it after the step in flight, saves a checkpoint, waits for it and stops. The first signal also
restores the previous handlers, so a second one acts at once (Ctrl-C raises
KeyboardInterrupt, SIGTERM kills).

With several processes, the save is collective, so all must stop after the same step, whichever
of them got the signal. JAX's preemption service does that agreement without a per-step
collective: its own SIGTERM handler (installed by jax.distributed.initialize) tells every
process, and `reached_preemption_sync_point` turns true at one common step. So SIGTERM is left
to it, and a Ctrl-C is passed on to it as a SIGTERM.
"""

import signal
import threading
from typing import Optional

from jax.experimental import multihost_utils

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
  """The run stopped on a signal after saving; `signum` is the signal."""

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = signum


class StopRequests:
  """Context manager recording the first SIGTERM/SIGINT in `received` (main thread only:
  elsewhere Python cannot install handlers, and nothing is recorded). `shared`: this is one of
  several processes, agreeing through JAX's preemption service."""

  def __init__(self, shared: bool = False):
    self.received: Optional[int] = None
    self._shared = shared
    self._previous = {}

  def __enter__(self) -> "StopRequests":
    if threading.current_thread() is threading.main_thread():
      signals = (signal.SIGINT,) if self._shared else _SIGNALS
      self._previous = {s: signal.signal(s, self._record) for s in signals}
    return self

  def _record(self, signum, frame) -> None:
    self.received = signum
    self._restore()
    if self._shared:
      signal.raise_signal(signal.SIGTERM)  # to JAX's handler, which tells the other processes

  def stop_after(self, step: int) -> Optional[int]:
    """The signal to stop on after `step` (every process calls this at every step, and with the
    start step before the first), if any."""
    if not self._shared:
      return self.received
    if multihost_utils.reached_preemption_sync_point(step):
      return self.received or signal.SIGTERM
    return None

  def _restore(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def __exit__(self, *exc) -> None:
    self._restore()
