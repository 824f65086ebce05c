"""The README's upcycling experiment: an MoE upcycled from a dense run of ours against the same
MoE trained from scratch, at equal total steps, on the embedded corpus.

    .venv/bin/python experiments/upcycling.py [--workdir=workdir/experiments/upcycling]

1. dense: the default config with one expert (a dense model of the MoE's expert width) for
   DENSE_STEPS steps;
2. upcycled: its last checkpoint as 8 copies of that MLP, top-2 (tools/upcycle.py), trained
   MOE_STEPS more steps with a fresh optimizer and schedule;
3. scratch: the default MoE (8 experts, top-2) for DENSE_STEPS + MOE_STEPS steps.
Prints the eval losses and writes docs/upcycling_eval_loss.png.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default  # noqa: E402
from mixtral_jax.tools import upcycle  # noqa: E402
from mixtral_jax.training import loop, metrics  # noqa: E402
from mixtral_jax.training.plot import plt, save_png  # noqa: E402

DENSE_STEPS, MOE_STEPS = 250, 250


def _config(steps: int, **model):
  config = default.get_config()
  config.update(num_train_steps=steps, eval_every_steps=50, checkpoint_every_steps=steps)
  config.model.update(model)
  return config


def _evals(workdir: str, offset: int = 0) -> list[tuple[int, float]]:
  return [(r["step"] + offset, r["eval_loss"]) for r in metrics.read_records(workdir)
          if "eval_loss" in r]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="workdir/experiments/upcycling")
  parser.add_argument("--plot", default="docs/upcycling_eval_loss.png")
  args = parser.parse_args()
  run = lambda name: os.path.join(args.workdir, name)
  loop.train_and_evaluate(_config(DENSE_STEPS, num_experts=1, experts_per_token=1), run("dense"))
  if not os.path.exists(os.path.join(run("upcycled"), "checkpoints")):
    upcycle.upcycle_run(run("dense"), run("upcycled"), upcycle.Upcycling(8, 2))
  upcycled = _config(MOE_STEPS)
  upcycled.data.tokenizer_path = os.path.abspath(os.path.join(run("upcycled"), "tokenizer.model"))
  loop.train_and_evaluate(upcycled, run("upcycled"))
  loop.train_and_evaluate(_config(DENSE_STEPS + MOE_STEPS), run("scratch"))

  dense = _evals(run("dense"))
  # At its step 0 the upcycled model computes the dense one (copies): the dense run's last eval.
  curves = {"dense (1 expert)": dense,
            "upcycled to 8 experts, top-2": dense[-1:] + _evals(run("upcycled"), DENSE_STEPS),
            "8 experts, top-2, from scratch": _evals(run("scratch"))}
  print("| run | eval loss by total step |\n|---|---|")
  for name, points in curves.items():
    print(f"| {name} | " + ", ".join(f"{s}: {v:.3f}" for s, v in points) + " |")
  figure, axis = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
  for name, points in curves.items():
    axis.plot(*zip(*points), marker="o", label=name)
  axis.axvline(DENSE_STEPS, color="gray", linewidth=0.8, linestyle=":")
  axis.set(xlabel="total training steps", ylabel="eval loss (nats/token)",
           title="Upcycled from a dense run vs trained from scratch")
  axis.legend()
  save_png(figure, args.plot)
  print(f"wrote {args.plot}")


if __name__ == "__main__":
  main()
