"""Checks a training config before anything is compiled, with one-line errors naming the field."""

import ml_collections

DISPATCH_MODES = ("dropless", "capacity")
GROUPED_MATMULS = ("auto", "blocked", "ragged_dot")
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
  """A config field has an invalid value; the message names the field."""


def _require(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise ConfigError(f"config.{field}: {message}")


def validate_model(model: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first invalid field of `config.model`."""
  for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
               "num_kv_heads", "head_dim", "num_experts", "experts_per_token", "block_size"):
    value = model[name]
    _require(isinstance(value, int) and value > 0, f"model.{name}",
             f"must be a positive integer, got {value!r}")
  _require(model.experts_per_token <= model.num_experts, "model.experts_per_token",
           f"{model.experts_per_token} exceeds model.num_experts={model.num_experts}")
  _require(model.num_heads % model.num_kv_heads == 0, "model.num_heads",
           f"{model.num_heads} is not divisible by model.num_kv_heads={model.num_kv_heads}")
  _require(model.head_dim % 2 == 0, "model.head_dim",
           f"must be even for rotary embeddings, got {model.head_dim}")
  _require(model.dispatch in DISPATCH_MODES, "model.dispatch",
           f"unknown dispatch {model.dispatch!r}; expected one of {list(DISPATCH_MODES)}")
  _require(model.grouped_matmul in GROUPED_MATMULS, "model.grouped_matmul",
           f"unknown grouped matmul {model.grouped_matmul!r}; expected one of {list(GROUPED_MATMULS)}")
  _require(model.dtype in DTYPES, "model.dtype",
           f"unknown dtype {model.dtype!r}; expected one of {list(DTYPES)}")
  _require(model.capacity_factor > 0, "model.capacity_factor",
           f"must be positive, got {model.capacity_factor}")
  _require(model.sliding_window >= 0, "model.sliding_window",
           f"must be >= 0 (0 = full causal), got {model.sliding_window}")
  _require(model.rope_theta > 0, "model.rope_theta", f"must be positive, got {model.rope_theta}")
  _require(model.rms_norm_eps > 0, "model.rms_norm_eps", f"must be positive, got {model.rms_norm_eps}")
  _require(0 <= model.router_jitter_noise < 1, "model.router_jitter_noise",
           f"must be in [0, 1), got {model.router_jitter_noise}")
  for name in ("router_aux_loss_coef", "router_z_loss_coef"):
    _require(model[name] >= 0, f"model.{name}", f"must be >= 0, got {model[name]}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first invalid field of a training config."""
  for name in ("num_train_steps", "global_batch_size", "seq_len", "log_every_steps",
               "grad_accum_steps", "eval_batches", "keep_checkpoints"):
    value = config[name]
    _require(isinstance(value, int) and value > 0, name, f"must be a positive integer, got {value!r}")
  for name in ("eval_every_steps", "checkpoint_every_steps", "warmup_steps"):
    value = config[name]
    _require(isinstance(value, int) and value >= 0, name, f"must be a non-negative integer, got {value!r}")
  _require(config.learning_rate > 0, "learning_rate", f"must be positive, got {config.learning_rate}")
  _require(config.global_batch_size % config.grad_accum_steps == 0, "global_batch_size",
           f"{config.global_batch_size} is not divisible by grad_accum_steps={config.grad_accum_steps}")
  _require(0 <= config.min_learning_rate_ratio <= 1, "min_learning_rate_ratio",
           f"must be in [0, 1], got {config.min_learning_rate_ratio}")
  _require(config.grad_clip_norm >= 0, "grad_clip_norm", f"must be >= 0, got {config.grad_clip_norm}")
  validate_model(config.model)
