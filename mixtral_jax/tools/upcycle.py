"""Sparse upcycling (Komatsuzaki et al., 2022): a dense model's weights as step 0 of an MoE.

Attention, norms and embeddings are copied; each layer's MLP becomes E experts and its router is
drawn small (normal, std `router_std`), so that every expert starts about equally likely. The
experts are made one of two ways:
- "copy" (the paper's): every expert is the dense MLP. The combine weights of the k chosen
  experts sum to 1, so the MoE computes the dense MLP exactly: the upcycled model starts as the
  dense one (`noise` > 0 perturbs each copy, to tell them apart from the first step).
- "split" (LLaMA-MoE's): expert e is the e-th of E slices of the MLP's width (intermediate_size
  / E each), its down projection scaled by E, so that with the router's near-uniform start the
  expected output over the chosen experts equals the dense MLP's. Same compute per token as a
  dense model of width k·I/E; not equal to the dense model at step 0.

The dense model is an HF `MistralForCausalLM` / `LlamaForCausalLM` directory (safetensors) or one
of our own runs trained with `model.num_experts=1`.
"""

import dataclasses
import json
import os

import ml_collections
import numpy as np

from mixtral_jax.model.mixtral import stack_layers, unstack_layers
from mixtral_jax.tools import convert
from mixtral_jax.training import build as build_lib

METHODS = ("copy", "split")
# HF dense architectures whose layers are Mixtral's with an MLP in place of the MoE.
_ARCHITECTURES = {"mistral": "MistralForCausalLM", "llama": "LlamaForCausalLM"}


@dataclasses.dataclass(frozen=True)
class Upcycling:
  """How the dense MLP becomes experts (see the module's note)."""
  num_experts: int
  experts_per_token: int
  method: str = "copy"
  # Relative std of the multiplicative Gaussian noise on each expert's weights (0: exact copies).
  noise: float = 0.0
  # Std of the new routers' weights.
  router_std: float = 0.02
  seed: int = 0

  def check(self, intermediate_size: int) -> None:
    """ConversionError naming the first setting that cannot upcycle a dense MLP this wide."""
    if self.method not in METHODS:
      raise convert.ConversionError(f"--upcycle_method={self.method}: one of {', '.join(METHODS)}")
    if not 1 <= self.experts_per_token <= self.num_experts:
      raise convert.ConversionError(
          f"--experts_per_token={self.experts_per_token}: must be in 1 … --num_experts="
          f"{self.num_experts}")
    if self.method == "split" and intermediate_size % self.num_experts:
      raise convert.ConversionError(
          f"--num_experts={self.num_experts} does not divide the dense MLP's width "
          f"{intermediate_size} (--upcycle_method=split)")
    if self.noise < 0 or self.router_std <= 0:
      raise convert.ConversionError("--upcycle_noise must be >= 0 and the router std positive")


def upcycle_params(dense: dict, dense_model: ml_collections.ConfigDict,
                   upcycling: Upcycling) -> tuple[dict, ml_collections.ConfigDict]:
  """(MoE params, MoE model config) from a one-expert model's params and `config.model`."""
  upcycling.check(dense_model.intermediate_size)
  e, k = upcycling.num_experts, upcycling.experts_per_token
  model = dense_model.copy_and_resolve_references()
  width = model.intermediate_size // (e if upcycling.method == "split" else 1)
  model.update(num_experts=e, experts_per_token=k, intermediate_size=width)
  rng = np.random.default_rng(upcycling.seed)
  params = unstack_layers(dense)
  out = {name: value for name, value in params.items() if not name.startswith("layer_")}
  for layer in range(dense_model.num_layers):
    block = params[f"layer_{layer}"]
    gate_up = np.asarray(block["moe"]["experts"]["gate_up"], np.float32)[0]  # [D, 2, I]
    down = np.asarray(block["moe"]["experts"]["down"], np.float32)[0]  # [I, D]
    if upcycling.method == "split":  # expert x: columns x·w … (x+1)·w of the width
      gate_up = gate_up.reshape(gate_up.shape[0], 2, e, width).transpose(2, 0, 1, 3)
      down = down.reshape(e, width, -1) * e
    else:
      gate_up = np.repeat(gate_up[None], e, axis=0)
      down = np.repeat(down[None], e, axis=0)
    if upcycling.noise:
      gate_up = gate_up * (1 + upcycling.noise * rng.standard_normal(gate_up.shape))
      down = down * (1 + upcycling.noise * rng.standard_normal(down.shape))
    hidden = gate_up.shape[1]
    router = rng.standard_normal((hidden, e)) * upcycling.router_std
    out[f"layer_{layer}"] = {
        **{name: value for name, value in block.items() if name != "moe"},
        "moe": {"router": {"kernel": router},
                "experts": {"gate_up": gate_up, "down": down}}}
  if model.scan_layers:
    out = stack_layers(out, model.num_layers)
  return convert.float32_on_host(out), model


class _DenseReader:
  """Reads a dense HF checkpoint under the keys of a one-expert Mixtral (params_from_hf's)."""

  def __init__(self, read, tied: bool):
    self._read, self._tied = read, tied
    self.keys = ()  # per-expert layout, not the fused one

  def __call__(self, key: str, shape: tuple) -> np.ndarray:
    parts = key.split(".")
    if key == "lm_head.weight" and self._tied:
      return self._read("model.embed_tokens.weight", shape)
    if "block_sparse_moe" not in parts:
      return self._read(key, shape)
    layer = ".".join(parts[:3])  # model.layers.N
    if parts[-2] == "gate":  # no router in a dense model: upcycle_params draws one
      return np.zeros(shape, np.float32)
    name = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}[parts[-2]]
    return self._read(f"{layer}.mlp.{name}.weight", shape)


def _dense_model_config(hf_dir: str, base: ml_collections.ConfigDict):
  """(our one-expert `config.model`, whether the embeddings are tied) from a dense HF
  config.json; ConversionError for an architecture this cannot upcycle exactly."""
  path = os.path.join(hf_dir, "config.json")
  try:
    hf = json.load(open(path))
  except (OSError, ValueError) as e:
    raise convert.ConversionError(f"{path}: cannot read an HF config ({type(e).__name__})") from None
  kind = hf.get("model_type")
  if kind not in _ARCHITECTURES:
    raise convert.ConversionError(
        f"{path}: model_type is {kind!r}; upcycling reads a dense "
        f"{' or '.join(_ARCHITECTURES.values())}")
  unsupported = [name for name in ("attention_bias", "mlp_bias") if hf.get(name)]
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  if rope.get("rope_type", "default") != "default":
    unsupported.append(f"rope_type={rope['rope_type']}")
  if hf.get("hidden_act", "silu") != "silu":
    unsupported.append(f"hidden_act={hf['hidden_act']}")
  if unsupported:
    raise convert.ConversionError(f"{path}: {', '.join(unsupported)} is not a Mixtral layer")
  model = base.copy_and_resolve_references()
  try:
    model.update(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 1e4))),
        rms_norm_eps=hf["rms_norm_eps"], sliding_window=hf.get("sliding_window") or 0,
        num_experts=1, experts_per_token=1)
  except KeyError as e:
    raise convert.ConversionError(f"{path}: no {e.args[0]!r} field, which a "
                                  f"{_ARCHITECTURES[kind]} config has") from None
  return model, bool(hf.get("tie_word_embeddings", False))


def upcycle_hf(hf_dir: str, workdir: str, base: ml_collections.ConfigDict,
               upcycling: Upcycling) -> ml_collections.ConfigDict:
  """Writes a dense HF Mistral or Llama, upcycled, as step 0 of `workdir`; returns the training
  config (`base` with the MoE's model). Nothing is written if a tensor is missing."""
  dense_model, tied = _dense_model_config(hf_dir, base.model)
  upcycling.check(dense_model.intermediate_size)
  reader = _DenseReader(convert.SafetensorsReader(hf_dir), tied)
  dense = convert.params_from_hf(reader, dense_model)  # reads every tensor before any write
  params, model = upcycle_params(dense, dense_model, upcycling)
  config = base.copy_and_resolve_references()
  config.model = model
  return convert.write_step0(config, lambda: params, workdir, hf_dir)


def upcycle_run(dense_workdir: str, workdir: str, upcycling: Upcycling,
                step=None) -> ml_collections.ConfigDict:
  """Writes checkpoint `step` (default: latest) of one of our runs with `model.num_experts=1`,
  upcycled, as step 0 of `workdir`; returns the training config to continue with."""
  dense, config = build_lib.restore_params(dense_workdir, step)
  if config.model.num_experts != 1:
    raise convert.ConversionError(
        f"{dense_workdir}: model.num_experts={config.model.num_experts}; upcycling starts "
        f"from a dense run (model.num_experts=1)")
  params, config.model = upcycle_params(dense, config.model, upcycling)
  return convert.write_step0(config, lambda: params, workdir, dense_workdir)
