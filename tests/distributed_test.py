"""When a run joins jax.distributed, and the one-line report of the service's fatal errors.

(The multi-process runs themselves are in multiprocess_test.py.)
"""

import subprocess
import sys
import time

import pytest

from mixtral_jax.parallel import distributed

_FATAL_REPORT = b"""E1201 23:25:42.109038    9347 coordination_service.cc:1549] Use error polling to propagate the following error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed.
E1201 23:25:42.110002 140542109238976 async_checkpointer.py:264] [process=0] Failed to run 5 Handler Commit operations
F1201 23:25:42.110525    2345 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died
*** Check failure stack trace: ***
    @     0x7fd31c440634  absl::lts_20260107::log_internal::LogMessage::SendToLog()
Fatal Python error: Aborted
"""


@pytest.fixture
def clean_env(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
               "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


def test_a_single_host_run_does_not_initialise(clean_env):
  assert distributed.settings("auto", None, None, None) is None
  clean_env.setenv("SLURM_NTASKS", "1")
  assert distributed.settings("auto", None, None, None) is None
  assert distributed.settings("no", "h:1", 2, 0) is None


@pytest.mark.parametrize("variable,value", [("SLURM_NTASKS", "4"), ("OMPI_COMM_WORLD_SIZE", "2"),
                                            ("TPU_WORKER_HOSTNAMES", "host-0,host-1")])
def test_a_detected_launch_of_several_lets_jax_find_the_settings(clean_env, variable, value):
  clean_env.setenv(variable, value)
  assert distributed.settings("auto", None, None, None) == {
      "coordinator_address": None, "num_processes": None, "process_id": None}


def test_explicit_settings_come_from_flags_or_jax_variables(clean_env):
  assert distributed.settings("auto", "10.0.0.1:1234", 4, 3) == {
      "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
  clean_env.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:99")
  clean_env.setenv("JAX_NUM_PROCESSES", "2")
  clean_env.setenv("JAX_PROCESS_ID", "1")
  assert distributed.settings("auto", None, None, 0) == {  # a flag wins over its variable
      "coordinator_address": "10.0.0.2:99", "num_processes": 2, "process_id": 0}
  assert distributed.settings("yes", None, None, None)["num_processes"] == 2


@pytest.mark.parametrize("args,message", [
    (("maybe", None, None, None), "--distributed=maybe: must be one of auto, yes, no"),
    (("auto", "h:1", 2, None), "--process_id must be given too"),
    (("auto", "h", 2, 0), "--coordinator_address=h: must be HOST:PORT"),
    (("auto", "h:1", 0, 0), "--num_processes=0: must be at least 1"),
    (("auto", "h:1", 2, 2), r"--process_id=2: must be in \[0, --num_processes=2\)"),
])
def test_bad_settings_are_named(clean_env, args, message):
  with pytest.raises(distributed.DistributedError, match=message):
    distributed.settings(*args)


def test_a_bad_jax_variable_is_named(clean_env):
  clean_env.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(distributed.DistributedError, match="JAX_NUM_PROCESSES=two: not an integer"):
    distributed.settings("auto", None, None, None)


def _filtered(*pieces) -> str:
  """stderr text through the filter process; a number among `pieces` is a pause (seconds)."""
  process = subprocess.Popen([sys.executable, "-m", "mixtral_jax.parallel.distributed", "5", "30",
                              "10.0.0.1:1234"], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
  for piece in pieces:
    if isinstance(piece, (int, float)):
      time.sleep(piece)
    else:
      process.stdin.write(piece)
      process.stdin.flush()
  process.stdin.close()
  return process.stderr.read().decode()


def test_the_filter_passes_everything_else_through_in_order():
  text = b"W1201 23:25:40.0 1 train.py:1] a warning\nTraceback (most recent call last):\n  x\n"
  assert _filtered(text[:20], text[20:], b"no newline at the end") == (
      text + b"no newline at the end").decode()


def test_the_filter_replaces_a_fatal_report_and_the_second_before_it_with_one_line():
  out = _filtered(b"step 5/400 progress\n", 1.5, _FATAL_REPORT)
  assert out.splitlines() == [
      "step 5/400 progress",
      "error: process 1 of this run stopped (died, or no heartbeat for --heartbeat_timeout=5 s); "
      "this process stops too. Complete checkpoints are kept: rerun every process to resume."]


def test_the_filter_names_an_unreachable_coordinator():
  report = (b"F1201 23:34:11.933817   17378 client.h:80] Terminating process because the JAX "
            b"distributed service detected fatal errors. absl::Status: DEADLINE_EXCEEDED\n\n"
            b"RPC: /xla.coordination.CoordinationService/RegisterTask\n*** Check failure ***\n")
  assert _filtered(report).splitlines() == [
      "error: cannot join the run's processes through 10.0.0.1:1234 within "
      "--distributed_init_timeout=30 s: is every process started, with the same "
      "--num_processes, and is the coordinator reachable from here?"]


def test_the_filter_turns_gloos_abort_into_one_line():
  report = (b"terminate called after throwing an instance of 'gloo::EnforceNotMet'\n"
            b"  what():  [enforce fail at external/gloo/gloo/transport/tcp/pair.cc:459] "
            b"op.preamble.length <= op.nbytes. 2560 vs 4.\nFatal Python error: Aborted\n\n"
            b"Thread 0x00007fae1cff96c0 (most recent call first):\n")
  assert _filtered(report).splitlines() == [
      "error: a collective with another process of this run broke off (gloo: "
      "op.preamble.length <= op.nbytes. 2560 vs 4.): that process probably died; this one "
      "stops too. Complete checkpoints are kept: rerun every process to resume."]


def test_a_barrier_that_meets_a_lost_peer_names_it_in_the_same_line():
  # Orbax's barrier can see the loss before the service's fatal report (a loaded machine).
  barrier = ("INTERNAL: Barrier failed because: task is set to ERROR: UNAVAILABLE: Task 1 "
             "heartbeat timeout. This indicates that the remote task has failed")
  fatal = "UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n1\n"
  line = distributed.lost_peer_line(barrier, 5)
  assert line == distributed.lost_peer_line(fatal, 5)
  assert line.startswith("error: process 1 of this run stopped (died, or no heartbeat for "
                         "--heartbeat_timeout=5 s)")
