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

Every variant is compiled / warmed up first; then rounds of `--steps` steps of each alternate,
so machine load affects them alike. Reported: median tokens/s over rounds, ours ÷ each PyTorch
variant, the loss after the same steps, process CPU seconds per step (user + sys: load inflates
it less than wall time), and MFU = model FLOPs (`model_flops_per_token`) ÷ step time ÷ the
peak of a float32 2048³ matmul measured in the same run (best of all rounds).

PyTorch's OpenMP threads busy-wait by default; on a shared machine a spinning thread whose
partner was preempted wastes its core (measured here under load: 3.3× slower steps), and one
left spinning after a PyTorch step steals a core from the JAX step that follows. So this script
sets OMP_WAIT_POLICY=PASSIVE unless the environment already sets it.

Run: `python benchmarks/vs_pytorch.py [--rounds R] [--steps N] [--no-write]`.
"""

import argparse
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.report import write_section  # noqa: E402
from configs import default  # noqa: E402
from mixtral_jax import convert, train  # noqa: E402
from mixtral_jax.optimizer import learning_rate_schedule  # noqa: E402

HF_EXPERTS = ("grouped_mm", "eager")
PEAK_SIZE = 2048


def reference_config(steps: int):
  """The default config resized to issue 7's reference model and batch."""
  config = default.get_config()
  config.global_batch_size, config.seq_len = 16, 256
  # A near-constant learning rate over the few steps run (no warmup: losses move from step 1).
  config.num_train_steps, config.warmup_steps = max(1000, steps), 0
  m = config.model
  m.vocab_size, m.hidden_size, m.intermediate_size, m.num_layers = 8000, 256, 512, 4
  m.num_heads, m.num_kv_heads, m.head_dim = 8, 2, 32
  m.num_experts, m.experts_per_token = 8, 2
  m.dispatch, m.grouped_matmul, m.dtype, m.remat = "dropless", "auto", "float32", False
  # HF Mixtral has no router z-loss: leave it out so that both optimise the same objective.
  m.router_z_loss_coef = 0.0
  return config


def model_flops_per_token(m, seq_len: int) -> float:
  """Training FLOPs per token: 6 × active matmul parameters + causal attention scores.

  Matmul parameters are q, k, v, o, the router, k of the E experts (3 matrices each) and the LM
  head; the embedding is a gather, not a matmul. Attention's QKᵀ and PV cost 2 · 2 · S · H · hd
  forward per token and layer over S keys, × 3 with the backward; causal averages S = T / 2.
  """
  d, hd = m.hidden_size, m.head_dim
  attention = d * (2 * m.num_heads + 2 * m.num_kv_heads) * hd
  experts = m.experts_per_token * 3 * d * m.intermediate_size
  per_layer = attention + d * m.num_experts + experts
  matmul_params = m.num_layers * per_layer + d * m.vocab_size
  causal_attention = 3 * 2 * 2 * (seq_len / 2) * m.num_heads * hd * m.num_layers
  return 6 * matmul_params + causal_attention


def make_batches(num: int, batch: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict]:
  """Fixed next-token batches of a Zipf-distributed token stream, one document per row."""
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(num):
    stream = np.minimum(rng.zipf(1.2, size=(batch, seq_len + 1)), vocab - 1).astype(np.int32)
    batches.append({
        "inputs": stream[:, :-1], "targets": stream[:, 1:],
        "weights": np.ones((batch, seq_len), np.float32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
        "segment_ids": np.ones((batch, seq_len), np.int32)})
  return batches


class Ours:
  """Our jitted train step, as mixtral_jax/train.py builds it (state donated)."""

  def __init__(self, config):
    self.model = train.build_model(config)
    optimizer = train.make_optimizer(config)
    self.state = train.init_state(config, self.model, optimizer)
    self.step_fn = jax.jit(train.make_train_step(config, self.model, optimizer),
                           donate_argnums=(0,))

  def params_numpy(self):
    """Host copies of the parameters (call before the first step: the state is donated)."""
    return jax.tree.map(np.asarray, self.state.params)

  def step(self, batch) -> tuple[float, float]:
    """One train step → (cross-entropy, aux loss) of the batch before the update."""
    self.state, metrics = self.step_fn(self.state, batch)
    return float(metrics["ce_loss"]), float(metrics["aux_loss"])


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


class HF:
  """MixtralForCausalLM + AdamW in eager PyTorch, from our initial params."""

  def __init__(self, config, params, experts_implementation: str):
    m = config.model
    hf = MixtralConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim, num_local_experts=m.num_experts,
        num_experts_per_tok=m.experts_per_token, rope_theta=m.rope_theta,
        rms_norm_eps=m.rms_norm_eps, sliding_window=m.sliding_window or None,
        router_aux_loss_coef=m.router_aux_loss_coef, router_jitter_noise=0.0,
        output_router_logits=True, tie_word_embeddings=False, max_position_embeddings=32768,
        experts_implementation=experts_implementation)
    self.model = MixtralForCausalLM(hf).train()
    self.model.load_state_dict(hf_state_dict(params, m), strict=True)
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


def peak_matmul_seconds(fn, a, repeats: int = 3) -> float:
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(a, a))
    best = min(best, time.perf_counter() - start)
  return best


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--steps", type=int, default=2, help="steps of each variant per round")
  parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  parser.add_argument("--no-write", action="store_true", help="print only; leave README alone")
  args = parser.parse_args()
  torch.set_num_threads(args.threads)

  total_steps = 1 + args.rounds * args.steps  # one warm-up (compile) step each
  config = reference_config(total_steps)
  m = config.model
  tokens_per_step = config.global_batch_size * config.seq_len
  host_batches = make_batches(total_steps, config.global_batch_size, config.seq_len,
                              m.vocab_size)
  device_batches = [jax.device_put(b) for b in host_batches]

  ours = Ours(config)
  params = ours.params_numpy()
  variants = {"ours (JAX)": (ours, device_batches)}
  for name in HF_EXPERTS:
    variants[f"HF {name}"] = (HF(config, params, name), host_batches)
  losses = {name: [] for name in variants}
  seconds = {name: [] for name in variants}
  cpu = {name: [] for name in variants}  # process CPU seconds per step: less load-sensitive
  for name, (trainer, batches) in variants.items():  # compile / warm up on batch 0
    start = time.perf_counter()
    losses[name].append(trainer.step(batches[0]))
    print(f"{name}: first step (compile, warm-up) {time.perf_counter() - start:.1f} s", flush=True)

  matmul = jax.jit(lambda a, b: a @ b)
  square = jnp.ones((PEAK_SIZE, PEAK_SIZE), jnp.float32)
  peak_seconds = peak_matmul_seconds(matmul, square)
  for r in range(args.rounds):
    first = 1 + r * args.steps
    for name, (trainer, batches) in variants.items():
      cpu_start, start = _cpu_seconds(), time.perf_counter()
      for i in range(first, first + args.steps):
        losses[name].append(trainer.step(batches[i]))
      seconds[name].append((time.perf_counter() - start) / args.steps)
      cpu[name].append((_cpu_seconds() - cpu_start) / args.steps)
    peak_seconds = min(peak_seconds, peak_matmul_seconds(matmul, square))
    print(f"round {r + 1}/{args.rounds}: " + ", ".join(
        f"{name} {tokens_per_step / seconds[name][-1]:,.0f} tok/s" for name in variants),
        flush=True)

  peak = 2 * PEAK_SIZE ** 3 / peak_seconds
  flops_per_step = model_flops_per_token(m, config.seq_len) * tokens_per_step
  tps = {name: tokens_per_step / statistics.median(s) for name, s in seconds.items()}
  best_hf = max(tps[f"HF {name}"] for name in HF_EXPERTS)
  ours_name = next(iter(variants))
  ce0, _ = losses[ours_name][0]
  lines = [
      f"Issue 7 reference config (vocab {m.vocab_size}, hidden {m.hidden_size}, expert "
      f"intermediate {m.intermediate_size}, {m.num_layers} layers, {m.num_heads} heads / "
      f"{m.num_kv_heads} KV, E={m.num_experts}, k={m.experts_per_token}, batch "
      f"{config.global_batch_size}×{config.seq_len}, AdamW, f32), 1 CPU device, torch "
      f"{torch.__version__} with {args.threads} threads, JAX {jax.__version__}. Median of "
      f"{args.rounds} alternating rounds of {args.steps} steps each, after one warm-up step; "
      f"all start from the same parameters and see the same {total_steps} batches.", "",
      f"Model FLOPs {flops_per_step / tokens_per_step / 1e6:.1f} M/token; peak f32 matmul "
      f"({PEAK_SIZE}³, jitted, best in run) {peak / 1e9:.0f} GFLOP/s.", "",
      "| variant | tokens/s | ours ÷ this | MFU | CPU s/step | CE at step 1 | "
      "CE after last step | aux loss after last step |",
      "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for name in variants:
    ce, aux = losses[name][-1]
    mfu = flops_per_step / statistics.median(seconds[name]) / peak
    lines.append(f"| {name} | {tps[name]:,.0f} | {tps[ours_name] / tps[name]:.2f} | "
                 f"{mfu:.1%} | {statistics.median(cpu[name]):.2f} | {losses[name][0][0]:.4f} | "
                 f"{ce:.4f} | {aux:.4f} |")
  max_gap = max(abs(a[0] - b[0]) for name in variants if name != ours_name
                for a, b in zip(losses[ours_name], losses[name]))
  lines += ["", f"**ours ÷ faster PyTorch = {tps[ours_name] / best_hf:.2f}** (goal ≥ 1.3); "
            f"**MFU {flops_per_step / statistics.median(seconds[ours_name]) / peak:.1%}** "
            f"(goal ≥ 65%); largest per-step CE gap to PyTorch {max_gap:.4f} nats "
            f"(initial CE {ce0:.3f})."]
  text = "\n".join(lines)
  print(text)
  if not args.no_write:
    write_section("vs_pytorch", text)


if __name__ == "__main__":
  main()
