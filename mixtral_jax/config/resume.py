"""What a resumed run may change: its config checked against the one its checkpoint saved."""

import json
from typing import Any

import ml_collections

from mixtral_jax.config.checks import ConfigError, require


# Settings a resumed run must share with its checkpoint: they shape the parameters or decide
# the tokenizer and the data order, so a change would silently train something else.
_RESUME_FIXED = (
    "seed", "model.vocab_size", "model.hidden_size", "model.intermediate_size",
    "model.num_layers", "model.num_heads", "model.num_kv_heads", "model.head_dim",
    "model.num_experts", "model.experts_per_token", "model.rope_theta", "model.rms_norm_eps",
    "model.sliding_window", "model.scan_layers", "model.router_balance", "data.source",
    "data.files", "data.text_key", "data.tfds_name", "data.train_split", "data.eval_split", "data.eval_fraction", "data.tokenizer_path",
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
  require(clip_before == (config.grad_clip_norm > 0), "grad_clip_norm",
           f"{config.grad_clip_norm} here, {before.get('grad_clip_norm')} in {where}: turning "
           f"clipping on or off changes the optimizer state's structure, which cannot resume")
  changed = [key for key in sorted(set(now) | set(before)) if now.get(key) != before.get(key)]
  # A setting the checkpoint does not record (added since it was written) is listed, not
  # refused: one that shapes the parameters differently fails the shape check anyway.
  fixed = [key for key in changed if key in _RESUME_FIXED and key in before]
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
