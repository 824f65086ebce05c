"""Training metrics as TensorBoard scalars, read back with TensorBoard's own event reader."""

import math
import os
import shutil
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing import event_accumulator

from mixtral_jax.training import loop as train
from mixtral_jax.training import metrics as metrics_lib


def _board(workdir) -> event_accumulator.EventAccumulator:
  board = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"),
                                             size_guidance={event_accumulator.SCALARS: 0})
  board.Reload()
  return board


def _series(board, tag) -> list[tuple[int, float]]:
  return [(event.step, event.value) for event in board.Scalars(tag)]


def test_tensorboard_holds_every_metric_per_layer_and_per_expert(tmp_path, tiny_config, metrics):
  run = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(), run)  # 12 steps, logs every 4, evals at 8 and 12
  records, board = metrics(run), _board(run)
  tags = set(board.Tags()["scalars"])
  expected = {"loss", "ce_loss", "aux_loss", "z_loss", "learning_rate", "grad_norm",
              "tokens_per_sec", "dropped_fraction", "eval_loss", "eval_perplexity"}
  for layer in range(2):  # tiny_config: 2 layers of 4 experts
    expected |= {f"aux_loss/layer_{layer}", f"z_loss/layer_{layer}",
                 f"dropped_fraction/layer_{layer}", f"router_entropy/layer_{layer}"}
    expected |= {f"expert_load/layer_{layer}/expert_{e}" for e in range(4)}
  assert expected <= tags, sorted(expected - tags)
  for tag, name, index in (("loss", "loss", ()), ("learning_rate", "learning_rate", ()),
                           ("eval_loss", "eval_loss", ()),
                           ("eval_perplexity", "eval_perplexity", ()),
                           ("aux_loss/layer_1", "aux_loss_per_layer", (1,)),
                           ("z_loss/layer_0", "z_loss_per_layer", (0,)),
                           ("router_entropy/layer_1", "router_entropy_per_layer", (1,)),
                           ("expert_load/layer_1/expert_3", "expert_load", (1, 3))):
    logged = []
    for record in records:
      if name in record:
        value = record[name]
        for i in index:
          value = value[i]
        logged.append((record["step"], value))
    assert logged, name
    got = _series(board, tag)
    assert [s for s, _ in got] == [s for s, _ in logged], tag
    assert [v for _, v in got] == pytest.approx([v for _, v in logged], rel=1e-6), tag
  for record in records:  # a router's entropy lies between certain (0) and undecided (log E)
    assert all(0 <= h <= math.log(4) + 1e-6 for h in record["router_entropy_per_layer"])
    assert sum(record["aux_loss_per_layer"]) / 2 == pytest.approx(record["aux_loss"], rel=1e-5)


def test_tensorboard_holds_the_expert_health_and_the_bias_range(tmp_path, tiny_config,
                                                                 metrics):
  config = tiny_config()
  config.model.update(router_balance="aux_free", router_bias_rate=0.01)
  run = str(tmp_path / "run")
  train.train_and_evaluate(config, run)
  records, board = metrics(run), _board(run)
  logged = [r for r in records if "loss" in r]
  for tag, name, index in (("max_load_ratio", "max_load_ratio", ()),
                           ("starved_experts", "starved_experts", ()),
                           ("max_load_ratio/layer_1", "max_load_ratio_per_layer", (1,)),
                           ("starved_experts/layer_0", "starved_experts_per_layer", (0,)),
                           ("router_bias_range/layer_0", "router_bias_range_per_layer", (0,)),
                           ("router_bias_range/layer_1", "router_bias_range_per_layer", (1,))):
    values = [r[name] for r in logged]
    for i in index:
      values = [v[i] for v in values]
    got = _series(board, tag)
    assert [s for s, _ in got] == [r["step"] for r in logged], tag
    assert [v for _, v in got] == pytest.approx(values, rel=1e-6), tag
  for record in logged:  # 4 experts: the busiest holds between 1/4 and 1/2 of the slots (k=2)
    assert all(1.0 <= x <= 2.0 for x in record["max_load_ratio_per_layer"])
    assert all(0 <= x <= 2 for x in record["starved_experts_per_layer"])
  assert logged[-1]["router_bias_range_per_layer"][0] > 0


def test_a_resumed_run_replaces_the_events_it_logs_again(tmp_path, tiny_config, metrics):
  run = str(tmp_path / "run")
  config = tiny_config(checkpoint_every_steps=4, log_every_steps=2, eval_every_steps=0)
  train.train_and_evaluate(config, run, stop_at_step=6)  # checkpoints 4 and 6
  shutil.rmtree(os.path.join(run, "checkpoints", "6"))  # resumes from 4: logs 5, 6 again
  train.train_and_evaluate(config, run)
  steps = [r["step"] for r in metrics(run) if "loss" in r]
  assert steps == [1, 2, 4, 5, 6, 8, 10, 12]
  assert [s for s, _ in _series(_board(run), "loss")] == steps


def test_scalars_name_each_value():
  record = {"step": 3, "loss": 2.5, "aux_loss_per_layer": [1.0, 2.0],
            "expert_load": [[0.25, 0.75], [0.5, 0.5]]}
  assert metrics_lib.scalars(record) == {
      "loss": 2.5, "aux_loss/layer_0": 1.0, "aux_loss/layer_1": 2.0,
      "expert_load/layer_0/expert_0": 0.25, "expert_load/layer_0/expert_1": 0.75,
      "expert_load/layer_1/expert_0": 0.5, "expert_load/layer_1/expert_1": 0.5}


def test_starting_a_run_leaves_pytorch_unloaded_and_importable(repo):
  # tensorboardX imports torch whenever it is installed (the dev extra installs it): seconds of
  # every start-up, for nothing a run uses.
  script = ("import sys, mixtral_jax.main\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "import torch\n"
            "print(torch.ones(2).sum().item())\n")
  out = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["2.0"]
