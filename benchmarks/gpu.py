"""On one GPU: configs/moe_1b.py's train step vs its dense-FFN twin and HF transformers + PyTorch.

MFU is model FLOPs ÷ step time ÷ a bf16 8192³ matmul's rate measured in the same run. Also the
pieces at the model's shapes (the grouped matmul the model uses on GPU and packed-document
attention, fwd + bwd, against a dense matmul and causal-only cuDNN attention), the preset with
remat on, and the losses of a few steps on the GPU against the same steps on the CPU. Without a
GPU it prints one line and exits 0. Writes its table into benchmarks/README.md.

Run: `python benchmarks/gpu.py [--steps N] [--no-write]`.
"""

import os

# JAX and PyTorch share the GPU: JAX grows its pool as needed, up to this share of the memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.moe_step import dense_ffn_layers  # noqa: E402
from benchmarks.reference import Ours  # noqa: E402
from benchmarks.report import publish  # noqa: E402
from configs import default, moe_1b  # noqa: E402
from mixtral_jax import config as config_lib  # noqa: E402
from mixtral_jax.model import grouped_matmul  # noqa: E402
from mixtral_jax.model.attention import dot_product_attention  # noqa: E402
from mixtral_jax.tools import compile as compile_lib  # noqa: E402

PEAK_SIZE = 8192
# moe_1b on one device: 16 rows of 2048 tokens (32,768 tokens per step).
BATCH = 16
DOCS_PER_ROW = 3
GOALS = {"mfu": 0.35, "vs_hf": 3.0, "vs_dense": 1.15, "grouped": 0.75, "attention": 0.9,
         "remat": 1.3}


def gpus() -> list:
  try:
    return jax.devices("gpu")
  except RuntimeError:  # no GPU backend in this jax
    return []


def _best_seconds(fn, *args, repeats: int = 5) -> float:
  """Best wall time of `repeats` calls of a jitted `fn` (compiled first)."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def peak_flops(device) -> float:
  """FLOP/s of one bf16 PEAK_SIZE³ matmul on `device`."""
  a = jax.device_put(jnp.ones((PEAK_SIZE, PEAK_SIZE), jnp.bfloat16), device)
  return 2 * PEAK_SIZE ** 3 / _best_seconds(jax.jit(lambda x: x @ x), a)


def packed_batch(batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
  """Zipf tokens, DOCS_PER_ROW packed documents per row (positions restart, segment ids)."""
  rng = np.random.default_rng(seed)
  stream = np.minimum(rng.zipf(1.2, size=(batch, seq_len + 1)), vocab - 1).astype(np.int32)
  segment_ids = np.zeros((batch, seq_len), np.int32)
  positions = np.zeros((batch, seq_len), np.int32)
  weights = np.ones((batch, seq_len), np.float32)
  for row in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, seq_len), DOCS_PER_ROW - 1, replace=False))
    starts = np.concatenate([[0], cuts])
    segment_ids[row] = np.searchsorted(cuts, np.arange(seq_len), side="right") + 1
    positions[row] = np.arange(seq_len) - starts[segment_ids[row] - 1]
    weights[row, cuts - 1] = 0.0  # the last token of a document predicts nothing
  return {"inputs": stream[:, :-1], "targets": stream[:, 1:], "weights": weights,
          "positions": positions, "segment_ids": segment_ids}


def median_seconds(step, steps: int) -> float:
  """Median seconds of `steps` calls of `step` (which waits for its work), after 2 warm-ups."""
  step(), step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def ours_on(config, device, batch) -> tuple[Ours, dict]:
  """Our train step on `device` (what mixtral-train runs) and `batch` placed for it."""
  ours = Ours(config, [device])
  return ours, jax.device_put(batch, ours.setup.batch_sharding)


def model_flops(ours: Ours) -> float:
  setup = ours.setup
  return compile_lib.model_flops(setup.config, setup.model_config,
                                 setup.abstract_state.params)["model"]


def moe_1b_on_one_device(remat: bool = False):
  config = moe_1b.get_config()
  config.global_batch_size = BATCH
  config.model.remat = remat
  config.mesh.update(data=-1, fsdp=1, expert=1, tensor=1)
  return config


def hf_seconds(config, params, batch, steps: int) -> float:
  """Median step seconds of MixtralForCausalLM + fused AdamW on the GPU, bf16 autocast, sdpa
  attention and grouped_mm experts, from our initial parameters and on the same tokens."""
  import torch

  from benchmarks.vs_pytorch import hf_mixtral
  model = hf_mixtral(params, config.model, attn_implementation="sdpa",
                     experts_implementation="grouped_mm").cuda()
  optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, fused=True)
  inputs = torch.from_numpy(batch["inputs"]).long().cuda()
  targets = torch.from_numpy(batch["targets"]).long().cuda()
  positions = torch.from_numpy(batch["positions"]).long().cuda()

  def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
      # position_ids restart per document, as ours; sdpa attends causally over the whole row.
      out = model(input_ids=inputs, position_ids=positions, labels=targets, shift_labels=targets)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()

  seconds = median_seconds(step, steps)
  del model, optimizer
  torch.cuda.empty_cache()
  return seconds


def grouped_matmul_rates(config, device) -> tuple[float, float]:
  """FLOP/s of the experts' gate/up grouped matmul fwd + bwd (balanced groups) at the model's
  shapes, and of one dense matmul of the same FLOPs."""
  m = config_lib.model_config(config.model, "gpu")
  rows = config.global_batch_size * config.seq_len * m.experts_per_token
  d, n, e = m.hidden_size, 2 * m.intermediate_size, m.num_experts
  if m.grouped_matmul != "ragged_dot":
    raise SystemExit(f"benchmarks/gpu.py: no piece timing for grouped_matmul={m.grouped_matmul}")
  put = lambda *shape: jax.device_put(jnp.ones(shape, jnp.bfloat16) * 0.01, device)
  x, w, dense_w, dy = put(rows, d), put(e, d, n), put(d, n), put(rows, n)
  sizes = jax.device_put(jnp.full((e,), rows // e, jnp.int32), device)

  def fwd_bwd(matmul):
    def run(x, w, dy):
      out, pullback = jax.vjp(matmul, x, w)
      return out, pullback(dy)
    return jax.jit(run)

  flops = 3 * 2 * rows * d * n
  grouped = fwd_bwd(lambda x, w: grouped_matmul.ragged_matmul(x, w, sizes))
  dense = fwd_bwd(lambda x, w: x @ w)
  return flops / _best_seconds(grouped, x, w, dy), flops / _best_seconds(dense, x, dense_w, dy)


def attention_rates(config, device) -> tuple[float, float]:
  """FLOP/s of the model's GPU attention fwd + bwd on packed documents, and of cuDNN's
  causal-only attention on the same shapes (FLOPs counted as causal: half the scores)."""
  m = config.model
  b, t, kv, g, hd = config.global_batch_size, config.seq_len, m.num_kv_heads, \
      m.num_heads // m.num_kv_heads, m.head_dim
  rng = np.random.default_rng(0)
  put = lambda *shape: jax.device_put(
      jnp.asarray(rng.standard_normal(shape, np.float32), jnp.bfloat16), device)
  q, k, v = put(b, t, kv, g, hd), put(b, t, kv, hd), put(b, t, kv, hd)
  segments = jax.device_put(packed_batch(b, t, m.vocab_size)["segment_ids"], device)

  def packed(q, k, v):
    return dot_product_attention(q, k, v, segments, m.sliding_window, "cudnn")

  def causal(q, k, v):
    return jax.nn.dot_product_attention(q.reshape(b, t, kv * g, hd), k, v, is_causal=True,
                                        implementation="cudnn").reshape(q.shape)

  def fwd_bwd(attention):
    def run(q, k, v):
      out, pullback = jax.vjp(attention, q, k, v)
      return out, pullback(out)
    return jax.jit(run)

  flops = 3 * 2 * 2 * b * kv * g * hd * t * t / 2
  return (flops / _best_seconds(fwd_bwd(packed), q, k, v),
          flops / _best_seconds(fwd_bwd(causal), q, k, v))


def losses_gpu_vs_cpu(device, steps: int = 4) -> float:
  """Largest cross-entropy difference over `steps` default-config float32 steps, GPU vs CPU
  paths."""
  config = default.get_config()
  config.model.dtype = "float32"
  batch = packed_batch(config.global_batch_size, config.seq_len, config.model.vocab_size)
  losses = []
  for on in (device, jax.devices("cpu")[0]):
    ours, placed = ours_on(config, on, batch)
    losses.append([ours.step(placed)[0] for _ in range(steps)])
  return max(abs(a - b) for a, b in zip(*losses))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
  parser.add_argument("--no-write", action="store_true", help="print only; leave README alone")
  args = parser.parse_args()
  devices = gpus()
  if not devices:
    print(f"benchmarks/gpu.py: no GPU here (JAX backend {jax.default_backend()}); nothing "
          "measured")
    return
  device = devices[0]
  peak = peak_flops(device)
  config = moe_1b_on_one_device()
  batch = packed_batch(BATCH, config.seq_len, config.model.vocab_size)
  seconds = {}

  tokens = BATCH * config.seq_len
  ours, placed = ours_on(config, device, batch)
  params = ours.params_numpy()  # the initial parameters, for HF too
  seconds["moe"] = median_seconds(lambda: ours.step(placed), args.steps)
  flops = model_flops(ours)
  del ours
  remat, placed = ours_on(moe_1b_on_one_device(remat=True), device, batch)
  seconds["remat"] = median_seconds(lambda: remat.step(placed), args.steps)
  del remat
  with dense_ffn_layers():
    dense, placed = ours_on(config, device, batch)
    seconds["dense"] = median_seconds(lambda: dense.step(placed), args.steps)
    dense_flops = model_flops(dense)
  seconds["hf"] = hf_seconds(config, params, batch, args.steps)
  grouped, dense_rate = grouped_matmul_rates(config, device)
  packed, causal = attention_rates(config, device)
  loss_gap = losses_gpu_vs_cpu(device)

  mfu = lambda f, s: f / s / peak
  rows = [("ours, as configured (remat off)", seconds["moe"], flops),
          ("ours, remat on (the preset)", seconds["remat"], flops),
          ("ours, dense FFN twin (equal active FLOPs)", seconds["dense"], dense_flops),
          ("HF transformers + torch (bf16 autocast, fused AdamW, sdpa, grouped_mm)",
           seconds["hf"], flops)]
  m = config.model
  lines = [
      f"`configs/moe_1b.py` on one {device.device_kind}, {BATCH} × {config.seq_len} tokens "
      f"({DOCS_PER_ROW} packed documents per row), bf16 compute, f32 parameters, AdamW; JAX "
      f"{jax.__version__}; median of {args.steps} steps after 2 warm-up steps. Peak: a bf16 "
      f"{PEAK_SIZE}³ matmul in the same run, {peak / 1e12:.0f} TFLOP/s. Model FLOPs "
      f"{flops / tokens / 1e9:.2f} GFLOP/token.", "",
      "| variant | step ms | tokens/s | MFU |", "|---|---:|---:|---:|"]
  lines += [f"| {name} | {s * 1e3:.0f} | {tokens / s:,.0f} | {mfu(f, s):.1%} |"
            for name, s, f in rows]
  lines += ["", "| piece (fwd + bwd, bf16) | TFLOP/s |", "|---|---:|",
            f"| grouped matmul, {BATCH * config.seq_len * m.experts_per_token:,} rows × "
            f"{m.hidden_size} → {m.num_experts} × {2 * m.intermediate_size} | "
            f"{grouped / 1e12:.0f} |",
            f"| one dense matmul of the same FLOPs | {dense_rate / 1e12:.0f} |",
            f"| attention on packed documents (the model's GPU path) | {packed / 1e12:.0f} |",
            f"| cuDNN attention, causal only | {causal / 1e12:.0f} |", ""]
  checks = [("MFU", mfu(flops, seconds["moe"]), GOALS["mfu"], "≥"),
            ("ours ÷ HF + torch", seconds["hf"] / seconds["moe"], GOALS["vs_hf"], "≥"),
            ("MoE step ÷ dense twin", seconds["moe"] / seconds["dense"], GOALS["vs_dense"], "≤"),
            ("grouped ÷ dense matmul rate", grouped / dense_rate, GOALS["grouped"], "≥"),
            ("packed ÷ causal-only attention", packed / causal, GOALS["attention"], "≥"),
            ("remat on ÷ off", seconds["remat"] / seconds["moe"], GOALS["remat"], "≤")]
  lines += [f"**{name} = {value:.2f}** (goal {sign} {goal}; "
            f"{'met' if (value >= goal if sign == '≥' else value <= goal) else 'not met'})"
            for name, value, goal, sign in checks]
  lines += ["", "GPU vs CPU (default config, float32, 4 steps): largest cross-entropy "
            f"difference {loss_gap:.1e}."]
  publish("gpu", lines, write=not args.no_write)


if __name__ == "__main__":
  main()
