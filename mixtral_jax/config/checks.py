"""Checks a training config before anything is compiled, with one-line errors naming the field."""

import math
import re
from typing import Optional

import ml_collections

from mixtral_jax.errors import UserError

DISPATCH_MODES = ("dropless", "capacity")
GROUPED_MATMULS = ("auto", "blocked", "ragged_dot")
DTYPES = ("auto", "float32", "bfloat16")
ALL_TO_ALLS = ("padded", "ragged")
ATTENTIONS = ("auto", "blocked", "splash", "dot_product")
ROUTER_BALANCES = ("aux_loss", "aux_free", "both")
DATA_SOURCES = ("stdlib", "files", "tfds")
# The mesh's axes, in order (parallel/sharding.py builds it; this module only checks sizes).
MESH_AXES = ("data", "fsdp", "expert", "tensor")



class ConfigError(UserError, ValueError):
  """A config field has an invalid value; the message names the field."""


def require(ok: bool, field: str, message: str) -> None:
  """Raises ConfigError "config.FIELD: MESSAGE" unless `ok`."""
  if not ok:
    raise ConfigError(f"config.{field}: {message}")


def validate_model(model: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first invalid field of `config.model`."""
  for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
               "num_kv_heads", "head_dim", "num_experts", "experts_per_token", "block_size",
               "expert_mlp_chunks"):
    value = model[name]
    require(isinstance(value, int) and value > 0, f"model.{name}",
             f"must be a positive integer, got {value!r}")
  require(model.experts_per_token <= model.num_experts, "model.experts_per_token",
           f"{model.experts_per_token} exceeds model.num_experts={model.num_experts}")
  require(model.num_heads % model.num_kv_heads == 0, "model.num_heads",
           f"{model.num_heads} is not divisible by model.num_kv_heads={model.num_kv_heads}")
  require(model.head_dim % 2 == 0, "model.head_dim",
           f"must be even for rotary embeddings, got {model.head_dim}")
  require(model.dispatch in DISPATCH_MODES, "model.dispatch",
           f"unknown dispatch {model.dispatch!r}; expected one of {list(DISPATCH_MODES)}")
  require(model.grouped_matmul in GROUPED_MATMULS, "model.grouped_matmul",
           f"unknown grouped matmul {model.grouped_matmul!r}; expected one of {list(GROUPED_MATMULS)}")
  require(model.all_to_all in ALL_TO_ALLS, "model.all_to_all",
           f"unknown all_to_all {model.all_to_all!r}; expected one of {list(ALL_TO_ALLS)}")
  require(model.all_to_all == "padded" or model.dispatch == "dropless", "model.all_to_all",
           "'ragged' applies to dispatch='dropless' (capacity buffers are always full-size)")
  require(model.attention in ATTENTIONS, "model.attention",
           f"unknown attention {model.attention!r}; expected one of {list(ATTENTIONS)}")
  require(model.dtype in DTYPES, "model.dtype",
           f"unknown dtype {model.dtype!r}; expected one of {list(DTYPES)}")
  require(model.capacity_factor > 0, "model.capacity_factor",
           f"must be positive, got {model.capacity_factor}")
  require(isinstance(model.attention_query_chunk, int) and model.attention_query_chunk >= 0,
           "model.attention_query_chunk",
           f"must be a non-negative integer (0 = unblocked), got {model.attention_query_chunk!r}")
  require(isinstance(model.loss_chunk_tokens, int) and model.loss_chunk_tokens >= -1,
           "model.loss_chunk_tokens",
           f"must be a non-negative integer (0 = full logits) or -1 (auto), "
           f"got {model.loss_chunk_tokens!r}")
  require(model.sliding_window >= 0, "model.sliding_window",
           f"must be >= 0 (0 = full causal), got {model.sliding_window}")
  require(model.rope_theta > 0, "model.rope_theta", f"must be positive, got {model.rope_theta}")
  require(model.rms_norm_eps > 0, "model.rms_norm_eps", f"must be positive, got {model.rms_norm_eps}")
  require(0 <= model.router_jitter_noise < 1, "model.router_jitter_noise",
           f"must be in [0, 1), got {model.router_jitter_noise}")
  require(model.router_balance in ROUTER_BALANCES, "model.router_balance",
          f"unknown balancing {model.router_balance!r}; expected one of {list(ROUTER_BALANCES)}")
  require(model.router_bias_rate >= 0, "model.router_bias_rate",
          f"must be >= 0, got {model.router_bias_rate}")
  for name in ("router_aux_loss_coef", "router_z_loss_coef"):
    require(model[name] >= 0, f"model.{name}", f"must be >= 0, got {model[name]}")


def validate_data(data: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first invalid field of `config.data`."""
  require(data.source in DATA_SOURCES, "data.source",
           f"unknown source {data.source!r}; expected one of {list(DATA_SOURCES)}")
  require(data.source != "files" or bool(data.files.strip()), "data.files",
           "source='files' needs a glob, e.g. '~/corpus/**/*.txt'")
  require(data.source != "tfds" or bool(data.tfds_name), "data.tfds_name",
           "source='tfds' needs a dataset name, e.g. 'lm1b'")
  require(0 <= data.eval_fraction < 1, "data.eval_fraction",
           f"must be in [0, 1), got {data.eval_fraction}")
  require(isinstance(data.num_streams, int) and data.num_streams > 0, "data.num_streams",
           f"must be a positive integer, got {data.num_streams!r}")


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """Axis sizes with the (at most one) -1 replaced by the devices the other axes leave."""
  sizes = {axis: mesh_config[axis] for axis in MESH_AXES}
  known = math.prod(size for size in sizes.values() if size != -1)
  return {axis: num_devices // known if size == -1 else size for axis, size in sizes.items()}


def validate_mesh(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ConfigError if `config.mesh` does not fit `num_devices` devices and the model."""
  sizes = {axis: config.mesh[axis] for axis in MESH_AXES}
  for axis, size in sizes.items():
    require(isinstance(size, int) and (size > 0 or size == -1), f"mesh.{axis}",
             f"must be a positive integer or -1 (all remaining devices), got {size!r}")
  fill = [axis for axis, size in sizes.items() if size == -1]
  require(len(fill) <= 1, f"mesh.{fill[-1] if fill else ''}",
           f"only one axis may be -1, got {fill}")
  known = math.prod(size for size in sizes.values() if size != -1)
  if fill:
    require(num_devices % known == 0, f"mesh.{fill[0]}",
             f"-1 cannot fill {num_devices} devices: the other axes multiply to {known}")
  sizes = mesh_shape(config.mesh, num_devices)
  require(math.prod(sizes.values()) == num_devices, "mesh",
           f"axis sizes {sizes} multiply to {math.prod(sizes.values())}, "
           f"but there are {num_devices} devices")
  for axis, size in sizes.items():
    dcn = config.mesh.dcn[axis]
    require(isinstance(dcn, int) and dcn > 0 and size % dcn == 0, f"mesh.dcn.{axis}",
             f"must be a positive integer dividing mesh.{axis}={size}, got {dcn!r}")
  model = config.model
  require(model.num_experts % sizes["expert"] == 0, "model.num_experts",
           f"{model.num_experts} is not divisible by mesh.expert={sizes['expert']}")
  batch_shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
  micro_batch = config.global_batch_size // config.grad_accum_steps
  require(micro_batch % batch_shards == 0, "global_batch_size",
           f"{config.global_batch_size} (in micro-batches of {micro_batch}) is not divisible by "
           f"the {batch_shards} batch shards (mesh.data × mesh.fsdp × mesh.expert)")
  tensor, fsdp = sizes["tensor"], sizes["fsdp"]
  for name in ("num_kv_heads", "num_heads", "intermediate_size", "vocab_size"):
    require(model[name] % tensor == 0, f"model.{name}",
             f"{model[name]} is not divisible by mesh.tensor={tensor}")
  require(model.intermediate_size // tensor % model.expert_mlp_chunks == 0,
           "model.expert_mlp_chunks",
           f"{model.expert_mlp_chunks} does not divide the experts' width per tensor shard "
           f"({model.intermediate_size} / mesh.tensor={tensor})")
  require(model.hidden_size % fsdp == 0, "model.hidden_size",
           f"{model.hidden_size} is not divisible by mesh.fsdp={fsdp}")


def validate(config: ml_collections.ConfigDict, num_devices: Optional[int] = None,
             backend: Optional[str] = None) -> None:
  """Raises ConfigError for the first invalid field of a training config.

  With `num_devices`, also checks that the mesh fits those devices and the model's sizes;
  with `backend` ("cpu", "gpu", "tpu"), that the chosen collectives exist there.
  """
  for name in ("num_train_steps", "global_batch_size", "seq_len", "log_every_steps",
               "grad_accum_steps", "eval_batches", "keep_checkpoints"):
    value = config[name]
    require(isinstance(value, int) and value > 0, name, f"must be a positive integer, got {value!r}")
  for name in ("eval_every_steps", "checkpoint_every_steps", "warmup_steps", "max_nan_steps"):
    value = config[name]
    require(isinstance(value, int) and value >= 0, name, f"must be a non-negative integer, got {value!r}")
  require(math.isfinite(config.learning_rate) and config.learning_rate > 0, "learning_rate",
           f"must be positive and finite, got {config.learning_rate}")
  for name in ("adam_b1", "adam_b2"):
    require(0 <= config[name] < 1, name, f"must be in [0, 1), got {config[name]}")
  require(math.isfinite(config.adam_eps) and config.adam_eps > 0, "adam_eps",
           f"must be positive and finite (it keeps AdamW's update finite), got {config.adam_eps}")
  require(math.isfinite(config.weight_decay) and config.weight_decay >= 0, "weight_decay",
           f"must be >= 0 and finite, got {config.weight_decay}")
  require(config.global_batch_size % config.grad_accum_steps == 0, "global_batch_size",
           f"{config.global_batch_size} is not divisible by grad_accum_steps={config.grad_accum_steps}")
  require(0 <= config.min_learning_rate_ratio <= 1, "min_learning_rate_ratio",
           f"must be in [0, 1], got {config.min_learning_rate_ratio}")
  require(config.grad_clip_norm >= 0, "grad_clip_norm", f"must be >= 0, got {config.grad_clip_norm}")
  profile_range(config)
  validate_model(config.model)
  validate_data(config.data)
  if num_devices is not None:
    validate_mesh(config, num_devices)
  require(not (backend == "cpu" and config.model.all_to_all == "ragged"), "model.all_to_all",
           "'ragged' needs a GPU or TPU: XLA:CPU does not implement ragged-all-to-all")
  require(not (backend == "gpu" and config.model.attention == "splash"), "model.attention",
           "'splash' is a TPU kernel (on CPU it runs interpreted); on GPU use 'dot_product'")


def profile_range(config: ml_collections.ConfigDict) -> Optional[tuple[int, int]]:
  """(first, last) step of config.profile_steps ("A:B"), or None; ConfigError if malformed."""
  text = config.get("profile_steps", "")
  if not text:
    return None
  match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
  require(bool(match), "profile_steps", f"{text!r} is not FIRST:LAST, e.g. '10:12'")
  first, last = int(match[1]), int(match[2])
  require(1 <= first <= last <= config.num_train_steps, "profile_steps",
           f"{text!r}: need 1 <= {first} <= {last} <= num_train_steps={config.num_train_steps}")
  return first, last
