"""mixtral-sweep: the space, the trial configs, and sweeps of a tiny model run end to end.

The end-to-end cases run the `mixtral-sweep` command users run; each trial is a `mixtral-train`
process on one CPU device.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from configs import default
from mixtral_jax.sweep import driver as sweep_driver
from mixtral_jax.sweep import space as sweep_space
from mixtral_jax.sweep import study as sweep_study

# The tiny model's settings (as tiny_config's), as the sweep file's get_config() sets them.
_TINY = {"num_train_steps": 6, "global_batch_size": 8, "seq_len": 32, "log_every_steps": 1,
         "eval_every_steps": 2, "eval_batches": 1, "checkpoint_every_steps": 2,
         "warmup_steps": 2}
_TINY_MODEL = {"vocab_size": 320, "hidden_size": 32, "intermediate_size": 48, "num_layers": 2,
               "num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "num_experts": 4,
               "block_size": 16}


@pytest.fixture
def sweep_file(tmp_path, tiny_config):
  """sweep_file(get_sweep_body) → path of a sweep file over tiny_config's model and corpus."""
  data = tiny_config().data

  def make(body: str) -> str:
    path = tmp_path / "sweep.py"
    path.write_text(
        "import optuna\n"
        "from configs import default\n"
        "from mixtral_jax.sweep import Sweep, choice, intuniform, loguniform, uniform\n\n"
        "def get_config():\n"
        "  config = default.get_config()\n"
        f"  config.update({_TINY!r})\n"
        f"  config.model.update({_TINY_MODEL!r})\n"
        f"  config.data.update(data_dir={data.data_dir!r}, source='files', files={data.files!r},"
        " eval_fraction=0.25)\n"
        "  return config\n\n"
        "def get_sweep():\n"
        f"  return {body}\n")
    return str(path)

  return make


def _sweep(repo, env, *flags, check=True, timeout=600):
  result = subprocess.run([sys.executable, "-m", "mixtral_jax.cli.sweep", *flags], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=timeout)
  if check:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  return result


@pytest.fixture
def one_device(cpu_env):
  """The environment of a sweep on one CPU device."""
  return cpu_env(1)


def _csv(workdir):
  with open(os.path.join(workdir, "results.csv")) as f:
    return list(csv.DictReader(f))


def _log(workdir, number):
  with open(os.path.join(workdir, f"trial_{number}", "train.log")) as f:
    return f.read()


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_a_dict_is_a_grid_in_order():
  sweep = sweep_space.as_sweep({"model.num_experts": [4, 8], "model.dispatch": ["dropless",
                                                                              "capacity"]})
  assert sweep.method == "grid" and sweep.objective == "eval_loss"
  assert sweep_space.grid_points(sweep) == [
      {"model.num_experts": 4, "model.dispatch": "dropless"},
      {"model.num_experts": 4, "model.dispatch": "capacity"},
      {"model.num_experts": 8, "model.dispatch": "dropless"},
      {"model.num_experts": 8, "model.dispatch": "capacity"}]
  assert sweep_space.distributions(sweep) == {
      "model.num_experts": CategoricalDistribution([4, 8]),
      "model.dispatch": CategoricalDistribution(["dropless", "capacity"])}


def test_search_ranges_are_optuna_distributions():
  sweep = sweep_space.as_sweep(sweep_space.Sweep(
      params={"learning_rate": sweep_space.loguniform(1e-4, 1e-2),
              "model.router_aux_loss_coef": sweep_space.uniform(0.0, 0.1),
              "model.num_experts": sweep_space.intuniform(2, 8, step=2),
              "model.dispatch": sweep_space.choice("dropless", "capacity"),
              "seed": [0, 1]},
      method="tpe", num_trials=5))
  assert sweep_space.distributions(sweep) == {
      "learning_rate": FloatDistribution(1e-4, 1e-2, log=True),
      "model.router_aux_loss_coef": FloatDistribution(0.0, 0.1),
      "model.num_experts": IntDistribution(2, 8, step=2),
      "model.dispatch": CategoricalDistribution(["dropless", "capacity"]),
      "seed": CategoricalDistribution([0, 1])}
  described = sweep_space.describe(sweep)
  assert described["method"] == "tpe"
  assert optuna.distributions.json_to_distribution(
      described["params"]["learning_rate"]) == FloatDistribution(1e-4, 1e-2, log=True)


@pytest.mark.parametrize("sweep, message", [
    ([1, 2], "get_sweep() returned a list"),
    ({}, "the sweep has no parameters"),
    ({"model.num_experts": []}, "'model.num_experts': give a non-empty list"),
    ({"model.num_experts": 4}, "'model.num_experts': expected a list of values or a range"),
    ({"model.num_experts": [4, 4]}, "repeats a value"),
    ({"learning_rate": sweep_space.loguniform(1e-4, 1e-2)}, "a range needs method 'random' or 'tpe'"),
    (sweep_space.Sweep({"seed": [0, 1]}, method="bayes"), "Sweep.method='bayes': must be one of"),
    (sweep_space.Sweep({"seed": [0, 1]}, method="random"), "needs a positive number of trials"),
    (sweep_space.Sweep({"seed": [0, 1]}, num_trials=3), "a grid runs every point"),
    (sweep_space.Sweep({"seed": [0, 1]}, direction="down"), "Sweep.direction='down'"),
])
def test_a_malformed_sweep_is_one_line(sweep, message):
  with pytest.raises(sweep_space.SweepError) as error:
    sweep_space.as_sweep(sweep)
  assert message in str(error.value) and "\n" not in str(error.value)


def test_an_unknown_field_or_an_overridden_one_is_named():
  config = default.get_config()
  with pytest.raises(sweep_space.SweepError, match=r"sweep field 'model.num_expert' is no config "
                     r"field; did you mean model.num_experts\?"):
    sweep_space.check_fields(config, sweep_space.as_sweep({"model.num_expert": [4, 8]}))
  with pytest.raises(sweep_space.SweepError, match="'mesh.dcn' is a group of fields"):
    sweep_space.check_fields(config, sweep_space.as_sweep({"mesh.dcn": [1]}))
  grid = sweep_space.as_sweep({"model.num_experts": [4, 8]})
  sweep_space.check_fields(config, grid, ["--config.seed=3"])
  with pytest.raises(sweep_space.SweepError, match="--config.model.num_experts sets a field the "
                     "sweep varies"):
    sweep_space.check_fields(config, grid, ["--config.model.num_experts=2"])


def test_a_point_the_validator_rejects_gets_its_message():
  base = default.get_config()
  config = sweep_space.trial_config(base, {"model.num_experts": 4, "learning_rate": 1e-3})
  assert (config.model.num_experts, config.learning_rate) == (4, 1e-3)
  assert base.model.num_experts == 8  # the base is not changed
  with pytest.raises(sweep_space.SweepError, match=r"^config.model.experts_per_token: "):
    sweep_space.trial_config(base, {"model.experts_per_token": 16})
  with pytest.raises(sweep_space.SweepError, match=r"config.model.num_layers='four': the field "
                     "holds a int"):
    sweep_space.trial_config(base, {"model.num_layers": "four"})
  assert sweep_space.trial_flags({"learning_rate": 0.003, "model.remat": True, "seed": 2}) == [
      "--config.learning_rate=0.003", "--config.model.remat=true", "--config.seed=2"]


def test_workers_share_the_gpus():
  assert sweep_driver.split_gpus([], 3) == [None, None, None]
  assert sweep_driver.split_gpus(["0", "1", "2", "3"], 2) == ["0,1", "2,3"]
  assert sweep_driver.split_gpus(["4", "5", "6"], 3) == ["4", "5", "6"]
  with pytest.raises(sweep_space.SweepError, match="--workers=3: this host has 2 GPUs"):
    sweep_driver.split_gpus(["0", "1"], 3)


def test_another_space_in_the_same_workdir_is_refused(tmp_path):
  sweep_study.open_study(str(tmp_path), sweep_space.as_sweep({"seed": [0, 1]}))
  again = sweep_study.open_study(str(tmp_path), sweep_space.as_sweep({"seed": [0, 1]}))
  assert len(again.trials) == 2  # the grid is queued once
  with pytest.raises(sweep_space.SweepError, match="holds a sweep over another space"):
    sweep_study.open_study(str(tmp_path), sweep_space.as_sweep({"seed": [0, 1, 2]}))


def test_a_grid_runs_in_two_workers_and_writes_its_results(tmp_path, repo, sweep_file,
                                                            one_device):
  config = sweep_file('{"model.num_experts": [2, 4], "model.experts_per_token": [1, 2]}')
  workdir = str(tmp_path / "sweep")
  result = _sweep(repo, one_device, f"--config={config}", f"--workdir={workdir}", "--workers=2",
                  "--config.seed=1")
  rows = _csv(workdir)
  assert [r["state"] for r in rows] == ["complete"] * 4
  points = {(int(r["model.num_experts"]), int(r["model.experts_per_token"])) for r in rows}
  assert points == {(2, 1), (2, 2), (4, 1), (4, 2)}
  values = [float(r["eval_loss"]) for r in rows]
  assert values == sorted(values)  # best first
  for row in rows:  # each trained once, in its own workdir, to the last step
    number = int(row["trial"])
    log = _log(workdir, number)
    assert log.count("model: ") == 1 and "resuming" not in log, log
    assert int(row["steps"]) == 6
    with open(os.path.join(workdir, f"trial_{number}", "config.json")) as f:
      trained = json.load(f)
    assert trained["seed"] == 1  # the command line's override reached every trial
    assert (trained["model"]["num_experts"], trained["model"]["experts_per_token"]) == (
        int(row["model.num_experts"]), int(row["model.experts_per_token"]))
  best = rows[0]
  with open(os.path.join(workdir, f"trial_{best['trial']}", "metrics.jsonl")) as f:
    evals = [r["eval_loss"] for r in map(json.loads, f) if "eval_loss" in r]
  assert float(best["eval_loss"]) == evals[-1]
  with open(os.path.join(workdir, "results.md")) as f:
    table = f.read()
  assert table.splitlines()[0].startswith("| trial | state | model.num_experts | "
                                          "model.experts_per_token | eval_loss | ce_loss |")
  assert len(table.splitlines()) == 6 and table in result.stdout
  for name in ("eval_loss_curves.png", "max_load_curves.png", "objective_by_field.png"):
    with open(os.path.join(workdir, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  again = _sweep(repo, one_device, f"--config={config}", f"--workdir={workdir}",
                 "--config.seed=1")
  assert "started" not in again.stdout and table in again.stdout  # nothing runs twice
  status = _sweep(repo, one_device, "status", workdir)
  assert status.stdout == table


@pytest.mark.slow  # fast: the grid in two workers
def test_a_killed_sweep_resumes_its_trial_from_the_checkpoint(tmp_path, repo, sweep_file,
                                                              one_device, train_command):
  config = sweep_file('{"model.experts_per_token": [1, 2]}')
  workdir = str(tmp_path / "sweep")
  flags = [f"--config={config}", f"--workdir={workdir}", "--config.num_train_steps=10",
           "--poll_seconds=0.2"]
  driver = subprocess.Popen([sys.executable, "-m", "mixtral_jax.cli.sweep", *flags], cwd=repo,
                            env=one_device, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  metrics = os.path.join(workdir, "trial_0", "metrics.jsonl")
  deadline = time.monotonic() + 300
  while not (os.path.exists(metrics) and max(_losses(os.path.dirname(metrics)), default=0) >= 3):
    assert time.monotonic() < deadline and driver.poll() is None, driver.stderr.read()[-2000:]
    time.sleep(0.1)
  driver.kill()  # kill -9: no handler runs; the trial's process gets SIGTERM from the kernel
  driver.wait()
  result = _sweep(repo, one_device, *flags)
  assert "trial 0 (model.experts_per_token=1) was interrupted; resuming it" in result.stdout
  log = _log(workdir, 0)
  assert "stopped by SIGTERM" in log and "resuming from checkpoint at step" in log, log
  rows = _csv(workdir)
  assert sorted((r["trial"], r["state"], r["steps"]) for r in rows) == [
      ("0", "complete", "10"), ("1", "complete", "10")]
  assert _log(workdir, 1).count("model: ") == 1  # the second point ran once
  with open(os.path.join(workdir, "trial_0", "trial.json")) as f:
    command = json.load(f)["command"]
  alone = str(tmp_path / "alone")
  command = [arg if not arg.startswith("--workdir=") else f"--workdir={alone}" for arg in command]
  subprocess.run(command, cwd=repo, env=one_device, check=True, capture_output=True,
                 timeout=300)
  resumed, uninterrupted = _losses(os.path.join(workdir, "trial_0")), _losses(alone)
  assert sorted(resumed) == list(range(1, 11)) and resumed.keys() == uninterrupted.keys()
  for step in uninterrupted:
    assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6), step


def test_a_diverging_trial_is_pruned_and_an_invalid_one_fails_alone(tmp_path, repo, sweep_file,
                                                                    one_device):
  config = sweep_file('Sweep({"learning_rate": [3e-3, 3.0, -1.0]}, '
                      'pruner=optuna.pruners.MedianPruner(n_startup_trials=1))')
  workdir = str(tmp_path / "sweep")
  _sweep(repo, one_device, f"--config={config}", f"--workdir={workdir}",
         "--config.num_train_steps=12", "--poll_seconds=0.2")
  rows = {r["learning_rate"]: r for r in _csv(workdir)}
  assert [r["state"] for r in _csv(workdir)] == ["complete", "pruned", "fail"]
  assert rows["0.003"]["steps"] == "12"
  assert int(rows["3.0"]["steps"]) < 12 and rows["3.0"]["note"].startswith("pruned at step")
  assert rows["-1.0"]["note"] == ("invalid: config.learning_rate: must be positive and finite, "
                                  "got -1.0")
  assert not os.path.exists(os.path.join(workdir, "trial_2", "train.log"))  # never started


def test_bad_sweep_input_is_one_line(tmp_path, repo, sweep_file, one_device):
  config = sweep_file('{"model.num_expert": [2, 4]}')
  result = _sweep(repo, one_device, f"--config={config}", f"--workdir={tmp_path / 'w'}",
                  check=False)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      "error: sweep field 'model.num_expert' is no config field; did you mean model.num_experts?"]
  result = _sweep(repo, one_device, "status", str(tmp_path / "nothing"), check=False)
  assert result.returncode == 1 and "holds no sweep" in result.stderr


@pytest.mark.slow
def test_two_drivers_share_one_study(tmp_path, repo, sweep_file, one_device):
  config = sweep_file('{"model.num_experts": [2, 4], "model.experts_per_token": [1, 2]}')
  workdir = str(tmp_path / "sweep")
  command = [sys.executable, "-m", "mixtral_jax.cli.sweep", f"--config={config}",
             f"--workdir={workdir}"]
  drivers = [subprocess.Popen(command, cwd=repo, env=one_device, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
  outputs = [d.communicate(timeout=600) for d in drivers]
  assert [d.returncode for d in drivers] == [0, 0], outputs
  started = [[line.split()[1] for line in out.splitlines() if line.endswith(
      tuple(f"trial_{n}" for n in range(4))) and "started" in line] for out, _ in outputs]
  assert all(started) and not set(started[0]) & set(started[1])  # both worked, disjoint trials
  assert sorted(started[0] + started[1]) == ["0", "1", "2", "3"]
  assert [r["state"] for r in _csv(workdir)] == ["complete"] * 4


@pytest.mark.slow  # fast: the grid in two workers
def test_on_a_pod_every_trial_trains_on_the_whole_mesh(tmp_path, repo, sweep_file):
  # 2 processes × 2 CPU devices through launch/local.sh: one study (process 0's), each trial
  # one 2-process mixtral-train on the 4-device mesh.
  config = sweep_file('{"model.experts_per_token": [1, 2]}')
  workdir = str(tmp_path / "sweep")
  result = subprocess.run(
      ["bash", os.path.join(repo, "launch", "local.sh"), "--num_processes=2",
       "--devices_per_process=2", "--sweep", "--grace=60", "--", f"--config={config}",
       f"--workdir={workdir}", "--config.mesh.expert=2"],
      cwd=repo, env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  assert [r["state"] for r in _csv(workdir)] == ["complete"] * 2
  with open(os.path.join(workdir, "logs", "process_1.log")) as f:
    follower = f.read()
  assert "trial 0: process 1 of 2" in follower and "trial 1: process 1 of 2" in follower
  for number in (0, 1):
    assert "mesh {'data': 2, 'fsdp': 1, 'expert': 2, 'tensor': 1}" in _log(workdir, number)
    with open(os.path.join(workdir, f"trial_{number}", "train_process_1.log")) as f:
      assert '"eval_loss"' in f.read().splitlines()[-1]  # process 1 trained it to the end
  assert not os.path.exists(os.path.join(workdir, "trial_0", "train_process_0.log"))


@pytest.mark.parametrize("kind", ["rdb", "journal"])
def test_workers_on_other_hosts_share_a_study_through_storage(tmp_path, kind):
  storage = (f"sqlite:///{tmp_path}/study.db" if kind == "rdb" else
             str(tmp_path / "shared" / "study.journal"))
  for name in ("shared", "a", "b"):
    os.makedirs(tmp_path / name)
  grid = sweep_space.as_sweep({"seed": [0, 1, 2]})
  first = sweep_study.open_study(str(tmp_path / "a"), grid, storage)
  trial = first.ask(sweep_space.distributions(grid))
  first.tell(trial, 1.5)
  # Another host: its own directory, the same storage; the grid is not queued again.
  other = sweep_study.open_study(str(tmp_path / "b"), grid, storage)
  assert [(t.number, t.state.name, t.params) for t in other.trials] == [
      (0, "COMPLETE", {"seed": 0}), (1, "WAITING", {}), (2, "WAITING", {})]
  assert not os.path.exists(tmp_path / "a" / "study.journal")


def test_a_stopped_sweep_saves_its_trial_and_a_rerun_finishes_it(tmp_path, repo, sweep_file,
                                                                 one_device):
  config = sweep_file('{"model.experts_per_token": [2]}')
  workdir = str(tmp_path / "sweep")
  flags = [f"--config={config}", f"--workdir={workdir}", "--config.num_train_steps=10",
           "--poll_seconds=0.2"]
  driver = subprocess.Popen([sys.executable, "-m", "mixtral_jax.cli.sweep", *flags], cwd=repo,
                            env=one_device, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
  metrics = os.path.join(workdir, "trial_0", "metrics.jsonl")
  deadline = time.monotonic() + 300
  while not (os.path.exists(metrics) and max(_losses(os.path.dirname(metrics)), default=0) >= 3):
    assert time.monotonic() < deadline and driver.poll() is None
    time.sleep(0.1)
  driver.send_signal(signal.SIGTERM)  # as a preemption or Ctrl-C would
  out, err = driver.communicate(timeout=300)
  assert driver.returncode == 143, err[-2000:]
  assert err.strip().splitlines()[-1] == "stopped by SIGTERM; rerun the same command to resume"
  assert [(r["state"], r["note"]) for r in _csv(workdir)] == [("running", "")]
  assert "stopped by SIGTERM at step" in _log(workdir, 0)
  result = _sweep(repo, one_device, *flags)
  assert "trial 0 (model.experts_per_token=2) was interrupted; resuming it" in result.stdout
  assert [(r["state"], r["steps"]) for r in _csv(workdir)] == [("complete", "10")]
