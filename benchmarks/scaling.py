"""Train-step speed as sequence length and expert count grow (issue 7's scaling plots).

Both sweeps start from issue 7's reference config (benchmarks/reference.py) on one CPU device:
- seq_len 256 → 2048 with tokens per step held at 4096 (batch 16 → 2): model FLOPs per token
  grow only through causal attention, so tokens/s should fall far slower than T grows.
- E = 8 → 64 experts with k = 2 (batch 16×256): active FLOPs per token are constant, only the
  router (D·E), dispatch padding (each expert's group is rounded up to a block) and the
  optimizer (whose work is proportional to all parameters, E of the experts) grow with E. The
  step is timed whole and as fwd+bwd alone, which leaves the optimizer out.

Every variant is compiled first, then rounds alternate over all of them (median per variant),
so machine load falls on each alike. Tables go into benchmarks/README.md, plots beside it as
scaling_seq_len.png and scaling_experts.png.

Run: `python benchmarks/scaling.py [--rounds R] [--no-write]`.
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.reference import (PEAK_SIZE, Ours, make_batches, model_flops_per_token,  # noqa: E402
                                  peak_matmul_seconds, reference_config)
from benchmarks.report import write_section  # noqa: E402
from mixtral_jax.model.mixtral import count_params  # noqa: E402
from mixtral_jax.runtime import cpu_runtime  # noqa: E402
from mixtral_jax.training import step as step_lib  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENS_PER_STEP = 4096
SEQ_LENS = (256, 512, 1024, 2048)
NUM_EXPERTS = (8, 16, 32, 64)


class Variant:
  """One config's jitted train step and fwd+bwd, with its batch and timings."""

  def __init__(self, config):
    self.config = config
    self.trainer = Ours(config)
    batch = make_batches(1, config.global_batch_size, config.seq_len, config.model.vocab_size)[0]
    self.batch = jax.device_put(batch)
    loss_fn = step_lib.make_loss_fn(self.trainer.setup.model)
    self.grad_fn = jax.jit(jax.grad(lambda p, b: loss_fn(p, b, jax.random.PRNGKey(0))[0]))
    self.params = jax.tree.map(jnp.copy, self.trainer.state.params)  # the step donates its own
    self.step_s, self.grad_s = [], []
    self.params_total = count_params(self.params, config.model)[0]
    self.step()  # compile, warm up
    self.grad()

  def step(self) -> float:
    return self.trainer.timed_step(self.batch)

  def grad(self) -> float:
    start = time.perf_counter()
    jax.block_until_ready(self.grad_fn(self.params, self.batch))
    return time.perf_counter() - start

  @property
  def tokens_per_s(self) -> float:
    return TOKENS_PER_STEP / statistics.median(self.step_s)


def seq_len_config(seq_len: int):
  config = reference_config(1)
  config.seq_len, config.global_batch_size = seq_len, TOKENS_PER_STEP // seq_len
  return config


def experts_config(num_experts: int):
  config = reference_config(1)
  config.model.num_experts = num_experts
  return config


def plot(path: str, x, series: dict, xlabel: str, ylabel: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, (ys, style) in series.items():
    ax.plot(x, ys, style, label=label)
  ax.set_xscale("log", base=2)
  ax.set_xticks(x, [str(v) for v in x])
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
  ax.set_ylim(bottom=0)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--no-write", action="store_true", help="print only; write no files")
  args = parser.parse_args()
  cpu_runtime.reuse_step_memory()  # as mixtral-train does

  by_seq = {t: Variant(seq_len_config(t)) for t in SEQ_LENS}
  by_experts = {e: (by_seq[256] if e == 8 else Variant(experts_config(e))) for e in NUM_EXPERTS}
  variants = list(by_seq.values()) + [v for e, v in by_experts.items() if e != 8]
  peak_s = peak_matmul_seconds()
  for r in range(args.rounds):
    for v in variants:
      v.step_s.append(v.step())
      v.grad_s.append(v.grad())
    peak_s = min(peak_s, peak_matmul_seconds())
    print(f"round {r + 1}/{args.rounds}", flush=True)
  peak = 2 * PEAK_SIZE ** 3 / peak_s

  def mfu(v):
    return model_flops_per_token(v.config.model, v.config.seq_len) * v.tokens_per_s / peak

  base = by_seq[256]
  seq_lines = [
      f"Reference config (hidden 256, 4 layers, E=8, k=2, f32), {TOKENS_PER_STEP} tokens per "
      f"step, 1 CPU device, JAX {jax.__version__}; median of {args.rounds} alternating rounds; "
      f"peak f32 matmul {peak / 1e9:.0f} GFLOP/s measured in the same run.", "",
      "| seq_len × batch | model MFLOP/token | tokens/s | ÷ T=256 | MFU |",
      "|---|---:|---:|---:|---:|"]
  for t, v in by_seq.items():
    seq_lines.append(
        f"| {t} × {v.config.global_batch_size} | "
        f"{model_flops_per_token(v.config.model, t) / 1e6:.1f} | {v.tokens_per_s:,.0f} | "
        f"{v.tokens_per_s / base.tokens_per_s:.2f} | {mfu(v):.1%} |")
  step8 = statistics.median(base.step_s)
  grad8 = statistics.median(base.grad_s)
  experts_lines = [
      "Reference config (batch 16×256, k=2) with E experts per layer, same run and rounds as "
      "above. Active FLOPs per token are the same for every E.", "",
      "| E | parameters (M) | train step ms | ÷ E=8 | fwd+bwd ms | ÷ E=8 | tokens/s |",
      "|---|---:|---:|---:|---:|---:|---:|"]
  for e, v in by_experts.items():
    step, grad = statistics.median(v.step_s), statistics.median(v.grad_s)
    experts_lines.append(
        f"| {e} | {v.params_total / 1e6:.1f} | {step * 1e3:.0f} | {step / step8:.2f} | "
        f"{grad * 1e3:.0f} | {grad / grad8:.2f} | {v.tokens_per_s:,.0f} |")
  print("\n".join(seq_lines + [""] + experts_lines))
  if args.no_write:
    return
  write_section("scaling_seq_len", "\n".join(seq_lines))
  write_section("scaling_experts", "\n".join(experts_lines))
  plot(os.path.join(HERE, "scaling_seq_len.png"), list(SEQ_LENS),
       {"tokens/s": ([v.tokens_per_s for v in by_seq.values()], "o-")},
       "seq_len (tokens per step fixed at 4096)", "tokens/s",
       "Train step throughput vs sequence length")
  experts = list(NUM_EXPERTS)
  plot(os.path.join(HERE, "scaling_experts.png"), experts,
       {"train step ÷ E=8": ([statistics.median(by_experts[e].step_s) / step8 for e in experts],
                             "o-"),
        "fwd+bwd ÷ E=8": ([statistics.median(by_experts[e].grad_s) / grad8 for e in experts],
                          "s-"),
        "E ÷ 8 (linear growth)": ([e / 8 for e in experts], "k--")},
       "experts per layer E (k = 2)", "time ÷ time at E=8", "Step time vs number of experts")


if __name__ == "__main__":
  main()
