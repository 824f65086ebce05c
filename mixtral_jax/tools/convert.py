"""Convert between our checkpoints and the HF transformers Mixtral format (safetensors).

    mixtral-convert to-hf --workdir WORKDIR [--step N] --out DIR
    mixtral-convert from-hf --hf DIR --workdir WORKDIR

Keys follow `save_pretrained`'s per-expert layout, which transformers 4.x and 5.x both load:
`model.layers.N.block_sparse_moe.experts.M.{w1,w2,w3}.weight`, PyTorch Linear weights [out, in].
The output is written to a temporary directory beside `--out` and renamed into place, so a
failed export never leaves a half-written directory. Either direction holds about one copy of
the parameters: tensors are converted one at a time and shards written as they fill.
"""

import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Optional

import jax
import ml_collections
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from mixtral_jax.errors import UserError
from mixtral_jax.model.mixtral import stack_layers, unstack_layers
from mixtral_jax.runtime.workdir import WorkDir
from mixtral_jax.training import build as build_lib
from mixtral_jax.training import checkpoint

_SAFETENSORS_INDEX = "model.safetensors.index.json"


def hf_config(model_config) -> dict[str, Any]:
  """config.json fields of transformers' MixtralConfig for our `config.model`."""
  m = model_config
  return {
      "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
      "vocab_size": m.vocab_size, "hidden_size": m.hidden_size,
      "intermediate_size": m.intermediate_size, "num_hidden_layers": m.num_layers,
      "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
      "head_dim": m.head_dim, "hidden_act": "silu", "rms_norm_eps": m.rms_norm_eps,
      "rope_theta": m.rope_theta,
      "rope_parameters": {"rope_theta": m.rope_theta, "rope_type": "default"},
      "sliding_window": m.sliding_window or None, "tie_word_embeddings": False,
      "num_local_experts": m.num_experts, "num_experts_per_tok": m.experts_per_token,
      "router_aux_loss_coef": m.router_aux_loss_coef, "router_jitter_noise": 0.0,
      "output_router_logits": False, "max_position_embeddings": 32768,
      "initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": True,
      "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0, "dtype": "float32",
  }


def hf_tensors(params, model_config) -> Iterator[tuple[str, np.ndarray]]:
  """(HF key, array) pairs for our params, one tensor at a time (never two full copies)."""
  m = model_config
  f32 = lambda x: np.asarray(x, np.float32)
  params = unstack_layers(params)  # a scan_layers checkpoint exports as the unrolled one
  yield "model.embed_tokens.weight", f32(params["embed"])
  yield "model.norm.weight", f32(params["final_norm"]["scale"])
  yield "lm_head.weight", f32(params["lm_head"]["kernel"]).T
  for i in range(m.num_layers):
    layer, prefix = params[f"layer_{i}"], f"model.layers.{i}"
    yield f"{prefix}.input_layernorm.weight", f32(layer["input_norm"]["scale"])
    yield f"{prefix}.post_attention_layernorm.weight", f32(layer["post_attention_norm"]["scale"])
    attn = layer["attention"]
    for name in ("q_proj", "k_proj", "v_proj"):
      kernel = f32(attn[name]["kernel"])  # [D, heads, head_dim]
      yield f"{prefix}.self_attn.{name}.weight", kernel.reshape(kernel.shape[0], -1).T
    o = f32(attn["o_proj"]["kernel"])  # [heads, head_dim, D]
    yield f"{prefix}.self_attn.o_proj.weight", o.reshape(-1, o.shape[-1]).T
    moe = layer["moe"]
    yield f"{prefix}.block_sparse_moe.gate.weight", f32(moe["router"]["kernel"]).T
    # Sliced in numpy: jax would compile and run an op per expert.
    gate_up = f32(moe["experts"]["gate_up"])  # [E, D, 2, I]
    down = f32(moe["experts"]["down"])  # [E, I, D]
    for e in range(m.num_experts):
      expert = f"{prefix}.block_sparse_moe.experts.{e}"
      yield f"{expert}.w1.weight", gate_up[e, :, 0, :].T
      yield f"{expert}.w3.weight", gate_up[e, :, 1, :].T
      yield f"{expert}.w2.weight", down[e].T


def _shards(tensors: Iterator[tuple[str, np.ndarray]],
            max_shard_bytes: int) -> Iterator[dict[str, np.ndarray]]:
  """Groups tensors, in order, into shards of at most `max_shard_bytes` (or a single tensor)."""
  shard, size = {}, 0
  for key, array in tensors:
    if shard and size + array.nbytes > max_shard_bytes:
      yield shard
      shard, size = {}, 0
    shard[key] = np.ascontiguousarray(array)
    size += array.nbytes
  yield shard


def _write_shards(tensors: Iterator[tuple[str, np.ndarray]], out_dir: str,
                  max_shard_bytes: int) -> None:
  """Writes each shard as soon as it is full: memory holds one shard, not a copy of the model."""
  files, shard_of, total = [], {}, 0
  for shard in _shards(tensors, max_shard_bytes):
    files.append(os.path.join(out_dir, f"shard-{len(files)}"))  # named once the count is known
    save_file(shard, files[-1], metadata={"format": "pt"})
    shard_of.update({key: len(files) - 1 for key in shard})
    total += sum(array.nbytes for array in shard.values())
    del shard
  if len(files) == 1:
    os.replace(files[0], os.path.join(out_dir, "model.safetensors"))
    return
  names = [f"model-{n:05d}-of-{len(files):05d}.safetensors" for n in range(1, len(files) + 1)]
  for file, name in zip(files, names):
    os.replace(file, os.path.join(out_dir, name))
  weight_map = {key: names[n] for key, n in shard_of.items()}
  with open(os.path.join(out_dir, _SAFETENSORS_INDEX), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# Loads our SentencePiece model through transformers' Llama tokenizer: no added BOS/EOS and no
# prefix space, as we train it (checked token for token in tests/convert_test.py).
_TOKENIZER_CONFIG = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False,
                     "add_eos_token": False, "add_prefix_space": False, "legacy": False,
                     "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                     "pad_token": "<pad>"}


def export_hf(params, model_config, out_dir: str, max_shard_bytes: int = 4 << 30,
              tokenizer_model: Optional[str] = None) -> None:
  """Writes config.json, safetensors and (if given) the tokenizer to `out_dir`, atomically.

  ConversionError for a model that HF's Mixtral cannot route as we do (aux-loss-free biases).
  """
  out_dir = os.path.abspath(out_dir)
  balance = model_config.get("router_balance", "aux_loss")
  if balance != "aux_loss":
    raise ConversionError(
        f"model.router_balance={balance!r}: the router selects experts with per-expert biases, "
        f"which HF's MixtralForCausalLM has no place for (its routing would differ); nothing "
        f"written")
  if os.path.exists(out_dir):
    raise OutputExistsError(f"--out {out_dir} already exists; choose a new directory")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-export-", dir=parent)
  try:
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config(model_config), f, indent=2)
    _write_shards(hf_tensors(params, model_config), tmp, max_shard_bytes)
    if tokenizer_model:
      shutil.copyfile(tokenizer_model, os.path.join(tmp, "tokenizer.model"))
      with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump(_TOKENIZER_CONFIG, f, indent=2)
    os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


class ConversionError(UserError, ValueError):
  """An HF directory cannot be imported; the message names the file or key."""


class OutputExistsError(ConversionError, FileExistsError):
  """The export's directory exists already: nothing is written over it."""


def model_config_from_hf(hf_dir: str,
                         base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Our `config.model` from an HF Mixtral config.json: a copy of `base` (a `config.model`, which
  gives the training-only fields) with the architecture's fields set from HF."""
  path = os.path.join(hf_dir, "config.json")
  try:
    hf = json.load(open(path))
  except (OSError, ValueError) as e:
    raise ConversionError(f"{path}: cannot read an HF config ({type(e).__name__})") from None
  if hf.get("model_type") != "mixtral":
    raise ConversionError(f"{path}: model_type is {hf.get('model_type')!r}, not 'mixtral'")
  model = base.copy_and_resolve_references()
  rope = hf.get("rope_parameters") or {}
  try:
    _update_from_hf(model, hf, rope)
  except KeyError as e:
    raise ConversionError(f"{path}: no {e.args[0]!r} field, which a Mixtral config has") from None
  return model


def _update_from_hf(model: ml_collections.ConfigDict, hf: dict, rope: dict) -> None:
  model.update(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
      num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"],
      head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
      num_experts=hf["num_local_experts"], experts_per_token=hf["num_experts_per_tok"],
      rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 1e6))),
      rms_norm_eps=hf["rms_norm_eps"], sliding_window=hf.get("sliding_window") or 0,
      router_aux_loss_coef=hf.get("router_aux_loss_coef", model.router_aux_loss_coef))


class SafetensorsReader:
  """Reads tensors by key from model.safetensors or the shards an index names, as numpy."""

  def __init__(self, hf_dir: str):
    index = os.path.join(hf_dir, _SAFETENSORS_INDEX)
    if os.path.exists(index):
      weight_map = json.load(open(index))["weight_map"]
    elif os.path.exists(os.path.join(hf_dir, "model.safetensors")):
      weight_map = None
    else:
      raise ConversionError(f"{hf_dir}: no model.safetensors or {_SAFETENSORS_INDEX}")
    self._dir, self._weight_map = hf_dir, weight_map
    for name in set(weight_map.values()) if weight_map else ["model.safetensors"]:
      if not os.path.exists(os.path.join(hf_dir, name)):
        raise ConversionError(f"{hf_dir}: shard {name} named in {_SAFETENSORS_INDEX} is missing")
    if weight_map:
      self.keys = set(weight_map)
    else:
      with self._file("model.safetensors") as f:
        self.keys = set(f.keys())

  def _file(self, name: str):
    # A handle maps its whole file, and the pages it has read count in this process's memory
    # until it closes: one handle per tensor keeps that to one tensor, not the whole model.
    return safe_open(os.path.join(self._dir, name), framework="numpy")

  def __call__(self, key: str, shape: tuple) -> np.ndarray:
    if key not in self.keys:
      raise ConversionError(f"{self._dir}: tensor {key} is missing")
    with self._file(self._weight_map[key] if self._weight_map else "model.safetensors") as f:
      array = f.get_tensor(key)
    if array.shape != tuple(shape):
      raise ConversionError(f"{self._dir}: tensor {key} has shape {tuple(array.shape)}, "
                            f"expected {tuple(shape)} from config.json")
    return array


def params_from_hf(read, model_config) -> dict:
  """Our params (float32, host CPU) from `read(key, shape)`; per-expert or fused (v5) experts."""
  m = model_config
  d, v, i, e = m.hidden_size, m.vocab_size, m.intermediate_size, m.num_experts
  h, kv, hd = m.num_heads, m.num_kv_heads, m.head_dim
  params = {"embed": read("model.embed_tokens.weight", (v, d)),
            "final_norm": {"scale": read("model.norm.weight", (d,))},
            "lm_head": {"kernel": read("lm_head.weight", (v, d)).T}}
  fused = "model.layers.0.mlp.experts.gate_up_proj" in getattr(read, "keys", ())
  for n in range(m.num_layers):
    p = f"model.layers.{n}"
    attention = {name: {"kernel": read(f"{p}.self_attn.{name}.weight", (heads * hd, d))
                        .T.reshape(d, heads, hd)}
                 for name, heads in (("q_proj", h), ("k_proj", kv), ("v_proj", kv))}
    attention["o_proj"] = {"kernel": read(f"{p}.self_attn.o_proj.weight", (d, h * hd))
                           .T.reshape(h, hd, d)}
    if fused:
      router = read(f"{p}.mlp.gate.weight", (e, d))
      gate_up = read(f"{p}.mlp.experts.gate_up_proj", (e, 2 * i, d))  # cat(w1, w3) on dim 1
      gate_up = gate_up.reshape(e, 2, i, d).transpose(0, 3, 1, 2)  # [E, D, 2, I]
      down = read(f"{p}.mlp.experts.down_proj", (e, d, i)).transpose(0, 2, 1)  # [E, I, D]
    else:
      q = f"{p}.block_sparse_moe"
      router = read(f"{q}.gate.weight", (e, d))
      gate_up = np.stack([np.stack([read(f"{q}.experts.{x}.w1.weight", (i, d)).T,
                                    read(f"{q}.experts.{x}.w3.weight", (i, d)).T], axis=1)
                          for x in range(e)])
      down = np.stack([read(f"{q}.experts.{x}.w2.weight", (d, i)).T for x in range(e)])
    params[f"layer_{n}"] = {
        "input_norm": {"scale": read(f"{p}.input_layernorm.weight", (d,))},
        "post_attention_norm": {"scale": read(f"{p}.post_attention_layernorm.weight", (d,))},
        "attention": attention,
        "moe": {"router": {"kernel": router.T}, "experts": {"gate_up": gate_up, "down": down}}}
  if m.scan_layers:
    params = stack_layers(params, m.num_layers)
  return float32_on_host(params)


def float32_on_host(tree: dict) -> dict:
  """Float32 jax arrays on the host CPU (checkpoints hold float32), converted in place.

  jax arrays, as Orbax copies numpy ones whole before writing them; in place, so that each
  tensor's original is dropped as soon as its copy exists and the tree is never held twice.
  """
  cpu = jax.devices("cpu")[0]
  for key, value in tree.items():
    tree[key] = (float32_on_host(value) if isinstance(value, dict)
                 else jax.device_put(np.asarray(value, np.float32), cpu))
  return tree


def import_hf(hf_dir: str, workdir: str,
              base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Writes an HF Mixtral as step-0 checkpoint of `workdir`; returns the training config:
  `base` (e.g. configs/default.py's) with the model's architecture from HF.

  The checkpoint holds parameters only (training starts with a fresh optimizer state), read and
  written a tensor at a time: memory peaks near one float32 copy of the model. Its SentencePiece
  `tokenizer.model`, if any, becomes WORKDIR/tokenizer.model and the config's
  `data.tokenizer_path`, so fine-tuning tokenizes as the model was trained.
  """
  config = base.copy_and_resolve_references()
  config.model = model_config_from_hf(hf_dir, base.model)
  reader = SafetensorsReader(hf_dir)
  return write_step0(config, lambda: params_from_hf(reader, config.model), workdir, hf_dir)


def write_step0(config: ml_collections.ConfigDict, make_params, workdir: str,
                tokenizer_dir: Optional[str] = None) -> ml_collections.ConfigDict:
  """Saves `make_params()` (our parameters for `config`, float32 on the host) as the
  parameters-only step-0 checkpoint of `workdir`; returns `config`, whose data.tokenizer_path
  names WORKDIR/tokenizer.model when `tokenizer_dir` holds a SentencePiece tokenizer.model.
  ConversionError if `workdir` already holds checkpoints (checked before `make_params` runs)."""
  largest = max(x.size * x.dtype.itemsize
                for x in jax.tree.leaves(build_lib.host_abstract_params(config)))
  checkpointer = checkpoint.Checkpointer(workdir, keep=1, save_bytes_in_flight=2 * largest)
  if checkpointer.latest_step() is not None:
    raise ConversionError(f"{checkpointer.directory} already holds checkpoints; use a new workdir")
  params = make_params()
  if tokenizer_dir and os.path.exists(os.path.join(tokenizer_dir, "tokenizer.model")):
    config.data.tokenizer_path = os.path.abspath(WorkDir(workdir).tokenizer)
    shutil.copyfile(os.path.join(tokenizer_dir, "tokenizer.model"), config.data.tokenizer_path)
  checkpointer.save_params(0, params, checkpoint.Meta(json.loads(config.to_json_best_effort()),
                                                      data_position=0))
  checkpointer.close()
  return config
