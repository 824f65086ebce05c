"""Issue 7's reference model and batches, shared by the speed benchmarks."""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import default
from mixtral_jax import train

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
