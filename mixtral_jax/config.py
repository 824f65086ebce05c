"""Checks a training config before anything is compiled, with one-line errors naming the field."""

import json
import math
import re
from typing import Any, Optional

import ml_collections

DISPATCH_MODES = ("dropless", "capacity")
GROUPED_MATMULS = ("auto", "blocked", "ragged_dot")
DTYPES = ("auto", "float32", "bfloat16")
ALL_TO_ALLS = ("padded", "ragged")
ATTENTIONS = ("auto", "blocked", "splash", "dot_product")
# Per backend, "auto" resolves to these (model_config).
_AUTO_ATTENTION = {"cpu": "blocked", "tpu": "splash", "gpu": "dot_product"}
# On CPU, chunks of 512 tokens measured fastest (benchmarks/README.md); on accelerators a chunk
# holds at most this many float32 logits per device (256 MiB): big matmuls, bounded memory.
_CPU_LOSS_CHUNK_TOKENS = 512
_ACCELERATOR_LOSS_CHUNK_LOGITS = 2 ** 26
DATA_SOURCES = ("stdlib", "files", "tfds")
# The mesh's axes, in order (mixtral_jax.sharding builds it; this module only checks sizes).
MESH_AXES = ("data", "fsdp", "expert", "tensor")


class ConfigError(ValueError):
  """A config field has an invalid value; the message names the field."""


def _require(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise ConfigError(f"config.{field}: {message}")


def validate_model(model: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first invalid field of `config.model`."""
  for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
               "num_kv_heads", "head_dim", "num_experts", "experts_per_token", "block_size",
               "expert_mlp_chunks"):
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
  _require(model.all_to_all in ALL_TO_ALLS, "model.all_to_all",
           f"unknown all_to_all {model.all_to_all!r}; expected one of {list(ALL_TO_ALLS)}")
  _require(model.all_to_all == "padded" or model.dispatch == "dropless", "model.all_to_all",
           "'ragged' applies to dispatch='dropless' (capacity buffers are always full-size)")
  _require(model.attention in ATTENTIONS, "model.attention",
           f"unknown attention {model.attention!r}; expected one of {list(ATTENTIONS)}")
  _require(model.dtype in DTYPES, "model.dtype",
           f"unknown dtype {model.dtype!r}; expected one of {list(DTYPES)}")
  _require(model.capacity_factor > 0, "model.capacity_factor",
           f"must be positive, got {model.capacity_factor}")
  _require(isinstance(model.attention_query_chunk, int) and model.attention_query_chunk >= 0,
           "model.attention_query_chunk",
           f"must be a non-negative integer (0 = unblocked), got {model.attention_query_chunk!r}")
  _require(isinstance(model.loss_chunk_tokens, int) and model.loss_chunk_tokens >= -1,
           "model.loss_chunk_tokens",
           f"must be a non-negative integer (0 = full logits) or -1 (auto), "
           f"got {model.loss_chunk_tokens!r}")
  _require(model.sliding_window >= 0, "model.sliding_window",
           f"must be >= 0 (0 = full causal), got {model.sliding_window}")
  _require(model.rope_theta > 0, "model.rope_theta", f"must be positive, got {model.rope_theta}")
  _require(model.rms_norm_eps > 0, "model.rms_norm_eps", f"must be positive, got {model.rms_norm_eps}")
  _require(0 <= model.router_jitter_noise < 1, "model.router_jitter_noise",
           f"must be in [0, 1), got {model.router_jitter_noise}")
  for name in ("router_aux_loss_coef", "router_z_loss_coef"):
    _require(model[name] >= 0, f"model.{name}", f"must be >= 0, got {model[name]}")


def model_config(model: ml_collections.ConfigDict,
                 platform: str) -> ml_collections.FrozenConfigDict:
  """The frozen `config.model` the model is built from, its "auto" choices resolved for
  `platform` ("cpu", "gpu" or "tpu").

  grouped_matmul: the blocked loop on CPU, where `ragged_dot` lowers to a masked dense dot, and
  `ragged_dot` where XLA has a native grouped matmul. attention: see _AUTO_ATTENTION.
  loss_chunk_tokens (-1): 512 tokens on CPU; elsewhere the largest power of two whose chunk
  of logits stays within _ACCELERATOR_LOSS_CHUNK_LOGITS. dtype: bfloat16 compute where the
  chip has bf16 matmul units (GPU, TPU); float32 on CPU, which has none (bf16 is slower there).
  """
  resolved = model.copy_and_resolve_references()
  if resolved.grouped_matmul == "auto":
    resolved.grouped_matmul = "blocked" if platform == "cpu" else "ragged_dot"
  if resolved.attention == "auto":
    resolved.attention = _AUTO_ATTENTION.get(platform, "blocked")
  if resolved.dtype == "auto":
    resolved.dtype = "float32" if platform == "cpu" else "bfloat16"
  if resolved.loss_chunk_tokens == -1:
    fit = max(1, _ACCELERATOR_LOSS_CHUNK_LOGITS // resolved.vocab_size)
    resolved.loss_chunk_tokens = (_CPU_LOSS_CHUNK_TOKENS if platform == "cpu"
                                  else 2 ** (fit.bit_length() - 1))
  return ml_collections.FrozenConfigDict(resolved)


# Model fields that may say "auto" (this value) in a config; model_config resolves each per
# backend, and the model and the step refuse a config that still holds one.
AUTO_VALUES = {"grouped_matmul": "auto", "attention": "auto", "loss_chunk_tokens": -1,
               "dtype": "auto"}


def require_resolved(model: ml_collections.ConfigDict, where: str) -> None:
  """Raises ConfigError if `model` still holds an "auto" choice: `where` (the model, the step)
  must be given `model_config(config.model, platform)`, not the raw `config.model`."""
  for name, auto in AUTO_VALUES.items():
    _require(model[name] != auto, f"model.{name}",
             f"{model[name]!r} (auto) reached {where} unresolved; build it from "
             f"config.model_config(config.model, platform) (build.build does)")


def validate_data(data: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first invalid field of `config.data`."""
  _require(data.source in DATA_SOURCES, "data.source",
           f"unknown source {data.source!r}; expected one of {list(DATA_SOURCES)}")
  _require(data.source != "files" or bool(data.files.strip()), "data.files",
           "source='files' needs a glob, e.g. '~/corpus/**/*.txt'")
  _require(data.source != "tfds" or bool(data.tfds_name), "data.tfds_name",
           "source='tfds' needs a dataset name, e.g. 'lm1b'")
  _require(0 <= data.eval_fraction < 1, "data.eval_fraction",
           f"must be in [0, 1), got {data.eval_fraction}")
  _require(isinstance(data.num_streams, int) and data.num_streams > 0, "data.num_streams",
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
    _require(isinstance(size, int) and (size > 0 or size == -1), f"mesh.{axis}",
             f"must be a positive integer or -1 (all remaining devices), got {size!r}")
  fill = [axis for axis, size in sizes.items() if size == -1]
  _require(len(fill) <= 1, f"mesh.{fill[-1] if fill else ''}",
           f"only one axis may be -1, got {fill}")
  known = math.prod(size for size in sizes.values() if size != -1)
  if fill:
    _require(num_devices % known == 0, f"mesh.{fill[0]}",
             f"-1 cannot fill {num_devices} devices: the other axes multiply to {known}")
  sizes = mesh_shape(config.mesh, num_devices)
  _require(math.prod(sizes.values()) == num_devices, "mesh",
           f"axis sizes {sizes} multiply to {math.prod(sizes.values())}, "
           f"but there are {num_devices} devices")
  for axis, size in sizes.items():
    dcn = config.mesh.dcn[axis]
    _require(isinstance(dcn, int) and dcn > 0 and size % dcn == 0, f"mesh.dcn.{axis}",
             f"must be a positive integer dividing mesh.{axis}={size}, got {dcn!r}")
  model = config.model
  _require(model.num_experts % sizes["expert"] == 0, "model.num_experts",
           f"{model.num_experts} is not divisible by mesh.expert={sizes['expert']}")
  batch_shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
  micro_batch = config.global_batch_size // config.grad_accum_steps
  _require(micro_batch % batch_shards == 0, "global_batch_size",
           f"{config.global_batch_size} (in micro-batches of {micro_batch}) is not divisible by "
           f"the {batch_shards} batch shards (mesh.data × mesh.fsdp × mesh.expert)")
  tensor, fsdp = sizes["tensor"], sizes["fsdp"]
  for name in ("num_kv_heads", "num_heads", "intermediate_size", "vocab_size"):
    _require(model[name] % tensor == 0, f"model.{name}",
             f"{model[name]} is not divisible by mesh.tensor={tensor}")
  _require(model.intermediate_size // tensor % model.expert_mlp_chunks == 0,
           "model.expert_mlp_chunks",
           f"{model.expert_mlp_chunks} does not divide the experts' width per tensor shard "
           f"({model.intermediate_size} / mesh.tensor={tensor})")
  _require(model.hidden_size % fsdp == 0, "model.hidden_size",
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
    _require(isinstance(value, int) and value > 0, name, f"must be a positive integer, got {value!r}")
  for name in ("eval_every_steps", "checkpoint_every_steps", "warmup_steps", "max_nan_steps"):
    value = config[name]
    _require(isinstance(value, int) and value >= 0, name, f"must be a non-negative integer, got {value!r}")
  _require(math.isfinite(config.learning_rate) and config.learning_rate > 0, "learning_rate",
           f"must be positive and finite, got {config.learning_rate}")
  for name in ("adam_b1", "adam_b2"):
    _require(0 <= config[name] < 1, name, f"must be in [0, 1), got {config[name]}")
  _require(math.isfinite(config.adam_eps) and config.adam_eps > 0, "adam_eps",
           f"must be positive and finite (it keeps AdamW's update finite), got {config.adam_eps}")
  _require(math.isfinite(config.weight_decay) and config.weight_decay >= 0, "weight_decay",
           f"must be >= 0 and finite, got {config.weight_decay}")
  _require(config.global_batch_size % config.grad_accum_steps == 0, "global_batch_size",
           f"{config.global_batch_size} is not divisible by grad_accum_steps={config.grad_accum_steps}")
  _require(0 <= config.min_learning_rate_ratio <= 1, "min_learning_rate_ratio",
           f"must be in [0, 1], got {config.min_learning_rate_ratio}")
  _require(config.grad_clip_norm >= 0, "grad_clip_norm", f"must be >= 0, got {config.grad_clip_norm}")
  profile_range(config)
  validate_model(config.model)
  validate_data(config.data)
  if num_devices is not None:
    validate_mesh(config, num_devices)
  _require(not (backend == "cpu" and config.model.all_to_all == "ragged"), "model.all_to_all",
           "'ragged' needs a GPU or TPU: XLA:CPU does not implement ragged-all-to-all")
  _require(not (backend == "gpu" and config.model.attention == "splash"), "model.attention",
           "'splash' is a TPU kernel (on CPU it runs interpreted); on GPU use 'dot_product'")


def profile_range(config: ml_collections.ConfigDict) -> Optional[tuple[int, int]]:
  """(first, last) step of config.profile_steps ("A:B"), or None; ConfigError if malformed."""
  text = config.get("profile_steps", "")
  if not text:
    return None
  match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
  _require(bool(match), "profile_steps", f"{text!r} is not FIRST:LAST, e.g. '10:12'")
  first, last = int(match[1]), int(match[2])
  _require(1 <= first <= last <= config.num_train_steps, "profile_steps",
           f"{text!r}: need 1 <= {first} <= {last} <= num_train_steps={config.num_train_steps}")
  return first, last


# Settings a resumed run must share with its checkpoint: they shape the parameters or decide
# the tokenizer and the data order, so a change would silently train something else.
_RESUME_FIXED = (
    "seed", "model.vocab_size", "model.hidden_size", "model.intermediate_size",
    "model.num_layers", "model.num_heads", "model.num_kv_heads", "model.head_dim",
    "model.num_experts", "model.experts_per_token", "model.rope_theta", "model.rms_norm_eps",
    "model.sliding_window", "model.scan_layers", "data.source", "data.files", "data.text_key", "data.tfds_name",
    "data.train_split", "data.eval_split", "data.eval_fraction", "data.tokenizer_path",
    "data.num_streams")
# Settings expected to change between runs of one training (where and how it runs, how often it
# logs): not worth a warning.
_RESUME_FREE = ("log_every_steps", "eval_every_steps", "eval_batches", "checkpoint_every_steps",
                "keep_checkpoints", "max_nan_steps", "cpu_reuse_step_memory",
                "allow_resume_changes", "profile_steps", "data.data_dir", "mesh.")


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def check_resume(saved: dict, config: ml_collections.ConfigDict, where: str) -> list[str]:
  """Compares a checkpoint's config (JSON, as saved) with the config resuming it.

  Raises ConfigError naming the first differing setting that must match (unless
  `allow_resume_changes`), or a change of gradient clipping on/off (the optimizer state differs
  in structure). Returns the other differences as "field: saved → now", for a warning.
  """
  now = _flat(json_of(config))
  before = _flat(saved)
  clip_before = before.get("grad_clip_norm", 0) > 0
  _require(clip_before == (config.grad_clip_norm > 0), "grad_clip_norm",
           f"{config.grad_clip_norm} here, {before.get('grad_clip_norm')} in {where}: turning "
           f"clipping on or off changes the optimizer state's structure, which cannot resume")
  changed = [key for key in sorted(set(now) | set(before)) if now.get(key) != before.get(key)]
  fixed = [key for key in changed if key in _RESUME_FIXED]
  if fixed and not config.allow_resume_changes:
    key = fixed[0]
    raise ConfigError(f"config.{key}: {now.get(key)!r} here, {before.get(key)!r} in {where}: "
                      f"model, tokenizer and data settings must match to resume (or set "
                      f"config.allow_resume_changes=True)")
  return [f"{key}: {before.get(key)!r} → {now.get(key)!r}" for key in changed
          if not any(key == free or (free.endswith(".") and key.startswith(free))
                     for free in _RESUME_FREE)]


def json_of(config: ml_collections.ConfigDict) -> dict:
  """The config as the JSON object checkpoints and config.json record."""
  return json.loads(config.to_json_best_effort())


# ml_collections raises these while parsing --config flags (overrides) or on first use (the file).
FLAG_ERRORS = (AttributeError, OSError, SyntaxError, ValueError, TypeError, KeyError)


def flag_error(e: Exception, argv: list[str]) -> SystemExit:
  """One line for a --config file that does not load or a --config.* override naming no field
  (`e` one of FLAG_ERRORS, `argv` the command line)."""
  if isinstance(e, AttributeError):  # e.g. --config.learnig_rate
    text = str(e).replace("\\n", " ")
    guess = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    hint = f"; did you mean {guess[1]}?" if guess else ""
    field = guess[2] if guess else text.strip("'\" ")
    return SystemExit(f"error: a --config.* flag names {field!r}, which is no config field{hint}")
  path = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")][-1:] or [""]
  reason = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
  return SystemExit(f"error: --config={path[0]}: cannot load it ({reason})")
