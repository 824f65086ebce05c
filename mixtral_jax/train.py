"""Training loop: config → mesh → data → model → jitted train step → checkpoints, metrics.

    python -m mixtral_jax.train --config=configs/default.py --workdir=/tmp/run \
        --config.num_train_steps=100 --config.model.dispatch=capacity
"""

import json
import logging as pylogging
import os
import time
from typing import Any, Callable, Optional

from absl import app, flags, logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from mixtral_jax import checkpoint as checkpoint_lib
from mixtral_jax import config as config_lib
from mixtral_jax import cpu_runtime
from mixtral_jax import data as data_lib
from mixtral_jax import loss as loss_lib
from mixtral_jax import metrics as metrics_lib
from mixtral_jax import sharding
from mixtral_jax import sources
from mixtral_jax import tokenizer as tokenizer_lib
from mixtral_jax.model import Mixtral, count_params
from mixtral_jax.optimizer import learning_rate_schedule, make_optimizer

# inputs, targets, weights [B, T]; optional positions, segment_ids [B, T] of packed documents.
Batch = dict[str, jax.Array]


class NonFiniteError(RuntimeError):
  """Training stopped after too many consecutive steps with NaN/Inf loss or gradients."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def build_model(config: ml_collections.ConfigDict, mesh: Optional[Mesh] = None) -> Mixtral:
  """The model for a (validated) training config, expert-parallel over `mesh` if given."""
  return Mixtral(ml_collections.FrozenConfigDict(config.model), mesh)


def state_from_params(config, params, optimizer: optax.GradientTransformation) -> TrainState:
  """Step-0 state around `params`: fresh optimizer state and the run's training RNG."""
  _, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), train_rng)


def init_state(config, model: Mixtral, optimizer: optax.GradientTransformation,
               mesh: Optional[Mesh] = None) -> TrainState:
  """Fresh parameters and optimizer state from `config.seed`, created already sharded."""
  init_rng, _ = jax.random.split(jax.random.PRNGKey(config.seed))
  tokens = jnp.zeros((1, min(config.seq_len, 8)), jnp.int32)

  def init():
    # Parameters boxed with logical axis names, so the optimizer state inherits them.
    return state_from_params(config, model.init(init_rng, tokens)["params"], optimizer)

  shardings = None if mesh is None else sharding.tree_shardings(jax.eval_shape(init), mesh)
  return jax.jit(lambda: nn.unbox(init()), out_shardings=shardings)()


def make_loss_fn(model: Mixtral, model_config) -> Callable:
  """loss(params, batch, rng) → (total loss, metrics) for one (micro-)batch."""

  def loss_fn(params, batch: Batch, rng):
    outputs, stats = model.apply({"params": params}, batch["inputs"], batch.get("positions"),
                                 batch.get("segment_ids"), batch["weights"], deterministic=False,
                                 return_hidden=bool(model_config.loss_chunk_tokens),
                                 rngs={"jitter": rng})
    if model_config.loss_chunk_tokens:  # outputs: the LM head's input [B, T, D]
      chunk_length = max(1, model_config.loss_chunk_tokens // batch["inputs"].shape[0])
      kernel = params["lm_head"]["kernel"].astype(outputs.dtype)
      ce_sum, weight_sum = loss_lib.chunked_cross_entropy(
          outputs, kernel, batch["targets"], batch["weights"], chunk_length)
    else:  # outputs: logits [B, T, V]
      ce_sum, weight_sum = loss_lib.cross_entropy(outputs, batch["targets"], batch["weights"])
    ce = ce_sum / jnp.maximum(weight_sum, 1.0)
    aux, z = jnp.mean(stats.aux_loss), jnp.mean(stats.z_loss)
    loss = ce + model_config.router_aux_loss_coef * aux + model_config.router_z_loss_coef * z
    metrics = {"loss": loss, "ce_loss": ce, "aux_loss": aux, "z_loss": z,
               "dropped_fraction": jnp.mean(stats.dropped_fraction),
               "expert_load": stats.expert_load}
    return loss, metrics

  return loss_fn


def make_train_step(config, model: Mixtral, optimizer: optax.GradientTransformation) -> Callable:
  """train_step(state, batch) → (state, metrics); accumulates `grad_accum_steps` micro-batches."""
  grad_fn = jax.value_and_grad(make_loss_fn(model, config.model), has_aux=True)
  schedule = learning_rate_schedule(config)
  accum = config.grad_accum_steps

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
    grad_norm = optax.tree.norm(grads)
    # A NaN/Inf loss or gradient leaves parameters and moments as they were; the batch is spent.
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    keep_if_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params = keep_if_finite(params, state.params)
    opt_state = keep_if_finite(opt_state, state.opt_state)
    metrics.update(grad_norm=grad_norm, learning_rate=schedule(state.step),
                   skipped=(~finite).astype(jnp.float32))
    return TrainState(state.step + 1, params, opt_state, rng), metrics

  return train_step


def make_eval_step(model: Mixtral) -> Callable:
  """eval_step(params, batch) → (Σ token losses, Σ weights)."""

  def eval_step(params, batch: Batch):
    logits, _ = model.apply({"params": params}, batch["inputs"], batch.get("positions"),
                            batch.get("segment_ids"), batch["weights"])
    return loss_lib.cross_entropy(logits, batch["targets"], batch["weights"])

  return eval_step


def global_batch(local_batch: data_lib.Batch, batch_sharding) -> Batch:
  """This process's rows → global arrays on `batch_sharding` (every process passes its own)."""
  return {key: jax.make_array_from_process_local_data(batch_sharding, value)
          for key, value in local_batch.items()}


def evaluate(eval_step: Callable, params, data, num_batches: int,
             batch_sharding) -> dict[str, float]:
  """Mean held-out cross-entropy (nats/token) and perplexity over `num_batches` batches."""
  loss_sum, weight_sum = 0.0, 0.0
  for batch in data.eval_batches(num_batches):
    batch_loss, batch_weight = eval_step(params, global_batch(batch, batch_sharding))
    loss_sum += float(batch_loss)
    weight_sum += float(batch_weight)
  eval_loss = loss_sum / max(weight_sum, 1.0)
  return {"eval_loss": eval_loss, "eval_perplexity": float(np.exp(eval_loss))}


def _mean_metrics(history: list[dict]) -> dict:
  return jax.tree.map(lambda *xs: np.mean(np.stack([np.asarray(x) for x in xs]), axis=0),
                      *history)


def _make_data(config) -> data_lib.LMData:
  """This process's data; process 0 first builds any missing dataset or tokenizer cache.

  Processes sharing a data_dir would otherwise race to build the same files.
  """
  if jax.process_index() == 0:
    data = data_lib.make_data(config, 0, jax.process_count())
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("mixtral_jax: data prepared")
  if jax.process_index() > 0:
    data = data_lib.make_data(config, jax.process_index(), jax.process_count())
  return data


def _all_data_states(batches: data_lib.TrainIterator) -> list[dict]:
  """Every process's data-iterator state, indexed by process (the checkpoint's meta is global)."""
  state = batches.get_state()
  if jax.process_count() == 1:
    return [state]
  cursors = multihost_utils.process_allgather(np.asarray(state["cursors"], np.int32))
  return [{"step": state["step"], "cursors": c.tolist()} for c in np.asarray(cursors)]


def _process_data_state(meta: dict) -> Optional[dict]:
  """This process's saved data-iterator state; None (start the data afresh) if there is none."""
  states = meta.get("data_state")
  if states is None:  # e.g. an imported HF model: no data consumed yet
    return None
  if len(states) != jax.process_count():
    logging.warning("The checkpoint's data state is for %d processes, this run has %d: the data "
                    "order restarts.", len(states), jax.process_count())
    return None
  return states[jax.process_index()]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_at_step: Optional[int] = None) -> dict[str, Any]:
  """Trains `config` in `workdir` and returns a summary (first/last loss, eval, baseline).

  Resumes from the latest checkpoint in `workdir` if there is one. `stop_at_step` ends the run
  early (with a checkpoint), as a preemption would, without changing the schedule.
  """
  config_lib.validate(config, jax.device_count(), jax.default_backend())
  primary = jax.process_index() == 0  # writes the workdir's shared files
  os.makedirs(workdir, exist_ok=True)
  if primary:
    tokenizer_lib.write_atomically(os.path.join(workdir, "config.json"),
                                   config.to_json_best_effort(indent=2).encode())

  mesh = sharding.make_mesh(config.mesh)
  data = _make_data(config)
  if primary:  # the run's own copy of its tokenizer, for export (mixtral-convert) and inference
    tokenizer_lib.write_atomically(os.path.join(workdir, "tokenizer.model"),
                                   data.tokenizer.serialized_model_proto())
  model = build_model(config, mesh)
  optimizer = make_optimizer(config)
  state = init_state(config, model, optimizer, mesh)
  checkpointer = checkpoint_lib.Checkpointer(workdir, config.keep_checkpoints)
  start_step, data_state = 0, None
  if checkpointer.latest_step() is not None:
    state, meta = checkpointer.restore(state)
    start_step, data_state = int(state.step), _process_data_state(meta)
    print(f"resuming from checkpoint at step {start_step} in {workdir}", flush=True)
  batches = data.train_iterator(data_state)
  saved_config = json.loads(config.to_json_best_effort())
  last_step = min(config.num_train_steps, stop_at_step or config.num_train_steps)
  if start_step >= last_step:
    checkpointer.close()
    print(f"nothing to do: the checkpoint is at step {start_step}, the run ends at {last_step}")
    return {"resumed_step": start_step}
  total, active = count_params(state.params, config.model)
  logging.info("Model: %s parameters, %s active per token.", f"{total:,}", f"{active:,}")
  print(f"model: {total:,} parameters ({active:,} active) | mesh "
        f"{dict(mesh.shape)} | corpus unigram entropy {data.unigram_entropy:.3f} nats/token",
        flush=True)

  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  batch_sharding = sharding.batch_sharding(mesh)
  train_step = jax.jit(make_train_step(config, model, optimizer),
                       in_shardings=(state_sharding, batch_sharding),
                       out_shardings=(state_sharding, None), donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(model), in_shardings=(state_sharding.params, batch_sharding))
  writer = metrics_lib.MetricsWriter(workdir, enabled=primary)
  progress = metrics_lib.ProgressBar(config.num_train_steps)
  tokens_per_step = config.global_batch_size * config.seq_len
  history, first_loss, last_metrics, eval_metrics = [], None, {}, {}
  interval_start, interval_steps = time.perf_counter(), 0

  nonfinite_streak = 0
  for step in range(start_step + 1, last_step + 1):
    state, metrics = train_step(state, global_batch(next(batches), batch_sharding))
    history.append(metrics)
    interval_steps += 1
    is_last = step == last_step
    nonfinite_streak = nonfinite_streak + 1 if float(metrics["skipped"]) else 0
    if config.max_nan_steps and nonfinite_streak >= config.max_nan_steps:
      checkpointer.close()
      raise NonFiniteError(
          f"step {step}: loss or gradients were NaN/Inf for {nonfinite_streak} steps in a row "
          f"(config.max_nan_steps={config.max_nan_steps}); stopped without saving, the last "
          f"checkpoint is step {checkpointer.latest_step()}")
    if is_last or (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0):
      checkpointer.save(step, state, {"config": saved_config, "data_position": batches.step,
                                      "data_state": _all_data_states(batches)})
    if step % config.log_every_steps == 0 or is_last or step == start_step + 1:
      logged = _mean_metrics(history)
      elapsed = time.perf_counter() - interval_start
      logged["tokens_per_sec"] = tokens_per_step * interval_steps / elapsed
      if first_loss is None:
        first_loss = float(logged["loss"])
      if ((config.eval_every_steps and step % config.eval_every_steps == 0) or
          step == config.num_train_steps):
        eval_metrics = evaluate(eval_step, state.params, data, config.eval_batches,
                                batch_sharding)
        logged.update(eval_metrics)
      writer.write(step, logged)
      # The first step's time is mostly compilation: no ETA from it.
      progress.show(step, float(logged["loss"]), logged["tokens_per_sec"],
                    elapsed / interval_steps if step > start_step + 1 else None)
      last_metrics = logged
      history, interval_start, interval_steps = [], time.perf_counter(), 0

  checkpointer.close()
  summary = {"first_loss": first_loss, "final_loss": float(last_metrics["loss"]),
             "unigram_entropy": data.unigram_entropy, **eval_metrics}
  print("done: " + json.dumps(summary), flush=True)
  return summary


_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Training config file.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Directory for metrics and checkpoints.")


def _only_our_info(record: pylogging.LogRecord) -> bool:
  """Keeps warnings and our own progress; drops libraries' INFO chatter (Orbax logs every save)."""
  return record.levelno >= pylogging.WARNING or f"{os.sep}mixtral_jax{os.sep}" in record.pathname


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_only_our_info)
  if _CONFIG.value.get("cpu_reuse_step_memory", False):  # before JAX creates its CPU client
    cpu_runtime.reuse_step_memory()
  try:
    config_lib.validate(_CONFIG.value, jax.device_count(), jax.default_backend())
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (config_lib.ConfigError, checkpoint_lib.CheckpointError, sources.DataError,
          NonFiniteError) as e:
    raise SystemExit(f"error: {e}") from None


def run() -> None:
  """Console-script entry point (`mixtral-train`)."""
  app.run(main)


if __name__ == "__main__":
  run()
