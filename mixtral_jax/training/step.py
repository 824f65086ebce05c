"""The train state, the loss, and the train and eval steps (unjitted: build.py jits them)."""

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mixtral_jax import config as config_lib
from mixtral_jax.model.mixtral import Mixtral, router_bias, with_router_bias
from mixtral_jax.parallel import sharding
from mixtral_jax.training import loss as loss_lib
from mixtral_jax.training.optimizer import learning_rate_schedule

# inputs, targets, weights [B, T]; optional positions, segment_ids [B, T] of packed documents.
Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32: optimizer updates taken (NaN/Inf steps count, unapplied)
  params: Any
  opt_state: Any
  rng: jax.Array  # training RNG (router jitter), split once per step
  # [] int32: consecutive steps up to now whose loss or gradients were NaN/Inf. Kept on the
  # device so that the loop need not read every step's metrics to stop a diverged run.
  nonfinite_streak: jax.Array


def state_from_params(config: ml_collections.ConfigDict, params,
                      optimizer: optax.GradientTransformation) -> TrainState:
  """Step-0 state around `params`: fresh optimizer state and the run's training RNG."""
  _, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), train_rng,
                    jnp.zeros((), jnp.int32))


def init_state(config: ml_collections.ConfigDict, model: Mixtral,
               optimizer: optax.GradientTransformation) -> TrainState:
  """Fresh parameters from `config.seed`, still boxed with their logical axis names (so the
  optimizer state inherits them); build.py traces this for shardings and jits it."""
  init_rng, _ = jax.random.split(jax.random.PRNGKey(config.seed))
  tokens = jnp.zeros((1, min(config.seq_len, 8)), jnp.int32)  # [1, T]: any batch would do
  # Parameters do not depend on the mesh; without it the dummy batch is not split over the
  # batch axes (its one row could not be) and the MoE runs on one device.
  params = model.clone(mesh=None).init(init_rng, tokens)["params"]
  return state_from_params(config, params, optimizer)


def make_loss_fn(model: Mixtral) -> Callable:
  """loss(params, batch, rng) → (total loss, metrics) for one (micro-)batch.

  Reads the model's own (resolved) config: the loss chunking is an "auto" choice, so the raw
  `config.model` would mean something else (ConfigError if the model holds one unresolved).
  """
  model_config = model.config
  config_lib.require_resolved(model_config, "the loss")
  # Aux-loss-free balancing replaces the loss (it is still logged); "both" keeps it.
  aux_coef = (0.0 if model_config.router_balance == "aux_free"
              else model_config.router_aux_loss_coef)

  def loss_fn(params, batch: Batch, rng):
    outputs, stats = model.apply({"params": params}, batch["inputs"], batch.get("positions"),
                                 batch.get("segment_ids"), batch["weights"], deterministic=False,
                                 return_hidden=bool(model_config.loss_chunk_tokens),
                                 rngs={"jitter": rng})
    if model_config.loss_chunk_tokens:  # outputs: the LM head's input [B, T, D]
      rows = sharding.rows_per_device(model.mesh, batch["inputs"].shape[0])
      chunk_length = max(1, model_config.loss_chunk_tokens // rows)
      kernel = params["lm_head"]["kernel"].astype(outputs.dtype)
      ce_sum, weight_sum = loss_lib.chunked_cross_entropy(
          outputs, kernel, batch["targets"], batch["weights"], chunk_length)
    else:  # outputs: logits [B, T, V]
      ce_sum, weight_sum = loss_lib.cross_entropy(outputs, batch["targets"], batch["weights"])
    ce = ce_sum / jnp.maximum(weight_sum, 1.0)
    aux, z = jnp.mean(stats.aux_loss), jnp.mean(stats.z_loss)
    loss = ce + aux_coef * aux + model_config.router_z_loss_coef * z
    # Means over layers, and per layer ([L]; expert_load [L, E]).
    metrics = {"loss": loss, "ce_loss": ce, "aux_loss": aux, "z_loss": z,
               "dropped_fraction": jnp.mean(stats.dropped_fraction),
               "aux_loss_per_layer": stats.aux_loss, "z_loss_per_layer": stats.z_loss,
               "dropped_fraction_per_layer": stats.dropped_fraction,
               "router_entropy_per_layer": stats.router_entropy,
               "expert_load": stats.expert_load}
    return loss, metrics

  return loss_fn


def expert_health(expert_load, bias=None) -> dict[str, jax.Array]:
  """Per-layer balance figures from the step's global expert load [L, E] (fractions of the
  token-slots): the busiest expert's load ÷ the balanced load, the experts below a tenth of the
  balanced load ("starved"), and with aux-free balancing the spread of its biases [L, E]."""
  num_experts = expert_load.shape[-1]
  max_ratio = jnp.max(expert_load, axis=-1) * num_experts  # [L]
  starved = jnp.sum(expert_load < 0.1 / num_experts, axis=-1).astype(jnp.float32)  # [L]
  health = {"max_load_ratio": jnp.max(max_ratio), "starved_experts": jnp.sum(starved),
            "max_load_ratio_per_layer": max_ratio, "starved_experts_per_layer": starved}
  if bias is not None:
    health["router_bias_range_per_layer"] = jnp.max(bias, axis=-1) - jnp.min(bias, axis=-1)
  return health


def balanced_bias(bias, expert_load, rate: float):
  """The aux-loss-free update (DeepSeek-V3): each expert's bias [L, E] moves by `rate` toward
  the balanced load, b_e += rate · sign(mean load − load_e), from the step's global load."""
  mean = 1.0 / expert_load.shape[-1]  # loads are fractions summing to 1
  return bias + rate * jnp.sign(mean - expert_load)


def make_train_step(config: ml_collections.ConfigDict, model: Mixtral,
                    optimizer: optax.GradientTransformation) -> Callable:
  """train_step(state, batch) → (state, metrics); accumulates `grad_accum_steps` micro-batches."""
  grad_fn = jax.value_and_grad(make_loss_fn(model), has_aux=True)
  schedule = learning_rate_schedule(config)
  accum = config.grad_accum_steps
  selection_bias = model.config.router_balance != "aux_loss"  # aux_free or both

  def train_step(state: TrainState, batch: Batch):
    rng, step_rng = jax.random.split(state.rng)
    # Micro-batch i takes rows i, accum + i, …: each device's rows split evenly without moving.
    micro = jax.tree.map(lambda x: x.reshape((-1, accum) + x.shape[1:]).swapaxes(0, 1), batch)

    def micro_step(grads, inputs):
      micro_batch, micro_rng = inputs
      (_, metrics), g = grad_fn(state.params, micro_batch, micro_rng)
      return jax.tree.map(jnp.add, grads, g), metrics

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, metrics = jax.lax.scan(micro_step, zeros, (micro, jax.random.split(step_rng, accum)))
    grads = jax.tree.map(lambda g: g / accum, grads)
    metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    bias = None
    if selection_bias:  # once per step, from the micro-batches' mean (global) load
      bias = balanced_bias(router_bias(params), metrics["expert_load"],
                           model.config.router_bias_rate)
      params = with_router_bias(params, bias)
    grad_norm = optax.tree.norm(grads)
    # A NaN/Inf loss, gradient or update (finite gradients can still give one, e.g. through
    # the optimizer's moments) leaves parameters and moments as they were; the batch is spent.
    finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) &
              jnp.isfinite(optax.tree.norm(updates)))
    keep_if_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params = keep_if_finite(params, state.params)
    opt_state = keep_if_finite(opt_state, state.opt_state)
    streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
    metrics.update(grad_norm=grad_norm, learning_rate=schedule(state.step),
                   skipped=(~finite).astype(jnp.float32), nonfinite_streak=streak,
                   **expert_health(metrics["expert_load"], bias))
    return TrainState(state.step + 1, params, opt_state, rng, streak), metrics

  return train_step


def make_eval_step(model: Mixtral) -> Callable:
  """eval_step(params, batch) → (Σ token losses, Σ weights)."""

  def eval_step(params, batch: Batch):
    logits, _ = model.apply({"params": params}, batch["inputs"], batch.get("positions"),
                            batch.get("segment_ids"), batch["weights"])
    return loss_lib.cross_entropy(logits, batch["targets"], batch["weights"])

  return eval_step
