"""A sweep on a pod: every process runs `mixtral-sweep` (through launch/), and each trial trains on
the whole mesh, as one process per host of a multi-process mixtral-train.

The sweep's processes join through `jax.distributed` (without touching a backend: the chips are
the trials') and talk through its coordination service's key-value store. Process 0 alone
reads and writes the study: for each trial it publishes the trial's command and a fresh
coordinator port, every process starts that command as its process of the trial, and the
others publish how their process ended. A trial's SIGTERM (a pruned trial, a preemption) reaches
every process of it through JAX's preemption service, so process 0 stops a trial by stopping
its own process of it.
"""

import json
import os
import socket
import threading
from typing import Callable, Optional

from mixtral_jax.parallel import distributed as distributed_lib

_PREFIX = "mixtral_sweep"
_WAIT_MS = 5_000  # a blocking read's slice: a stop request is noticed within it
_TRIAL_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def free_port() -> int:
  """A TCP port free on this host now (the next trial's coordinator binds it)."""
  with socket.socket() as s:
    s.bind(("", 0))
    return s.getsockname()[1]


class Pod:
  """This process's place in the sweep's processes, which joined through `jax.distributed`;
  `host` is this host's address as the others reach it (used by process 0)."""

  def __init__(self, host: str):
    from jax._src import distributed  # its process count and index need no backend, unlike
    self.process_id = distributed.global_state.process_id  # jax.process_index()
    self.num_processes = distributed.global_state.num_processes
    self.host = host

  @property
  def primary(self) -> bool:
    return self.process_id == 0

  def trial_env(self, env: dict, coordinator: str) -> dict:
    """`env` for this process's part of a trial whose coordinator is `coordinator`."""
    env = {k: v for k, v in env.items() if k not in _TRIAL_ENV}
    env.update(JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES=str(self.num_processes),
               JAX_PROCESS_ID=str(self.process_id))
    return env

  def announce(self, index: int, job: Optional[dict]) -> None:
    """Process 0: the `index`-th job for every process (None: the sweep is over)."""
    distributed_lib.client().key_value_set(f"{_PREFIX}/job/{index}", json.dumps(job))

  def receive(self, index: int, stop: threading.Event) -> Optional[dict]:
    """The `index`-th job (None: the sweep is over, or `stop` was set while waiting)."""
    value = self._wait(f"{_PREFIX}/job/{index}", stop)
    return None if value is None else json.loads(value)

  def report(self, index: int, code: int, reason: str) -> None:
    """How this process's part of the `index`-th job ended."""
    distributed_lib.client().key_value_set(f"{_PREFIX}/exit/{index}/{self.process_id}",
                                           json.dumps({"code": code, "reason": reason}))

  def gather(self, index: int) -> list[tuple[int, int, str]]:
    """Process 0: (process, exit code, reason) of every other process's part of a job."""
    ended = []
    for process in range(1, self.num_processes):
      value = json.loads(self._wait(f"{_PREFIX}/exit/{index}/{process}", None))
      ended.append((process, value["code"], value["reason"]))
    return ended

  @staticmethod
  def _wait(key: str, stop: Optional[threading.Event]) -> Optional[str]:
    while stop is None or not stop.is_set():
      try:
        return distributed_lib.client().blocking_key_value_get(key, _WAIT_MS)
      except Exception as e:  # jaxlib's error for a deadline carries no type of its own
        if "DEADLINE_EXCEEDED" not in str(e) and "timed out" not in str(e).lower():
          raise
    return None


def follow(pod: Pod, run: Callable[[dict, dict], tuple[int, str]], stop: threading.Event,
           log: Callable[[str], None] = print) -> None:
  """Processes 1 … N-1: runs each job process 0 announces, `run(job, env)` → (code, reason),
  and reports how it ended, until the sweep is over or `stop` is set."""
  index = 0
  while True:
    job = pod.receive(index, stop)
    if job is None:
      return
    log(f"trial {job['trial']}: process {pod.process_id} of {pod.num_processes}")
    code, reason = run(job, pod.trial_env(dict(os.environ), job["coordinator"]))
    pod.report(index, code, reason)
    index += 1
