"""A model config's "auto" choices resolved per backend: the config the model is built from."""

import ml_collections

from mixtral_jax.config.checks import require

# Per backend, "auto" resolves to these (model_config).
_AUTO_ATTENTION = {"cpu": "blocked", "tpu": "splash", "gpu": "dot_product"}
# On CPU, chunks of 512 tokens measured fastest (benchmarks/README.md); on accelerators a chunk
# holds at most this many float32 logits per device (256 MiB): big matmuls, bounded memory.
_CPU_LOSS_CHUNK_TOKENS = 512
_ACCELERATOR_LOSS_CHUNK_LOGITS = 2 ** 26


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
    require(model[name] != auto, f"model.{name}",
             f"{model[name]!r} (auto) reached {where} unresolved; build it from "
             f"config.model_config(config.model, platform) (build.build does)")
