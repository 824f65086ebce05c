"""Sparse upcycling: a dense HF Mistral/Llama, or one of our dense runs, as step 0 of an MoE."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from configs import default
from mixtral_jax.cli import convert as convert_cli
from mixtral_jax.model.mixtral import Mixtral
from mixtral_jax.tools import convert
from mixtral_jax.tools import upcycle
from mixtral_jax.training import build
from mixtral_jax.training import loop as train


def hf_dense(path, kind: str, **overrides):
  """A tiny random dense HF model (float32), weights scaled up to stand in for trained ones."""
  torch.manual_seed(0)
  common = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4, **overrides)
  if kind == "mistral":
    model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=None,
                                                                       **common))
  else:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim > 1:
        p.mul_(8.0)
  model.eval()
  model.save_pretrained(path)
  return model


def ours(workdir, tokens):
  params, config = build.restore_params(str(workdir))
  model = Mixtral(build.build(build.on_one_device(config), jax.devices("cpu")[:1],
                              abstract=True).model_config)
  logits, _ = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens))
  return np.asarray(logits), config


@pytest.mark.parametrize("kind,tied", [("mistral", False), ("llama", False), ("llama", True)])
def test_upcycled_copies_compute_the_dense_model(tmp_path, kind, tied):
  dense = hf_dense(tmp_path / "hf", kind, tie_word_embeddings=tied)
  config = upcycle.upcycle_hf(str(tmp_path / "hf"), str(tmp_path / "moe"), default.get_config(),
                              upcycle.Upcycling(num_experts=4, experts_per_token=2))
  assert (config.model.num_experts, config.model.experts_per_token) == (4, 2)
  tokens = np.array(jax.random.randint(jax.random.PRNGKey(1), (2, 10), 0, 64))
  logits, saved = ours(tmp_path / "moe", tokens)
  with torch.no_grad():
    theirs = dense(torch.from_numpy(tokens)).logits.numpy()
  assert np.abs(theirs).max() > 1.0
  np.testing.assert_allclose(logits, theirs, atol=1e-4, rtol=0)
  assert saved.model.num_experts == 4


def test_split_experts_are_slices_of_the_dense_mlp(tmp_path):
  hf_dense(tmp_path / "hf", "mistral")
  upcycle.upcycle_hf(str(tmp_path / "hf"), str(tmp_path / "moe"), default.get_config(),
                     upcycle.Upcycling(num_experts=4, experts_per_token=2, method="split"))
  params, config = build.restore_params(str(tmp_path / "moe"))
  assert config.model.intermediate_size == 6
  reader = convert.SafetensorsReader(str(tmp_path / "hf"))
  w1 = reader("model.layers.1.mlp.gate_proj.weight", (24, 16)).T  # [D, I]
  w2 = reader("model.layers.1.mlp.down_proj.weight", (16, 24)).T  # [I, D]
  experts = params["layer_1"]["moe"]["experts"]
  for e in range(4):
    np.testing.assert_array_equal(experts["gate_up"][e, :, 0, :], w1[:, 6 * e:6 * e + 6])
    np.testing.assert_allclose(experts["down"][e], w2[6 * e:6 * e + 6] * 4, rtol=1e-6)


def test_noise_tells_the_copies_apart(tmp_path):
  hf_dense(tmp_path / "hf", "llama")
  upcycle.upcycle_hf(str(tmp_path / "hf"), str(tmp_path / "moe"), default.get_config(),
                     upcycle.Upcycling(num_experts=4, experts_per_token=2, noise=0.01))
  params, _ = build.restore_params(str(tmp_path / "moe"))
  gate_up = np.asarray(params["layer_0"]["moe"]["experts"]["gate_up"])
  relative = np.abs(gate_up[1] / gate_up[0] - 1)
  assert 0 < np.median(relative) < 0.03


@pytest.mark.parametrize("case", ["missing tensor", "mixtral", "rope scaling", "too few experts"])
def test_a_bad_dense_model_is_one_line_and_writes_nothing(tmp_path, capsys, case):
  hf = tmp_path / "hf"
  hf_dense(hf, "llama")
  args = ["from-hf", "--hf", str(hf), "--workdir", str(tmp_path / "moe"), "--upcycle"]
  hf_config = json.loads((hf / "config.json").read_text())
  if case == "missing tensor":
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(hf / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    expected = "model.layers.1.mlp.up_proj.weight is missing"
  elif case == "mixtral":
    hf_config["model_type"] = "mixtral"
    expected = "model_type is 'mixtral'; upcycling reads a dense MistralForCausalLM or "
  elif case == "rope scaling":
    hf_config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    expected = "rope_type=linear is not a Mixtral layer"
  else:
    args += ["--num_experts", "2", "--experts_per_token", "3"]
    expected = "--experts_per_token=3: must be in 1 … --num_experts=2"
  (hf / "config.json").write_text(json.dumps(hf_config))
  capsys.readouterr()
  assert convert_cli.main(args) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
  assert not (tmp_path / "moe").exists()


def test_our_dense_run_upcycles_trains_and_exports(tmp_path, tiny_config, capsys):
  dense = tiny_config(num_train_steps=6)
  dense.model.update(num_experts=1, experts_per_token=1)
  train.train_and_evaluate(dense, str(tmp_path / "dense"))
  capsys.readouterr()
  assert convert_cli.main(["upcycle", "--dense", str(tmp_path / "dense"), "--workdir",
                           str(tmp_path / "moe"), "--num_experts", "4",
                           "--experts_per_token", "2"]) == 0
  assert "--config.model.num_experts=4" in capsys.readouterr().out
  tokens = np.array(jax.random.randint(jax.random.PRNGKey(1), (2, 10), 0, 320))
  dense_params, _ = build.restore_params(str(tmp_path / "dense"))
  dense_logits, _ = Mixtral(build.build(build.on_one_device(dense), jax.devices("cpu")[:1],
                                        abstract=True).model_config).apply(
      {"params": dense_params}, jnp.asarray(tokens))
  moe_logits, moe_config = ours(tmp_path / "moe", tokens)
  np.testing.assert_allclose(moe_logits, dense_logits, atol=1e-4, rtol=0)
  assert moe_config.data.tokenizer_path == str(tmp_path / "moe" / "tokenizer.model")

  # It trains on (its first step's loss is the dense model's, not a fresh init's) …
  config = tiny_config(num_train_steps=4)
  config.model = moe_config.model
  config.data.tokenizer_path = moe_config.data.tokenizer_path
  train.train_and_evaluate(config, str(tmp_path / "moe"))
  records = [json.loads(line) for line in open(tmp_path / "moe" / "metrics.jsonl")]
  dense_records = [json.loads(line) for line in open(tmp_path / "dense" / "metrics.jsonl")]
  assert records[0]["ce_loss"] < dense_records[0]["ce_loss"]
  # … and exports to HF Mixtral, which computes what we do.
  assert convert_cli.main(["to-hf", "--workdir", str(tmp_path / "moe"), "--out",
                           str(tmp_path / "hf")]) == 0
  hf = transformers.MixtralForCausalLM.from_pretrained(
      str(tmp_path / "hf"), dtype=torch.float32, experts_implementation="eager").eval()
  with torch.no_grad():
    theirs = hf(torch.from_numpy(tokens)).logits.numpy()
  trained, _ = ours(tmp_path / "moe", tokens)
  np.testing.assert_allclose(trained, theirs, atol=1e-4, rtol=0)
  assert os.path.exists(tmp_path / "hf" / "tokenizer.model")


def test_upcycling_a_moe_run_is_refused(tmp_path, tiny_config, capsys):
  train.train_and_evaluate(tiny_config(num_train_steps=2), str(tmp_path / "moe"))
  capsys.readouterr()
  assert convert_cli.main(["upcycle", "--dense", str(tmp_path / "moe"), "--workdir",
                           str(tmp_path / "again")]) == 1
  assert "upcycling starts from a dense run (model.num_experts=1)" in capsys.readouterr().err
  assert not (tmp_path / "again").exists()
