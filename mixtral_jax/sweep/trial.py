"""A sweep trial's parent: `python -m mixtral_jax.sweep.trial COMMAND…` runs COMMAND (the trial's
mixtral-train) and exits with its code (128 + the signal if a signal ended it).

A process of one thread, on purpose. The trial must get one SIGTERM when its driver dies (it
then checkpoints; a second SIGTERM would kill it at once), and Linux sends the parent-death
signal each time the *thread* that forked a child exits, then hands the child to another
thread of the process: a trial forked by the driver's threads gets one SIGTERM per thread. So
the driver starts this process (which dies with the driver) and it starts the trial.
SIGTERM and SIGINT sent to it are passed on to the trial.
"""

import ctypes
import os
import signal
import subprocess
import sys

_PR_SET_PDEATHSIG = 1


def parent_death_signal(signum: int) -> None:
  """Asks the kernel to send `signum` to this process when its parent (thread) dies."""
  ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)


def main(command: list[str]) -> int:
  parent = os.getppid()
  parent_death_signal(signal.SIGKILL)
  if os.getppid() != parent:  # the driver died before the line above
    return 128 + signal.SIGKILL
  trial = subprocess.Popen(command, preexec_fn=lambda: parent_death_signal(signal.SIGTERM))
  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, lambda s, frame: trial.send_signal(s))
  code = trial.wait()
  return 128 - code if code < 0 else code


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
