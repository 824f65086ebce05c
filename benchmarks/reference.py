"""Issue 7's reference model and batches, shared by the speed benchmarks."""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import default
from mixtral_jax import config as config_lib
from mixtral_jax.training import build

# Side of the square float32 matmul whose speed is taken as the machine's peak.
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
  """Our train step, the program `mixtral-train` runs (`build.build`: sharded, state donated)."""

  def __init__(self, config, devices=None):
    self.setup = build.build(config, devices)
    self.state = self.setup.state
    self.step_fn = self.setup.train_step

  def params_numpy(self):
    """Host copies of the parameters (call before the first step: the state is donated)."""
    return jax.tree.map(np.asarray, self.state.params)

  def timed_step(self, batch) -> float:
    """Seconds of one train step, through reading its metrics."""
    start = time.perf_counter()
    self.step(batch)
    return time.perf_counter() - start

  def step(self, batch) -> tuple[float, float]:
    """One train step → (cross-entropy, aux loss) of the batch before the update."""
    self.state, metrics = self.step_fn(self.state, batch)
    return float(metrics["ce_loss"]), float(metrics["aux_loss"])


@functools.cache
def _square_matmul():
  return jax.jit(lambda a: a @ a), jnp.ones((PEAK_SIZE, PEAK_SIZE), jnp.float32)


def peak_matmul_seconds(repeats: int = 3) -> float:
  """Best time of `repeats` jitted float32 PEAK_SIZE³ matmuls (compiled on the first call)."""
  matmul, square = _square_matmul()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(square))
    best = min(best, time.perf_counter() - start)
  return best


def matmul_floor(config):
  """The reference step's matmuls alone, as one jitted program: (function, its arguments).

  Forward and backward (input and weight gradients) of every matmul that model FLOPs count,
  with the shapes our step gives them: q/k/v/o and router projections; causal attention
  scores and values per query chunk of `attention_query_chunk` rows against the keys that
  chunk sees; experts on balanced blocks of `block_size` rows (T·k rows: no padding blocks);
  the LM head in chunks of `loss_chunk_tokens` tokens. Each matmul reads its own operands and
  writes its own output, so nothing is fused away. Timing it gives the step time (and MFU
  ceiling) our step would reach if everything besides matmuls took no time.
  """
  m = config_lib.model_config(config.model, "cpu")
  batch, length, d = config.global_batch_size, config.seq_len, m.hidden_size
  tokens, hd, kv = batch * length, m.head_dim, m.num_kv_heads
  groups, e, inter = m.num_heads // kv, m.num_experts, m.intermediate_size
  chunk = m.attention_query_chunk or length
  spans = [(start, min(start + chunk, length)) for start in range(0, length, chunk)]
  rows = tokens * m.experts_per_token
  block = min(m.block_size, rows // e)
  lm_chunk = m.loss_chunk_tokens or tokens
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))

  def linear(x, w, dy):  # forward, input gradient, weight gradient
    return x @ w, dy @ w.T, x.T @ dy

  def layer(a):
    out = []
    for w, dy in ((a["wq"], a["dq"]), (a["wk"], a["dkv"]), (a["wv"], a["dkv2"]),
                  (a["wo"], a["dx"]), (a["wr"], a["dr"])):
      out += linear(a["x"], w, dy)
    for c, (start, end) in enumerate(spans):
      q = a["q"][:, start * groups:end * groups]  # [B·K, c·G, hd]
      k, v = a["k"][:, :end], a["v"][:, :end]  # [B·K, S, hd]
      p, do = a["p"][c], a["do"][:, start * groups:end * groups]  # [B·K, c·G, S], like q
      out += [q @ k.mT, p @ v, do @ v.mT, p @ k, p.mT @ q, p.mT @ do]
    for i in range(rows // block):
      g, r = i * e // (rows // block), slice(i * block, (i + 1) * block)
      x, h, dy, dpre = a["rows"][r], a["h"][r], a["dy"][r], a["dpre"][r]
      out += [x @ a["w1"][g], h @ a["w2"][g], dy @ a["w2"][g].T, dpre @ a["w1"][g].T,
              x.T @ dpre, h.T @ dy]
    return out

  def program(args):
    out = [o for a in args["layers"] for o in layer(a)]
    for start in range(0, tokens, lm_chunk):
      r = slice(start, start + lm_chunk)
      out += linear(args["hidden"][r], args["lm_head"], args["dlogits"][r])
    return out

  layers = [dict(
      x=normal(tokens, d), dx=normal(tokens, d), wq=normal(d, m.num_heads * hd),
      dq=normal(tokens, m.num_heads * hd), wk=normal(d, kv * hd), wv=normal(d, kv * hd),
      dkv=normal(tokens, kv * hd), dkv2=normal(tokens, kv * hd), wo=normal(m.num_heads * hd, d),
      wr=normal(d, e), dr=normal(tokens, e),
      q=normal(batch * kv, length * groups, hd), do=normal(batch * kv, length * groups, hd),
      k=normal(batch * kv, length, hd), v=normal(batch * kv, length, hd),
      p=[normal(batch * kv, (end - start) * groups, end) for start, end in spans],
      rows=normal(rows, d), h=normal(rows, inter), dy=normal(rows, d),
      dpre=normal(rows, 2 * inter), w1=normal(e, d, 2 * inter), w2=normal(e, inter, d))
      for _ in range(m.num_layers)]
  args = dict(layers=layers, hidden=normal(tokens, d), lm_head=normal(d, m.vocab_size),
              dlogits=normal(tokens, m.vocab_size))
  return jax.jit(program), args
