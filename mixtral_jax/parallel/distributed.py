"""Joining a multi-process run: `jax.distributed.initialize`, once, before any other JAX call.

A run is multi-process when told so (`--coordinator_address`/`--num_processes`/`--process_id`,
or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) or when a launcher that JAX
detects started several tasks (SLURM, Open MPI, a GKE TPU slice); `--distributed=yes` always
initialises and lets JAX detect the cluster (TPU VM pod slices, whose hosts JAX finds from the
metadata server). A single-host run does nothing extra.

When a process dies, JAX's distributed service notices its missing heartbeats and aborts every
other process with a long C++ log and stack trace. In a multi-process run this process's stderr
passes through `python -m mixtral_jax.parallel.distributed`, which prints that as one line
instead.

`agree` asks every process one question through the coordination service (e.g. whether its
shards of a checkpoint read back), so that all act on the same answers.
"""

import os
import re
import select
import subprocess
import sys
import time
from typing import Optional
from mixtral_jax.errors import UserError

MODES = ("auto", "yes", "no")
_ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
        "process_id": "JAX_PROCESS_ID"}


_filter: Optional[subprocess.Popen] = None  # the stderr filter, once started
_asked: dict[str, int] = {}  # how many times each question of `agree` was asked here


# How every lost-peer line ends.
LOST_PEER = "Complete checkpoints are kept: rerun every process to resume."


class DistributedError(UserError, RuntimeError):
  """The distributed settings are wrong, or the run's processes could not connect."""


def _launched_as_several() -> bool:
  """Whether a cluster launcher that JAX itself detects started several processes."""
  env = os.environ
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  return (int(env.get("SLURM_NTASKS", "1") or 1) > 1 or
          int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1 or len(hosts.split(",")) > 1)


def settings(mode: str, coordinator_address: Optional[str], num_processes: Optional[int],
             process_id: Optional[int]) -> Optional[dict]:
  """`jax.distributed.initialize`'s explicit arguments (None where JAX detects them), or None
  when this is a single-process run. Raises DistributedError naming a bad setting."""
  if mode not in MODES:
    raise DistributedError(f"--distributed={mode}: must be one of {', '.join(MODES)}")
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  for name, variable in _ENV.items():
    if given[name] is None and os.environ.get(variable):
      value = os.environ[variable]
      try:
        given[name] = value if name == "coordinator_address" else int(value)
      except ValueError:
        raise DistributedError(f"{variable}={value}: not an integer") from None
  missing = [f"--{k}" for k, v in given.items() if v is None]
  detected = mode == "yes" or _launched_as_several()  # JAX finds what is not given
  if mode == "no" or (len(missing) == 3 and not detected):
    return None
  if missing and not detected:
    raise DistributedError(f"{' and '.join(missing)} must be given too (or JAX_* variables)")
  address, count, index = given.values()
  if address is not None and not re.fullmatch(r"\S+:\d+", address):
    raise DistributedError(f"--coordinator_address={address}: must be HOST:PORT")
  if count is not None and count < 1:
    raise DistributedError(f"--num_processes={count}: must be at least 1")
  if index is not None and not 0 <= index < (count or index + 1):
    raise DistributedError(f"--process_id={index}: must be in [0, --num_processes={count})")
  return given


def initialize(given: dict, *, init_timeout: int, heartbeat_timeout: int,
               shutdown_timeout: int) -> None:
  """Connects this process to the others (`given` from `settings`), its stderr through the
  one-line filter; raises DistributedError (one line) if the coordinator cannot be reached or
  the processes disagree on the settings."""
  import jax  # imported, not used, before: nothing may touch a backend before this

  where = given["coordinator_address"] or "the detected coordinator"
  _filter_stderr(heartbeat_timeout, init_timeout, where)
  try:
    jax.distributed.initialize(
        given["coordinator_address"], given["num_processes"], given["process_id"],
        initialization_timeout=init_timeout, heartbeat_timeout_seconds=heartbeat_timeout,
        shutdown_timeout_seconds=shutdown_timeout)
  except (RuntimeError, ValueError) as e:  # jax's XlaRuntimeError is a RuntimeError
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DistributedError(f"cannot join the run's processes through {where} within "
                           f"--distributed_init_timeout={init_timeout} s ({reason})") from None
  for name, actual in (("num_processes", jax.process_count()),
                       ("process_id", jax.process_index())):
    if given[name] is not None and given[name] != actual:
      raise DistributedError(f"--{name}={given[name]} here, but the run's coordinator says "
                             f"{actual}: give every process the same --num_processes and its "
                             "own --process_id")


def client():
  """The client of JAX's coordination service (after `initialize`), for its key-value store.

  JAX has no public API for the store; multihost_utils and the compilation cache use this
  client too."""
  from jax._src import distributed
  return distributed.global_state.client


def agree(question: str, answer: str, timeout_s: int = 24 * 3600) -> list[str]:
  """Every process's `answer` to `question`, in process order, through the coordination service.

  Every process asks the same questions in the same order (the n-th asking of a question is its
  own exchange). One process: `[answer]`. A process that dies meanwhile stops the others
  through the service's heartbeats, so the generous timeout only bounds a process that hangs.
  """
  import jax
  if jax.process_count() == 1:
    return [answer]
  n = _asked[question] = _asked.get(question, -1) + 1
  key = f"mixtral_jax/{question}/{n}"
  store = client()
  store.key_value_set(f"{key}/{jax.process_index()}", answer)
  return [store.blocking_key_value_get(f"{key}/{i}", timeout_s * 1000)
          for i in range(jax.process_count())]


def _filter_stderr(heartbeat_timeout: int, init_timeout: int, coordinator: str) -> None:
  """Sends this process's stderr (fd 2, C++ logs included) through `main` below."""
  global _filter
  sys.stderr.flush()
  _filter = subprocess.Popen([sys.executable, "-m", "mixtral_jax.parallel.distributed",
                             str(heartbeat_timeout), str(init_timeout), coordinator],
                            stdin=subprocess.PIPE,
                            start_new_session=True)  # a Ctrl-C meant for the run spares it
  os.dup2(_filter.stdin.fileno(), 2)
  _filter.stdin.close()


def close_stderr() -> None:
  """Ends the filtered stderr, if any, and waits for its last lines (before `os._exit`)."""
  sys.stderr.flush()
  if _filter is not None:
    os.close(2)
    try:
      _filter.wait(timeout=10)
    except subprocess.TimeoutExpired:  # a child process of ours still holds the pipe
      pass


# The first lines of the two fatal reports of a lost peer: JAX's distributed service's, and
# gloo's when a collective breaks off (its C++ exception aborts the process). Other error lines
# of that moment (a failed preemption barrier, a save cut short) come from the same loss, just
# before or after it.
_FATAL = b"Terminating process because the JAX distributed service detected fatal errors"
_GLOO_FATAL = b"terminate called after throwing an instance of 'gloo::"
_HOLD_SECONDS = 1.0  # how long a line waits, in case such a report follows it


def _one_line(report: bytes, heartbeat_timeout: str, init_timeout: str, coordinator: str) -> str:
  """What the distributed service's (or gloo's) fatal `report` means, in one line."""
  if _GLOO_FATAL in report and _FATAL not in report:
    what = re.search(rb"what\(\):\s*(?:\[[^\]]*\]\s*)?([^\n]*)", report)
    reason = what[1].decode(errors="replace").strip() if what else "gloo aborted"
    return ("error: a collective with another process of this run broke off (gloo: "
            f"{reason[:120]}): that process probably died; this one stops too. {LOST_PEER}")
  if (b"CoordinationService/RegisterTask" in report or
      (b"CoordinationService/Barrier" in report and b"heartbeat" not in report)):
    return (f"error: cannot join the run's processes through {coordinator} within "
            f"--distributed_init_timeout={init_timeout} s: is every process started, with the "
            "same --num_processes, and is the coordinator reachable from here?")
  return lost_peer_line(report.decode(errors="replace"), heartbeat_timeout)


def lost_peer_line(report: str, heartbeat_timeout) -> str:
  """The one line for a peer that stopped sending heartbeats, named from the service's `report`
  (its fatal report, or a barrier's error that met the loss first)."""
  lost = (re.search(r"stopped sending heartbeats\):\s*([\d, ]+)", report) or
          re.search(r"Task (\d+) heartbeat timeout", report))
  who = f"process {lost[1].strip()}" if lost else "another process (or the coordinator)"
  return (f"error: {who} of this run stopped (died, or no heartbeat for "
          f"--heartbeat_timeout={heartbeat_timeout} s); this process stops too. {LOST_PEER}")


def main(*settings: str) -> None:
  """Copies stdin to stderr, line by line, a second late; replaces the distributed service's
  fatal report, and what was printed in the second before it, with one line (`settings`:
  `_one_line`'s)."""
  source, out = sys.stdin.buffer.fileno(), sys.stderr.buffer
  held, partial, dropped = [], b"", b""  # held: (time read, line)
  while True:
    ready, _, _ = select.select([source], [], [], _HOLD_SECONDS / 4)
    chunk = os.read(source, 1 << 16) if ready else b""
    if ready and not chunk:
      break
    lines = (partial + chunk).split(b"\n")
    partial = lines.pop()
    now = time.monotonic()
    held += [(now, line + b"\n") for line in lines]
    if any(_FATAL in line or _GLOO_FATAL in line for line in lines):  # about to abort
      dropped = b"".join(line for _, line in held) + partial
      while chunk := os.read(source, 1 << 20):
        dropped += chunk
      held, partial = [], b""
      break
    while held and held[0][0] < now - _HOLD_SECONDS:
      out.write(held.pop(0)[1])
    out.flush()
  out.write(b"".join(line for _, line in held) + partial)
  if dropped:
    out.write(_one_line(dropped, *settings).encode() + b"\n")
  out.flush()


if __name__ == "__main__":
  main(*sys.argv[1:])
