"""Stopping a run: SIGTERM and Ctrl-C save at the next step and exit; a busy workdir is refused."""

import os
import re
import signal
import subprocess
import time

import pytest

from conftest import DATA_LINES, LOG_LINES, PROGRESS_LINES, Repeated, assert_output
from mixtral_jax.data import processes
from mixtral_jax.runtime import interrupt
from mixtral_jax.training import checkpoint
from mixtral_jax.training import loop as train


def _start(args, env, repo, until: str) -> subprocess.Popen:
  """Starts `args` and returns once it printed a line starting with `until`."""
  proc = subprocess.Popen(args, cwd=repo, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  for line in proc.stdout:
    if line.startswith(until):
      return proc
  raise AssertionError(f"never printed {until!r}: {proc.stderr.read()[-2000:]}")


@pytest.mark.parametrize("signum", [signal.SIGTERM,
                                    pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_signal_saves_at_the_next_step_and_a_rerun_resumes(tmp_path, train_command, digest,
                                                            metrics, repo, signum):
  steps = lambda run: [r["step"] for r in metrics(run)]
  losses = lambda run: {r["step"]: r["loss"] for r in metrics(run)}
  straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
  args, env = train_command(straight, 14, "--config.checkpoint_every_steps=0")
  subprocess.run(args, cwd=repo, env=env, check=True, capture_output=True, timeout=300)

  # Checkpoints only at the end: whatever is saved, the signal saved.
  args, env = train_command(stopped, 14, "--config.checkpoint_every_steps=0")
  proc = _start(args, env, repo, "step 4/")
  proc.send_signal(signum)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signum, stderr[-2000:]
  name = signal.Signals(signum).name
  line = rf"stopped by {name} at step (\d+): checkpoint (\d+) saved; run the same command " \
         rf"again to resume"
  assert_output(subprocess.CompletedProcess(args, proc.returncode, "", stderr), None,
                [LOG_LINES, line])
  match = re.fullmatch(line, stderr.splitlines()[-1])
  assert match[1] == match[2]
  step = int(match[1])
  assert 4 <= step < 14
  checkpoints = os.path.join(stopped, "checkpoints")
  assert checkpoint.Checkpointer(stopped, read_only=True).all_steps() == [step]
  assert os.listdir(checkpoints) == [str(step)]  # complete: no save left in flight
  assert steps(stopped)[-1] == step
  saved = digest(os.path.join(checkpoints, str(step)))

  result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"resuming from checkpoint at step {step}" in result.stdout
  assert losses(stopped) == losses(straight)  # every step, bitwise
  assert steps(stopped) == list(range(1, 15))
  assert digest(os.path.join(checkpoints, str(step))) == saved


@pytest.mark.parametrize("resumed", [False, True])
def test_a_signal_while_starting_stops_before_the_first_step_and_saves_nothing(
    tmp_path, tiny_config, monkeypatch, digest, resumed):
  config = tiny_config(num_train_steps=4, checkpoint_every_steps=2)
  workdir = str(tmp_path / "run")
  if resumed:
    train.train_and_evaluate(config, workdir, stop_at_step=2)
  before = digest(workdir) if resumed else {}
  prepare = processes.make_process_data

  def prepare_then_signal(*args):
    data = prepare(*args)
    os.kill(os.getpid(), signal.SIGTERM)  # a preemption while the run starts
    time.sleep(0.1)  # Python runs the handler between bytecodes
    return data

  monkeypatch.setattr(processes, "make_process_data", prepare_then_signal)
  first, then = (3, "resume") if resumed else (1, "start")
  with pytest.raises(interrupt.Interrupted, match=rf"^stopped by SIGTERM before step {first}: "
                     rf"nothing new to save; run the same command again to {then}$"):
    train.train_and_evaluate(config, workdir)
  saved = {k: v for k, v in digest(workdir).items() if k.startswith("checkpoints/")}
  assert saved == {k: v for k, v in before.items() if k.startswith("checkpoints/")}


@pytest.mark.slow  # fast: the signal tests
def test_a_second_run_on_a_busy_workdir_is_refused_and_a_dead_ones_lock_is_not(
    tmp_path, train_command, digest, repo):
  workdir = str(tmp_path / "run")
  args, env = train_command(workdir, 5000)
  first = _start(args, env, repo, "step 3/")
  before = digest(workdir, skip=("checkpoints",))
  # Another learning rate: had it got past the lock, its config.json would differ.
  args, env = train_command(workdir, 5000, "--config.learning_rate=0.01")
  second = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
  assert second.returncode == 1
  assert second.stderr.strip().splitlines()[-1] == (
      f"error: {workdir} is in use by another run (pid {first.pid}); wait for it to end or "
      f"choose another workdir")
  after = digest(workdir, skip=("checkpoints",))
  # The first run's own logs grow; its config and tokenizer are unchanged.
  logs = lambda name: name == "metrics.jsonl" or name.startswith("tensorboard/")
  assert {k: v for k, v in after.items() if not logs(k)} == {
      k: v for k, v in before.items() if not logs(k)}
  first.kill()  # SIGKILL: its lock file stays behind, its lock does not
  first.wait(timeout=60)
  assert os.path.exists(os.path.join(workdir, ".lock"))
  args, env = train_command(workdir, 4)
  third = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
  assert third.returncode == 0, third.stderr[-2000:]
  assert ("nothing to do: the checkpoint is at step" in third.stdout or
          "resuming from checkpoint at step" in third.stdout)


@pytest.mark.parametrize("filled_by", ["checkpoints", "metrics"])
def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_last_checkpoint(
    tmp_path, train_command, repo, filled_by):
  small = tmp_path / "small"
  small.mkdir()
  # 3 MB hold a few checkpoints of the tiny model; 48 kB the config, the tokenizer and some
  # metrics, with no checkpoint before the end.
  size, steps, flags = {"checkpoints": ("3m", 40, ()),
                        "metrics": ("48k", 400, ("--config.checkpoint_every_steps=0",))}[filled_by]
  if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(small)],
                    capture_output=True).returncode:
    pytest.skip("cannot mount a tmpfs here")
  try:
    workdir = str(small / "run")
    args, env = train_command(workdir, steps, *flags)  # checkpoints every 2 steps, all kept
    result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    # With checkpoints, the disk fills during a save or a metrics write, whichever comes first.
    # Our line ends the output: nothing of Orbax's abandoned writes or TensorBoard's pending
    # events follows it. Orbax logs the failed save's error (timestamped, as every log line)
    # before.
    line = (rf"error: (?:saving a checkpoint in {workdir}/checkpoints|writing metrics in "
            rf"{workdir}) failed \(.+\); the last complete checkpoint is step (\d+)")
    if filled_by == "metrics":
      line = re.escape(f"error: writing metrics in {workdir} failed (No space left on device); "
                       "no checkpoint is complete yet")
    orbax_errors = Repeated(r"E\d{4} [\d:.]+ +\d+ \S+:\d+\] .*")
    assert_output(result, [DATA_LINES, "model: .*", PROGRESS_LINES],
                  [LOG_LINES, orbax_errors, line])
    match = re.fullmatch(line, result.stderr.splitlines()[-1])
    checkpointer = checkpoint.Checkpointer(workdir, read_only=True)
    complete = checkpointer.all_steps()
    if filled_by == "checkpoints":
      assert complete and max(complete) == int(match[1])
      assert checkpointer.verify(max(complete)) is None  # the last complete one reads back
    else:
      assert complete == []
  finally:
    subprocess.run(["umount", str(small)], check=True)


def test_a_second_ctrl_c_aborts_at_once():
  # In this process: the loop's CLI runs finish their step too fast to be signalled twice.
  # Python's own SIGINT handler, as in a CLI process (a test worker may have set another).
  outer = signal.signal(signal.SIGINT, signal.default_int_handler)
  before = signal.getsignal(signal.SIGTERM)
  try:
    with interrupt.StopRequests() as stops:
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.1)  # Python runs the handler between bytecodes
      assert stops.received == signal.SIGINT
      with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) == before  # the first signal restored both
  finally:
    signal.signal(signal.SIGINT, outer)
