"""Training loop: overfitting one batch, an end-to-end run with metrics, the CLI, bad configs."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from mixtral_jax import checkpoint
from mixtral_jax import config as config_lib
from mixtral_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(tmp_path, **overrides):
  config = default.get_config()
  config.update(num_train_steps=12, global_batch_size=8, seq_len=32, log_every_steps=4,
                eval_every_steps=8, eval_batches=2, warmup_steps=2)
  config.model.update(vocab_size=320, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, num_experts=4, block_size=16)
  config.data.update(data_dir=str(tmp_path / "data"), source="files",
                     files=str(tmp_path / "src" / "*.py"), eval_fraction=0.25)
  os.makedirs(tmp_path / "src", exist_ok=True)
  for i in range(16):
    (tmp_path / "src" / f"module_{i}.py").write_text("".join(
        f"def f_{i}_{j}(x, y={j}):\n    return [v * {i + j} for v in range(x) if v > y]\n\n"
        for j in range(40)))
  config.update(overrides)
  return config


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_tiny_model_overfits_one_batch(tmp_path, dispatch):
  config = tiny_config(tmp_path, learning_rate=1e-2, warmup_steps=10, num_train_steps=300,
                       weight_decay=0.0, global_batch_size=4, seq_len=32)
  config.model.update(vocab_size=64, hidden_size=64, intermediate_size=64, dispatch=dispatch,
                      router_aux_loss_coef=0.0, router_z_loss_coef=0.0)
  model = train.build_model(config)
  optimizer = train.make_optimizer(config)
  state = train.init_state(config, model, optimizer)
  step = jax.jit(train.make_train_step(config, model, optimizer))
  tokens = jax.random.randint(jax.random.PRNGKey(0), (4, 33), 0, 64)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": jnp.ones((4, 32))}
  for _ in range(config.num_train_steps):
    state, metrics = step(state, batch)
  assert float(metrics["ce_loss"]) < 0.1


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
  config = tiny_config(tmp_path)
  # Router losses are per micro-batch statistics; the token-mean cross-entropy is not.
  config.model.update(router_aux_loss_coef=0.0, router_z_loss_coef=0.0)
  model = train.build_model(config)
  optimizer = train.make_optimizer(config)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (4, 33), 0, 320)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": jnp.ones((4, 32))}
  results = []
  for accum in (1, 2, 4):
    config.grad_accum_steps = accum
    state = train.init_state(config, model, optimizer)
    results.append(jax.jit(train.make_train_step(config, model, optimizer))(state, batch))
  (state1, metrics1), *accumulated = results
  for state, metrics in accumulated:
    np.testing.assert_allclose(metrics["ce_loss"], metrics1["ce_loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], metrics1["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 state.params, state1.params)


def test_training_run_writes_metrics_and_learns(tmp_path):
  config = tiny_config(tmp_path, num_train_steps=40, learning_rate=1e-2, log_every_steps=10,
                       eval_every_steps=20)
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["step"] for r in records] == [1, 10, 20, 30, 40]
  required = {"step", "loss", "ce_loss", "aux_loss", "z_loss", "learning_rate", "grad_norm",
              "tokens_per_sec", "dropped_fraction", "expert_load"}
  for record in records:
    assert required <= set(record)
    load = np.array(record["expert_load"])
    assert load.shape == (2, 4)
    np.testing.assert_allclose(load.sum(axis=1), 1.0, rtol=1e-5)
  assert {r["step"] for r in records if "eval_loss" in r} == {20, 40}
  assert summary["final_loss"] < summary["first_loss"] - 1.0
  assert summary["eval_loss"] < summary["unigram_entropy"]


def test_resume_continues_exactly(tmp_path):
  config = tiny_config(tmp_path, num_train_steps=12, checkpoint_every_steps=0, log_every_steps=1)
  train.train_and_evaluate(config, str(tmp_path / "straight"))
  train.train_and_evaluate(config, str(tmp_path / "resumed"), stop_at_step=6)
  assert train.train_and_evaluate(config, str(tmp_path / "resumed"), stop_at_step=6) == {
      "resumed_step": 6}
  train.train_and_evaluate(config, str(tmp_path / "resumed"))

  def losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, open(tmp_path / run / "metrics.jsonl"))}
  assert losses("resumed") == losses("straight")  # every step, bitwise
  assert sorted(losses("resumed")) == list(range(1, 13))

  model = train.build_model(config)
  template = train.init_state(config, model, train.make_optimizer(config))
  finals = [checkpoint.Checkpointer(str(tmp_path / run)).restore(template)
            for run in ("straight", "resumed")]
  assert int(finals[0][0].step) == int(finals[1][0].step) == 12
  assert finals[0][1]["data_position"] == finals[1][1]["data_position"] == 12
  jax.tree.map(np.testing.assert_array_equal, finals[0][0], finals[1][0])


def test_invalid_config_fails_before_compiling_with_field_name(tmp_path):
  cases = {
      "model.experts_per_token": dict(experts_per_token=5),
      "model.num_heads": dict(num_heads=3),
      "model.dispatch": dict(dispatch="dense"),
      "model.hidden_size": dict(hidden_size=0),
      "model.num_experts": dict(num_experts=-2),
      "data.source": dict(source="web"),
      "data.tfds_name": dict(source="tfds"),
      "data.num_streams": dict(num_streams=0),
  }
  for field, overrides in cases.items():
    config = tiny_config(tmp_path)
    (config.data if field.startswith("data.") else config.model).update(overrides)
    with pytest.raises(config_lib.ConfigError, match=f"^config\\.{field.replace('.', '[.]')}:"):
      config_lib.validate(config)


def test_cli_reports_bad_config_in_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "mixtral_jax.train", "--config=configs/default.py",
       f"--workdir={tmp_path / 'run'}", "--config.model.experts_per_token=9"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == (
      "error: config.model.experts_per_token: 9 exceeds model.num_experts=8")
  assert not os.path.exists(tmp_path / "run")


def test_cli_reports_a_glob_matching_nothing_in_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "mixtral_jax.train", "--config=configs/default.py",
       f"--workdir={tmp_path / 'run'}", "--config.data.source=files",
       f"--config.data.files={tmp_path}/corpus/*.txt", f"--config.data.data_dir={tmp_path}"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: config.data.files: '{tmp_path}/corpus/*.txt' matches no files")
