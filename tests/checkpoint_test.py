"""Checkpoints: resharding restore, params-only restore, kill -9, NaN steps, bad directories."""

import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax import config as config_lib
from conftest import PROGRESS_LINES, Repeated, assert_output
from mixtral_jax.data import iterator
from mixtral_jax.parallel import sharding
from mixtral_jax.training import build
from mixtral_jax.training import checkpoint
from mixtral_jax.training import loop as train


def restored_on(config, workdir, mesh_shape, devices):
  config = config.copy_and_resolve_references()
  config.mesh.update(dict(zip(sharding.MESH_AXES, mesh_shape)))
  state, _ = build.build(config, devices, abstract=True).restore(checkpoint.Checkpointer(workdir))
  return state


def test_restore_onto_other_meshes_gives_identical_parameters(tmp_path, tiny_config, metrics):
  config = tiny_config(num_train_steps=4)
  config.model.num_experts = 8
  config.mesh.update(data=2, fsdp=1, expert=4, tensor=1)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  original = restored_on(config, workdir, (2, 1, 4, 1), jax.devices())
  expert_shards = original.params["layer_0"]["moe"]["experts"]["gate_up"].addressable_shards
  assert {s.data.shape[0] for s in expert_shards} == {2}  # 8 experts over 4 expert shards
  for mesh_shape, devices in (((1, 1, 8, 1), jax.devices()), ((1, 2, 2, 2), jax.devices()),
                              ((1, 1, 1, 1), jax.devices()[:1])):
    other = restored_on(config, workdir, mesh_shape, devices)
    jax.tree.map(np.testing.assert_array_equal, other, original)
  # Resumed on another mesh, the run continues as on its own (up to summation order).
  same_mesh = str(tmp_path / "same_mesh")
  shutil.copytree(workdir, same_mesh)
  config.update(num_train_steps=6, log_every_steps=1)
  train.train_and_evaluate(config, same_mesh)
  config.mesh.update(data=1, expert=8)
  train.train_and_evaluate(config, workdir)
  losses = lambda run: [r["loss"] for r in metrics(run)]
  assert len(losses(workdir)) == len(losses(same_mesh)) > 2
  np.testing.assert_allclose(losses(workdir), losses(same_mesh), rtol=1e-5)


def test_params_restore_alone_without_the_optimizer_state(tmp_path, tiny_config,
                                                          build_on_one_device):
  config = tiny_config(num_train_steps=2)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  setup = build_on_one_device(config)
  state, _ = setup.restore(checkpoint.Checkpointer(workdir))
  shutil.rmtree(os.path.join(workdir, "checkpoints", "2", "train"))

  checkpointer = checkpoint.Checkpointer(workdir, read_only=True)
  abstract = dict(setup.abstract_state.params)
  params = checkpointer.restore_params(abstract)
  jax.tree.map(np.testing.assert_array_equal, params, state.params)
  assert not np.array_equal(params["embed"], setup.state.params["embed"])  # trained, not init
  abstract["embed"] = jax.ShapeDtypeStruct((320, 64), jnp.float32)
  with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/2 does not match this model: "
                                                       r"params/embed is \(320, 32\) there"):
    checkpointer.restore_params(abstract)


def _run_and_kill(args, env, at_line, repo):
  """Starts training and SIGKILLs it the moment it prints a line starting with `at_line`."""
  proc = subprocess.Popen(args, cwd=repo, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  for line in proc.stdout:
    if line.startswith(at_line):
      os.kill(proc.pid, signal.SIGKILL)
      break
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow  # fast: a damaged latest checkpoint is set aside
def test_kill_9_resumes_from_last_complete_checkpoint(tmp_path, train_command, digest, metrics,
                                                      repo):
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  args, env = train_command(straight, 16)
  subprocess.run(args, cwd=repo, env=env, check=True, capture_output=True, timeout=300)

  args, env = train_command(killed, 16)
  checkpoints = os.path.join(killed, "checkpoints")
  _run_and_kill(args, env, "step 5/", repo)  # between saves (every 2 steps)
  first = checkpoint.Checkpointer(killed, read_only=True).all_steps()
  assert first  # and none of these may change from here on
  first_digests = {s: digest(os.path.join(checkpoints, str(s))) for s in first}
  # A step's log line follows the start of its async save: killing right then catches the
  # save in flight, leaving Orbax's temporary directory instead of a step directory.
  for save_step in (8, 10, 12):
    _run_and_kill(args, env, f"step {save_step}/", repo)
    partial = [d for d in os.listdir(checkpoints) if not d.isdigit()]
    if partial:
      break
  assert partial, "no kill landed while a save was in flight"
  complete = checkpoint.Checkpointer(killed, read_only=True).all_steps()
  assert max(complete) == save_step - 2
  digests = {s: digest(os.path.join(checkpoints, str(s))) for s in complete}

  result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"resuming from checkpoint at step {max(complete)}" in result.stdout
  last = lambda run: (metrics(run)[-1]["step"], metrics(run)[-1]["loss"])
  assert last(killed) == last(straight)
  for step in digests:
    assert digest(os.path.join(checkpoints, str(step))) == digests[step]
  assert {s: digest(os.path.join(checkpoints, str(s))) for s in first} == first_digests
  assert not [d for d in os.listdir(checkpoints) if not d.isdigit()]  # leftovers cleaned up
  # Steps logged after the last checkpoint and redone by the resumed run appear once.
  assert [r["step"] for r in metrics(killed)] == list(range(1, 17))


def test_nan_steps_are_not_applied_and_stop_the_run(tmp_path, tiny_config, metrics,
                                                    monkeypatch):
  config = tiny_config(num_train_steps=20, checkpoint_every_steps=4, max_nan_steps=3)
  real_next = iterator.TrainIterator.__next__

  def nan_from_step_10(batches):
    batch = real_next(batches)  # which advanced batches.step to this batch's training step
    if batches.step >= 10:
      batch = dict(batch, weights=np.full_like(batch["weights"], np.nan))
    return batch

  monkeypatch.setattr(iterator.TrainIterator, "__next__", nan_from_step_10)
  workdir = str(tmp_path / "run")
  with pytest.raises(train.NonFiniteError, match=r"^step 12: loss or gradients were NaN/Inf "
                                                 r"for 3 steps in a row .* checkpoint is step 8"):
    train.train_and_evaluate(config, workdir)
  assert metrics(workdir)[-1]["step"] == 8  # log_every_steps=4: steps 9-12 never reached a log line

  saved, meta = build.build(config, abstract=True).restore(checkpoint.Checkpointer(workdir))
  assert int(saved.step) == 8 and meta.data_position == 8
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved.params))


def test_nonfinite_step_leaves_parameters_unchanged(tiny_config, build_on_one_device):
  setup = build_on_one_device(tiny_config())
  before = jax.device_get(setup.state)  # the step donates the state
  tokens = jax.random.randint(jax.random.PRNGKey(0), (8, 33), 0, 320)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "positions": jnp.broadcast_to(jnp.arange(32), (8, 32)),
           "segment_ids": jnp.ones((8, 32), jnp.int32), "weights": jnp.full((8, 32), jnp.inf)}
  new_state, metrics = setup.train_step(setup.state, batch)
  assert float(metrics["skipped"]) == 1.0 and int(new_state.step) == 1
  assert int(new_state.nonfinite_streak) == int(metrics["nonfinite_streak"]) == 1
  jax.tree.map(np.testing.assert_array_equal, new_state.params, before.params)
  jax.tree.map(np.testing.assert_array_equal, new_state.opt_state, before.opt_state)


def test_a_nonfinite_update_from_finite_gradients_is_not_applied(tiny_config,
                                                                 build_on_one_device):
  setup = build_on_one_device(tiny_config())
  # Negative second moments: AdamW's square root makes the update NaN while the loss and the
  # gradients stay finite (as adam_eps=0 does where a gradient is 0).
  negative_nu = lambda s: s._replace(nu=jax.tree.map(lambda v: -jnp.ones_like(v), s.nu))
  state = setup.state.replace(opt_state=jax.tree.map(
      lambda s: negative_nu(s) if hasattr(s, "nu") else s, setup.state.opt_state,
      is_leaf=lambda s: hasattr(s, "nu")))
  before = jax.device_get(state)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (8, 33), 0, 320)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": jnp.ones((8, 32))}
  new_state, metrics = setup.train_step(state, batch)
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert float(metrics["skipped"]) == 1.0
  jax.tree.map(np.testing.assert_array_equal, new_state.params, before.params)
  jax.tree.map(np.testing.assert_array_equal, new_state.opt_state, before.opt_state)


def test_foreign_model_checkpoint_names_the_mismatch(tmp_path, tiny_config, digest):
  config = tiny_config(num_train_steps=2)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  saved = {k: v for k, v in digest(workdir).items() if k != ".lock"}
  config.num_train_steps = 4
  config.model.hidden_size = 64
  with pytest.raises(config_lib.ConfigError,
                     match=r"^config\.model\.hidden_size: 64 here, 32 in .*checkpoints/2: model, "
                           r"tokenizer and data settings must match to resume"):
    train.train_and_evaluate(config, workdir)
  # Told to resume anyway, the tensors still do not fit.
  config.allow_resume_changes = True
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"checkpoints/2 does not match this model: params/embed is "
                           r"\(320, 32\) there, \(320, 64\) here"):
    train.train_and_evaluate(config, workdir)
  assert {k: v for k, v in digest(workdir).items() if k != ".lock"} == saved  # config.json too


@pytest.mark.parametrize("field,value,message", [
    ("seed", 1, r"^config\.seed: 1 here, 0 in "),
    ("data.eval_fraction", 0.5, r"^config\.data\.eval_fraction: 0\.5 here, 0\.25 in "),
    ("grad_clip_norm", 0.0, r"^config\.grad_clip_norm: 0\.0 here, 1\.0 in .*: turning clipping on "
                            r"or off changes the optimizer state's structure"),
])
def test_resuming_with_other_data_or_optimizer_structure_is_refused(
    tmp_path, tiny_config, digest, field, value, message):
  config = tiny_config(num_train_steps=2)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  saved = {k: v for k, v in digest(workdir).items() if k != ".lock"}
  config.num_train_steps = 4
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    train.train_and_evaluate(config, workdir)
  assert {k: v for k, v in digest(workdir).items() if k != ".lock"} == saved


@pytest.mark.slow  # fast: interrupt_test's resume
def test_resuming_with_another_schedule_warns_and_continues(tmp_path, tiny_config, caplog):
  config = tiny_config(num_train_steps=2)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  config.update(num_train_steps=4, learning_rate=1e-2, log_every_steps=2)
  summary = train.train_and_evaluate(config, workdir)
  assert np.isfinite(summary["final_loss"])
  warning, = [r.getMessage() for r in caplog.records if "changed settings" in r.getMessage()]
  assert "learning_rate: 0.003 → 0.01" in warning and "num_train_steps: 2 → 4" in warning
  assert "log_every_steps" not in warning  # how often it logs is no change to the training


def test_garbage_checkpoint_directory_gives_a_clear_error(tmp_path, tiny_config):
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "7").mkdir(parents=True)
  (workdir / "checkpoints" / "7" / "junk.bin").write_bytes(os.urandom(100))
  config = tiny_config(num_train_steps=2)
  with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/7 is not a readable "
                                                       r"mixtral_jax checkpoint"):
    train.train_and_evaluate(config, str(workdir))
  assert (workdir / "checkpoints" / "7" / "junk.bin").exists()  # nothing deleted


def test_info_lists_checkpoints(tmp_path, tiny_config, repo):
  config = tiny_config(num_train_steps=4, checkpoint_every_steps=2)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  result = subprocess.run([sys.executable, "-m", "mixtral_jax.cli.checkpoint", "info", workdir],
                          cwd=repo, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0
  # The table and nothing else: no notes from Orbax on a read-only manager, no libtpu start-up.
  row = r"step +{} +[\d.]+ MB  next batch {}  num_layers=2, hidden_size=32, .*"
  assert_output(result, [row.format(2, 2), row.format(4, 4)], [])


def _truncate_largest_file(directory) -> None:
  """Damages a checkpoint as a crash of the disk would: its largest array file cut in half."""
  files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)


def test_a_damaged_latest_checkpoint_is_set_aside_and_the_one_before_used(tmp_path, train_command,
                                                                          digest, metrics, repo):
  workdir, straight = str(tmp_path / "run"), str(tmp_path / "straight")
  args, env = train_command(workdir, 8, "--stop_at_step=6")  # checkpoints 2, 4 and 6
  subprocess.run(args, cwd=repo, env=env, check=True, capture_output=True, timeout=300)
  checkpoints = os.path.join(workdir, "checkpoints")
  kept = {step: digest(os.path.join(checkpoints, str(step))) for step in (2, 4)}
  _truncate_largest_file(os.path.join(checkpoints, "6"))
  result = subprocess.run([sys.executable, "-m", "mixtral_jax.cli.checkpoint", "info", "--verify",
                           workdir], cwd=repo, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  row = r"step +{} +[\d.]+ MB  next batch {}  num_layers=2, .*  {}"
  assert_output(result, [row.format(2, 2, "verified"), row.format(4, 4, "verified"),
                         row.format(6, 6, "DAMAGED: Exception: Encountered error while reading "
                                          r"array index: .*")], [])

  args, env = train_command(workdir, 8)
  result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  # The one warning, among the run's own log lines; nothing from Orbax's abandoned reads.
  warning = (rf"W\d{{4}} .* loop.py:\d+\] {checkpoints}/6 is damaged: its arrays do not read "
             rf"back \(Exception: Encountered error while reading array index: .*\); set aside "
             rf"as {checkpoints}/6.damaged, resuming from the checkpoint before it")
  info = Repeated(r"I\d{4} [\d:.]+ +\d+ \S+:\d+\] .*")
  assert_output(result, [f"resuming from checkpoint at step 4 in {workdir}", "model: .*",
                         PROGRESS_LINES, "done: .*"], [info, warning, info])
  assert os.path.isdir(os.path.join(checkpoints, "6.damaged"))
  for step, saved in kept.items():
    assert digest(os.path.join(checkpoints, str(step))) == saved
  assert checkpoint.Checkpointer(workdir, read_only=True).all_steps() == [2, 4, 6, 8]
  args, env = train_command(straight, 8)
  subprocess.run(args, cwd=repo, env=env, check=True, capture_output=True, timeout=300)
  losses = lambda run: {r["step"]: r["loss"] for r in metrics(run)}
  assert losses(workdir) == losses(straight)  # steps 5 and 6 redone exactly, logged once
