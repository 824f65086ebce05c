"""Training tokens/s of our framework vs HF transformers MixtralForCausalLM (PyTorch) on one CPU.

Issue 7's reference config: vocab 8000, hidden 256, expert intermediate 512, 4 layers, 8 heads,
2 KV heads (head_dim 32), 8 experts, top-2, seq_len 256, global batch 16, AdamW, float32, one
device. Ours is the train step of mixtral_jax/train.py (dropless dispatch, grouped matmul
"auto"); PyTorch is MixtralForCausalLM with experts_implementation "grouped_mm" and "eager",
torch.optim.AdamW with the same schedule, betas, eps and weight decay (matrices only), and
gradient clipping at 1.0. All three start from the same parameters (ours, exported with
mixtral_jax.convert) and train on the same fixed batches in the same order: their
cross-entropies are equal at step 1 and must stay close. (The aux losses are each framework's
own: HF averages router load and probability over all layers before multiplying them, we
multiply per layer, so the two values and their gradients differ a little.)

Each variant runs in its own worker process, so neither framework's threads, allocator
settings or heap touch the other's steps (in one shared process our step ran ~15% slower after
PyTorch steps, and PyTorch got our malloc settings); ours applies
`cpu_runtime.reuse_step_memory()` as `mixtral-train` does. PyTorch runs as it ships, and
again with the same malloc settings (`+ mallopt`): without them its steps page-fault their
large activations in afresh too, and a PyTorch user can apply them (or jemalloc) just as well,
so the headline ratio is against the fastest PyTorch variant of all four. Every variant is
compiled / warmed up first; then rounds of `--steps` steps of each alternate (one process
computes at a time), so machine load affects them alike. Reported: median tokens/s over
rounds, ours ÷ each PyTorch variant, the loss after the same steps, the worker's CPU seconds
per step (user + sys: load inflates it less than wall time), and MFU = model FLOPs
(`model_flops_per_token`) ÷ step time ÷ the peak of a float32 2048³ matmul measured in the
same run (best of all rounds). Ours' worker also times `reference.matmul_floor` between its
steps: the step's own matmuls (same shapes and counts, forward and backward) with nothing else,
i.e. the ceiling our step could reach at this machine's matmul speed if every elementwise op,
gather, sort and optimizer update were free.

PyTorch's OpenMP threads busy-wait by default; on a shared machine a spinning thread whose
partner was preempted wastes its core (measured here under load: 3.3× slower steps), and one
left spinning after a PyTorch step steals a core from the JAX step that follows. So this script
sets OMP_WAIT_POLICY=PASSIVE unless the environment already sets it.

Run: `python benchmarks/vs_pytorch.py [--rounds R] [--steps N] [--no-write]`.
"""

import argparse
import multiprocessing
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.reference import (PEAK_SIZE, Ours, make_batches, matmul_floor,  # noqa: E402
                                  model_flops_per_token, peak_matmul_seconds, reference_config)
from benchmarks.report import publish  # noqa: E402
from mixtral_jax.runtime import cpu_runtime
from mixtral_jax.tools import convert  # noqa: E402
from mixtral_jax.training.optimizer import learning_rate_schedule  # noqa: E402

HF_EXPERTS = ("grouped_mm", "eager")


def hf_state_dict(params, m) -> dict:
  """Our params → MixtralForCausalLM's state dict (transformers 5: fused expert tensors)."""
  tensors = dict(convert.hf_tensors(params, m))
  state = {}
  for key, value in tensors.items():
    if ".block_sparse_moe.experts." not in key:
      state[key.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = torch.from_numpy(
          np.array(value, np.float32))
  for n in range(m.num_layers):
    expert = lambda e, w: tensors[f"model.layers.{n}.block_sparse_moe.experts.{e}.{w}.weight"]
    # gate_up_proj [E, 2I, D] is cat(w1, w3) on dim 1; down_proj [E, D, I] is w2.
    state[f"model.layers.{n}.mlp.experts.gate_up_proj"] = torch.from_numpy(np.stack(
        [np.concatenate([expert(e, "w1"), expert(e, "w3")]) for e in range(m.num_experts)]))
    state[f"model.layers.{n}.mlp.experts.down_proj"] = torch.from_numpy(np.stack(
        [expert(e, "w2") for e in range(m.num_experts)]))
  return state


def hf_mixtral(params, m, **implementations) -> MixtralForCausalLM:
  """MixtralForCausalLM of our model config `m` holding our `params`, in training mode, with
  its router losses returned; `implementations`: e.g. experts_implementation="grouped_mm"."""
  hf = MixtralConfig(
      vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
      num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
      num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim, num_local_experts=m.num_experts,
      num_experts_per_tok=m.experts_per_token, rope_theta=m.rope_theta,
      rms_norm_eps=m.rms_norm_eps, sliding_window=m.sliding_window or None,
      router_aux_loss_coef=m.router_aux_loss_coef, router_jitter_noise=0.0,
      output_router_logits=True, tie_word_embeddings=False, max_position_embeddings=32768,
      **implementations)
  model = MixtralForCausalLM(hf).train()
  model.load_state_dict(hf_state_dict(params, m), strict=True)
  return model


class HF:
  """MixtralForCausalLM + AdamW in eager PyTorch, from our initial params."""

  def __init__(self, config, params, experts_implementation: str):
    m = config.model
    self.model = hf_mixtral(params, m, experts_implementation=experts_implementation)
    named = list(self.model.named_parameters())
    groups = [{"params": [p for _, p in named if p.ndim > 1], "weight_decay": config.weight_decay},
              {"params": [p for _, p in named if p.ndim <= 1], "weight_decay": 0.0}]
    self.optimizer = torch.optim.AdamW(groups, lr=config.learning_rate,
                                       betas=(config.adam_b1, config.adam_b2), eps=config.adam_eps)
    schedule = learning_rate_schedule(config)
    self.scheduler = torch.optim.lr_scheduler.LambdaLR(
        self.optimizer, lambda step: float(schedule(step)) / config.learning_rate)
    self.clip, self.coef = config.grad_clip_norm, m.router_aux_loss_coef

  def step(self, batch) -> tuple[float, float]:
    inputs = torch.from_numpy(batch["inputs"]).long()
    targets = torch.from_numpy(batch["targets"]).long()
    # shift_labels: targets are already next tokens, as in our batches.
    out = self.model(input_ids=inputs, labels=targets, shift_labels=targets)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
    self.optimizer.step()
    self.scheduler.step()
    self.optimizer.zero_grad(set_to_none=True)
    aux = out.aux_loss.item()
    return out.loss.item() - self.coef * aux, aux


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _timed(call, count: int):
  """Runs `call` `count` times → (its results, wall seconds per call, CPU seconds per call)."""
  cpu_start, start = _cpu_seconds(), time.perf_counter()
  results = [call() for _ in range(count)]
  return results, (time.perf_counter() - start) / count, (_cpu_seconds() - cpu_start) / count


def _serve(variant: str, total_steps: int, args, params, conn) -> None:
  """Worker process: builds one variant, then runs the steps and measurements asked for."""
  config = reference_config(total_steps)
  batches = make_batches(total_steps, config.global_batch_size, config.seq_len,
                         config.model.vocab_size)
  if variant == "ours":
    if not args.plain_malloc:
      cpu_runtime.reuse_step_memory()  # before the first JAX computation
    trainer = Ours(config)
    floor, floor_args = matmul_floor(config)
    conn.send(trainer.params_numpy())
    batches = [jax.device_put(b) for b in batches]
  else:
    experts_implementation, _, tuned = variant.partition("+")
    if tuned:  # PyTorch allocates on the calling thread: the malloc settings are enough
      cpu_runtime.reuse_step_memory()
    torch.set_num_threads(args.threads)
    trainer = HF(config, params, experts_implementation)
  while True:
    command, *rest = conn.recv()
    if command == "stop":
      return
    if command == "peak":
      conn.send(peak_matmul_seconds())
    elif command == "floor":  # ours only: the step's matmuls alone, `count` times
      _, wall, cpu = _timed(lambda: jax.block_until_ready(floor(floor_args)), rest[0])
      conn.send((wall, cpu))
    else:
      first, count = rest
      batch = iter(batches[first:first + count])
      losses, wall, cpu = _timed(lambda: trainer.step(next(batch)), count)
      conn.send((losses, wall, cpu))


class Worker:
  """One variant in a spawned process; `ask` sends a command and waits for its answer."""

  def __init__(self, variant: str, total_steps: int, args, params=None):
    context = multiprocessing.get_context("spawn")
    self.conn, child = context.Pipe()
    self.process = context.Process(target=_serve, args=(variant, total_steps, args, params,
                                                        child), daemon=True)
    self.process.start()

  def ask(self, *command):
    self.conn.send(command)
    return self.conn.recv()

  def stop(self):
    self.conn.send(("stop",))
    self.process.join()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--steps", type=int, default=2, help="steps of each variant per round")
  parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  parser.add_argument("--no-write", action="store_true", help="print only; leave README alone")
  parser.add_argument("--plain-malloc", action="store_true",
                      help="ours without cpu_runtime.reuse_step_memory (mixtral-train applies it)")
  args = parser.parse_args()

  total_steps = 1 + args.rounds * args.steps  # one warm-up (compile) step each
  config = reference_config(total_steps)
  m = config.model
  tokens_per_step = config.global_batch_size * config.seq_len
  ours_name = "ours (JAX)"
  workers = {ours_name: Worker("ours", total_steps, args)}
  params = workers[ours_name].conn.recv()  # the initial parameters, for PyTorch too
  for name in HF_EXPERTS:
    workers[f"HF {name}"] = Worker(name, total_steps, args, params)
  for name in HF_EXPERTS:
    workers[f"HF {name} + mallopt"] = Worker(f"{name}+mallopt", total_steps, args, params)
  losses = {name: [] for name in workers}
  seconds = {name: [] for name in workers}
  cpu = {name: [] for name in workers}  # worker CPU seconds per step: less load-sensitive
  for name, worker in workers.items():  # compile / warm up on batch 0, one at a time
    start = time.perf_counter()
    losses[name] += worker.ask("steps", 0, 1)[0]
    print(f"{name}: first step (compile, warm-up) {time.perf_counter() - start:.1f} s", flush=True)

  floor_name = "ours: its matmuls alone (floor)"
  workers[ours_name].ask("floor", 1)  # compile
  peak_seconds = workers[ours_name].ask("peak")
  seconds[floor_name], cpu[floor_name] = [], []
  for r in range(args.rounds):
    first = 1 + r * args.steps
    for name, worker in workers.items():
      step_losses, step_seconds, step_cpu = worker.ask("steps", first, args.steps)
      losses[name] += step_losses
      seconds[name].append(step_seconds)
      cpu[name].append(step_cpu)
      if name == ours_name:
        floor_seconds, floor_cpu = worker.ask("floor", args.steps)
        seconds[floor_name].append(floor_seconds)
        cpu[floor_name].append(floor_cpu)
    peak_seconds = min(peak_seconds, workers[ours_name].ask("peak"))
    print(f"round {r + 1}/{args.rounds}: " + ", ".join(
        f"{name} {tokens_per_step / seconds[name][-1]:,.0f} tok/s" for name in seconds),
        flush=True)
  for worker in workers.values():
    worker.stop()

  peak = 2 * PEAK_SIZE ** 3 / peak_seconds
  flops_per_step = model_flops_per_token(m, config.seq_len) * tokens_per_step
  tps = {name: tokens_per_step / statistics.median(s) for name, s in seconds.items()}
  mfu = {name: flops_per_step / statistics.median(s) / peak for name, s in seconds.items()}
  best_hf = max(tps[name] for name in workers if name != ours_name)
  ce0, _ = losses[ours_name][0]
  lines = [
      f"Issue 7 reference config (vocab {m.vocab_size}, hidden {m.hidden_size}, expert "
      f"intermediate {m.intermediate_size}, {m.num_layers} layers, {m.num_heads} heads / "
      f"{m.num_kv_heads} KV, E={m.num_experts}, k={m.experts_per_token}, batch "
      f"{config.global_batch_size}×{config.seq_len}, AdamW, f32), 1 CPU device, torch "
      f"{torch.__version__} with {args.threads} threads, JAX {jax.__version__}. Median of "
      f"{args.rounds} alternating rounds of {args.steps} steps each, after one warm-up step; "
      f"all start from the same parameters and see the same {total_steps} batches. "
      f"Each variant in its own process; ours "
      + ("without `cpu_runtime.reuse_step_memory()` (`--plain-malloc`)." if args.plain_malloc
         else "with `cpu_runtime.reuse_step_memory()`, as `mixtral-train` runs."), "",
      f"Model FLOPs {flops_per_step / tokens_per_step / 1e6:.1f} M/token; peak f32 matmul "
      f"({PEAK_SIZE}³, jitted, best in run) {peak / 1e9:.0f} GFLOP/s.", "",
      "| variant | tokens/s | ours ÷ this | MFU | CPU s/step | CE at step 1 | "
      "CE after last step | aux loss after last step |",
      "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for name in seconds:
    ce = None
    if name in losses:
      (ce_first, _), (ce, aux) = losses[name][0], losses[name][-1]
    lines.append(f"| {name} | {tps[name]:,.0f} | {tps[ours_name] / tps[name]:.2f} | "
                 f"{mfu[name]:.1%} | {statistics.median(cpu[name]):.2f} | "
                 + ("— | — | — |" if ce is None
                    else f"{ce_first:.4f} | {ce:.4f} | {aux:.4f} |"))
  max_gap = max(abs(a[0] - b[0]) for name in workers if name != ours_name
                for a, b in zip(losses[ours_name], losses[name]))
  lines += ["", f"**ours ÷ faster PyTorch = {tps[ours_name] / best_hf:.2f}** (goal ≥ 1.3); "
            f"**MFU {mfu[ours_name]:.1%}** (goal ≥ 65%); largest per-step CE gap to PyTorch "
            f"{max_gap:.4f} nats (initial CE {ce0:.3f}). Our step's matmuls alone reach MFU "
            f"{mfu[floor_name]:.1%}: the step takes {tps[floor_name] / tps[ours_name]:.2f}× "
            f"their time, and 65% MFU would need at most "
            f"{mfu[floor_name] / 0.65:.2f}×."]
  publish("vs_pytorch", lines, write=not args.no_write)


if __name__ == "__main__":
  main()
