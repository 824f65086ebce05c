"""mixtral-plot: loss and expert-load PNGs from a run's metrics.jsonl."""

import os
import subprocess
import sys

from mixtral_jax.training import loop as train

_PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
  with open(path, "rb") as f:
    return f.read(8) == _PNG and os.path.getsize(path) > 10_000


def test_training_ends_with_its_plots_and_mixtral_plot_redraws_them(tmp_path, tiny_config, repo):
  run = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(), run)
  assert _is_png(os.path.join(run, "loss.png")) and _is_png(os.path.join(run, "expert_load.png"))
  out = str(tmp_path / "plots")
  result = subprocess.run([sys.executable, "-m", "mixtral_jax.cli.plot", run, "--out", out],
                          cwd=repo, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == [os.path.join(out, "loss.png"),
                                   os.path.join(out, "expert_load.png")]
  assert all(_is_png(path) for path in result.stdout.split())


def test_a_workdir_without_metrics_is_one_line(tmp_path, repo):
  result = subprocess.run([sys.executable, "-m", "mixtral_jax.cli.plot", str(tmp_path)], cwd=repo,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip() == f"error: {tmp_path} has no metrics.jsonl with train losses to plot"
