"""Stopping on request: SIGTERM (a preemption) or Ctrl-C ends the run at the next step boundary.

While a `StopRequests` is active, the first SIGTERM or SIGINT is only recorded: the loop sees
it after the step in flight, saves a checkpoint, waits for it and stops. The first signal also
restores the previous handlers, so a second one acts at once (Ctrl-C raises
KeyboardInterrupt, SIGTERM kills).
"""

import signal
import threading
from typing import Optional

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
  """The run stopped on a signal after saving; `signum` is the signal."""

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = signum


class StopRequests:
  """Context manager recording the first SIGTERM/SIGINT in `received` (main thread only:
  elsewhere Python cannot install handlers, and nothing is recorded)."""

  def __init__(self):
    self.received: Optional[int] = None
    self._previous = {}

  def __enter__(self) -> "StopRequests":
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._record) for s in _SIGNALS}
    return self

  def _record(self, signum, frame) -> None:
    self.received = signum
    self._restore()

  def _restore(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def __exit__(self, *exc) -> None:
    self._restore()
