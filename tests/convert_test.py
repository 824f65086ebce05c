"""Export to HF transformers: logits of transformers' MixtralForCausalLM equal ours."""

import inspect
import json
import json.decoder
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece
import torch
import transformers
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from mixtral_jax.training import build
from mixtral_jax.training import checkpoint
from configs import default
from mixtral_jax.cli import convert as convert_cli
from mixtral_jax.tools import convert
from mixtral_jax.tools import sample
from mixtral_jax.training import loop as train


@pytest.fixture
def tiny_trained_params(tiny_config, build_on_one_device):
  """tiny_trained_params(**model_overrides) → (config, model, params) of a 3-layer, 8-expert
  model, its initial weights scaled up to stand in for trained ones."""
  def make(**model_overrides):
    config = tiny_config()
    config.model.update(num_layers=3, num_experts=8, **model_overrides)
    setup = build_on_one_device(config)
    # Larger than the 0.02 init so routing and logits differ clearly between tokens.
    params = jax.tree.map(lambda p: p * 8.0 if p.ndim > 1 else p, setup.state.params)
    return config, setup.model, params
  return make


def load_hf(path):
  """transformers' model from `path`, checking that every key matched."""
  kwargs = {"experts_implementation": "eager"} if transformers.__version__ >= "5" else {}
  model, info = transformers.MixtralForCausalLM.from_pretrained(
      path, dtype=torch.float32, output_loading_info=True, **kwargs)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  return model


@pytest.mark.parametrize("sliding_window", [0, 5])
def test_hf_logits_match_ours(tmp_path, tiny_trained_params, sliding_window):
  config, model, params = tiny_trained_params(sliding_window=sliding_window)
  out = tmp_path / "hf"
  convert.export_hf(params, config.model, str(out))
  hf = load_hf(str(out)).eval()

  # Rows of 12, 7 and 3 real tokens, right-padded; HF gets the attention mask.
  tokens = np.array(jax.random.randint(jax.random.PRNGKey(3), (3, 12), 0, 320))
  mask = (np.arange(12) < np.array([[12], [7], [3]])).astype(np.int64)
  tokens = tokens * mask
  ours, _ = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens),
                                 token_mask=jnp.asarray(mask))
  with torch.no_grad():
    theirs = hf(torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask)).logits.numpy()
  assert np.abs(np.asarray(ours)).max() > 1.0
  valid = mask.astype(bool)
  np.testing.assert_allclose(theirs[valid], np.asarray(ours)[valid], atol=1e-4, rtol=0)


def test_export_is_sharded_above_threshold_and_atomic(tmp_path, tiny_trained_params):
  config, model, params = tiny_trained_params()
  out = tmp_path / "sharded"
  convert.export_hf(params, config.model, str(out), max_shard_bytes=100_000)
  index = json.load(open(out / "model.safetensors.index.json"))
  assert len(set(index["weight_map"].values())) > 1
  tokens = np.arange(10)[None]
  with torch.no_grad():
    sharded = load_hf(str(out))(torch.from_numpy(tokens)).logits.numpy()
  ours, _ = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens))
  np.testing.assert_allclose(sharded, ours, atol=1e-4, rtol=0)
  with pytest.raises(FileExistsError, match="already exists"):
    convert.export_hf(params, config.model, str(out))
  assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp-export-")] == []


def test_cli_exports_expert_parallel_checkpoint_like_one_device(tmp_path, tiny_config):
  config = tiny_config(num_train_steps=2)
  config.model.num_experts = 8
  config.mesh.update(data=1, expert=8)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  assert convert_cli.main(["to-hf", "--workdir", workdir, "--out", str(tmp_path / "a")]) == 0
  # The same checkpoint restored onto the 8-device expert-parallel mesh, exported from there.
  state, _ = build.build(config, abstract=True).restore(checkpoint.Checkpointer(workdir))
  assert len(state.params["layer_0"]["moe"]["experts"]["down"].addressable_shards) == 8
  convert.export_hf(state.params, config.model, str(tmp_path / "b"))
  for name in ("model.safetensors", "config.json"):
    assert open(tmp_path / "a" / name, "rb").read() == open(tmp_path / "b" / name, "rb").read()

  # The exported tokenizer loads with AutoTokenizer and tokenizes exactly like ours.
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "a"))
  ours = sentencepiece.SentencePieceProcessor(model_file=os.path.join(workdir, "tokenizer.model"))
  text = inspect.getsource(json.decoder) + "\tx  =  'café ☃'\n\n"
  ids = hf_tokenizer.encode(text, add_special_tokens=False)
  assert ids == ours.encode(text)
  assert hf_tokenizer.decode(ids) == text


def test_hf_aux_loss_and_greedy_generation_match_ours(tmp_path, tiny_trained_params):
  config, model, params = tiny_trained_params()
  convert.export_hf(params, config.model, str(tmp_path / "hf"))
  hf = load_hf(str(tmp_path / "hf")).eval()
  apply = jax.jit(model.apply)

  tokens = np.array(jax.random.randint(jax.random.PRNGKey(4), (2, 16), 0, 320))
  _, stats = apply({"params": params}, jnp.asarray(tokens))
  with torch.no_grad():
    out = hf(torch.from_numpy(tokens), output_router_logits=True)
  k, e = config.model.experts_per_token, config.model.num_experts
  # The loss we train on is the mean over layers of each layer's Switch loss (each layer's
  # experts balanced on their own): transformers' loss applied to one layer at a time.
  per_layer = [load_balancing_loss_func((logits,), e, k).item() for logits in out.router_logits]
  np.testing.assert_allclose(np.mean(stats.aux_loss), np.mean(per_layer), rtol=1e-5)
  # transformers' own aux_loss pools all layers' tokens before E · Σ f·P; our per-layer
  # statistics give that too.
  pooled = e * np.sum(k * np.mean(stats.expert_load, 0) * np.mean(stats.mean_probability, 0))
  np.testing.assert_allclose(out.aux_loss.item(), pooled, rtol=1e-5)
  assert abs(np.mean(per_layer) - out.aux_loss.item()) > 1e-3  # the two definitions differ

  prompt, new = [5, 17, 42, 7], 20
  buffer = np.zeros((1, len(prompt) + new), np.int32)
  buffer[0, :len(prompt)] = prompt
  for t in range(len(prompt), len(prompt) + new):  # causal: the zeros after t don't matter
    logits, _ = apply({"params": params}, jnp.asarray(buffer))
    buffer[0, t] = int(jnp.argmax(logits[0, t - 1]))
  with torch.no_grad():
    hf_out = hf.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False)
  assert hf_out[0].tolist() == buffer[0].tolist()
  # mixtral-sample's decoding with the KV cache gives the same 20 tokens.
  assert sample.generate(params, config, [prompt], new) == [hf_out[0, len(prompt):].tolist()]


def hf_tiny(path, fused=False):
  """A random transformers Mixtral saved to `path` (legacy per-expert or fused v5 layout)."""
  torch.manual_seed(0)
  config = transformers.MixtralConfig(
      vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, rope_theta=1e4)
  model = transformers.MixtralForCausalLM(config)
  kwargs = {"save_original_format": False} if fused else {}
  model.save_pretrained(path, **kwargs)
  return model


def tensors(path):
  reader = convert.SafetensorsReader(str(path))
  return {key: reader._file("model.safetensors").get_tensor(key) for key in reader.keys}


def test_hf_round_trips_are_bit_identical(tmp_path, tiny_trained_params):
  hf_tiny(tmp_path / "hf")
  convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "run"), default.get_config())
  params, config = build.restore_params(str(tmp_path / "run"))
  convert.export_hf(params, config.model, str(tmp_path / "back"))
  original, back = tensors(tmp_path / "hf"), tensors(tmp_path / "back")
  assert original.keys() == back.keys()
  for key in original:
    np.testing.assert_array_equal(back[key], original[key], err_msg=key)

  # The fused v5 layout imports to the same parameters.
  hf_tiny(tmp_path / "hf5", fused=True)
  convert.import_hf(str(tmp_path / "hf5"), str(tmp_path / "run5"), default.get_config())
  jax.tree.map(np.testing.assert_array_equal,
               build.restore_params(str(tmp_path / "run5"))[0], params)

  # ours → HF → ours.
  config, _, ours = tiny_trained_params()
  convert.export_hf(ours, config.model, str(tmp_path / "ours_hf"))
  convert.import_hf(str(tmp_path / "ours_hf"), str(tmp_path / "ours_again"),
                    default.get_config())
  jax.tree.map(np.testing.assert_array_equal,
               build.restore_params(str(tmp_path / "ours_again"))[0], ours)


def test_bad_hf_directories_give_one_line_errors(tmp_path, capsys):
  hf_tiny(tmp_path / "hf")
  cases = {}
  not_mixtral = tmp_path / "llama"
  not_mixtral.mkdir()
  (not_mixtral / "config.json").write_text(json.dumps({"model_type": "llama"}))
  cases[not_mixtral] = "model_type is 'llama', not 'mixtral'"

  wrong_experts = tmp_path / "wrong_experts"
  wrong_experts.mkdir()
  hf_config = json.load(open(tmp_path / "hf" / "config.json"))
  (wrong_experts / "config.json").write_text(json.dumps(dict(hf_config, num_local_experts=6)))
  os.link(tmp_path / "hf" / "model.safetensors", wrong_experts / "model.safetensors")
  cases[wrong_experts] = "block_sparse_moe.gate.weight has shape (4, 16), expected (6, 16)"

  missing_field = tmp_path / "missing_field"
  missing_field.mkdir()
  (missing_field / "config.json").write_text(json.dumps(
      {k: v for k, v in hf_config.items() if k != "num_local_experts"}))
  cases[missing_field] = "no 'num_local_experts' field, which a Mixtral config has"

  missing_shard = tmp_path / "missing_shard"
  missing_shard.mkdir()
  (missing_shard / "config.json").write_text(json.dumps(hf_config))
  (missing_shard / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
  cases[missing_shard] = "shard model-00002-of-00002.safetensors named in"

  capsys.readouterr()  # drop save_pretrained's progress output
  for path, message in cases.items():
    workdir = tmp_path / f"run_{path.name}"
    assert convert_cli.main(["from-hf", "--hf", str(path), "--workdir", str(workdir)]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error, error
    assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")


@pytest.mark.slow  # fast: the CLI round trips
def test_training_resumes_from_an_imported_hf_model(tmp_path, tiny_config):
  # Our export (with its tokenizer) stands in for a released HF model of the same vocabulary.
  config = tiny_config(num_train_steps=8)
  train.train_and_evaluate(config, str(tmp_path / "pretrain"))
  assert convert_cli.main(["to-hf", "--workdir", str(tmp_path / "pretrain"),
                       "--out", str(tmp_path / "hf")]) == 0
  imported = convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "finetune"),
                               default.get_config())
  assert imported.data.tokenizer_path == str(tmp_path / "finetune" / "tokenizer.model")

  config.model = imported.model
  config.data.tokenizer_path = imported.data.tokenizer_path
  config.num_train_steps = 4
  summary = train.train_and_evaluate(config, str(tmp_path / "finetune"))
  records = [json.loads(line) for line in open(tmp_path / "finetune" / "metrics.jsonl")]
  assert records[0]["step"] == 1 and records[-1]["step"] == 4
  pretrained = [json.loads(line) for line in open(tmp_path / "pretrain" / "metrics.jsonl")]
  # Step 1 of the fine-tune starts from the pretrained weights, not from a fresh init.
  assert records[0]["ce_loss"] < pretrained[0]["ce_loss"]
  assert np.isfinite(summary["final_loss"])


def test_an_imported_model_resumes_as_a_fresh_state_around_its_params(tmp_path):
  hf_tiny(tmp_path / "hf")
  workdir = str(tmp_path / "run")
  config = convert.import_hf(str(tmp_path / "hf"), workdir, default.get_config())
  items = os.listdir(tmp_path / "run" / "checkpoints" / "0")
  assert "params" in items and "train" not in items  # no optimizer state written
  config.global_batch_size = 1  # one device
  state, meta = build.build(config, jax.devices()[:1], abstract=True).restore(
      checkpoint.Checkpointer(workdir))
  assert meta.data_position == 0 and meta.data_state is None
  params, _ = build.restore_params(workdir)
  jax.tree.map(np.testing.assert_array_equal, state.params, params)
  # Step, AdamW state (zeros whatever the params), RNG and NaN streak are those a fresh run
  # starts with.
  fresh = build.build(config, jax.devices()[:1]).state
  jax.tree.map(np.testing.assert_array_equal, state.replace(params=None),
               fresh.replace(params=None))
  assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(state.opt_state))
  with pytest.raises(checkpoint.CheckpointError, match="holds parameters only"):
    checkpoint.Checkpointer(workdir).restore(fresh)


def test_failed_export_leaves_nothing_at_out(tmp_path, tiny_trained_params, monkeypatch):
  config, _, params = tiny_trained_params()

  real_tensors = convert.hf_tensors

  def failing_tensors(params, model_config):
    yield from list(real_tensors(params, model_config))[:5]
    raise OSError("disk full")

  monkeypatch.setattr(convert, "hf_tensors", failing_tensors)
  with pytest.raises(OSError, match="disk full"):
    convert.export_hf(params, config.model, str(tmp_path / "out"), max_shard_bytes=1000)
  assert not (tmp_path / "out").exists()
  assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp-export-")] == []


# 38M parameters (150 MB in float32) saved with their AdamW state, which is twice that again.
_SAVE_WITH_OPTIMIZER_STATE = """
import json, sys
import jax
from configs import default
from mixtral_jax.training import build
from mixtral_jax.training import checkpoint
config = default.get_config()
config.model.update(hidden_size=384, intermediate_size=384, num_layers=8, num_heads=6,
                    head_dim=64)
state = build.build(config).state
checkpointer = checkpoint.Checkpointer(sys.argv[1])
checkpointer.save(1, state, checkpoint.Meta(json.loads(config.to_json_best_effort()), 1))
checkpointer.close()
print(sum(x.nbytes for x in jax.tree.leaves(state.params)))
"""

# Peak RSS of `mixtral-convert ARGS` above the RSS just before it (imports and JAX's backend done).
_PEAK_INCREASE = """
import resource, sys
import jax
from mixtral_jax.cli import convert as convert_cli
jax.devices()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert convert_cli.main(sys.argv[1:]) == 0
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


@pytest.mark.slow  # a memory check
def test_conversions_hold_about_one_copy_of_the_parameters(tmp_path, repo):
  # glibc keeps freed buffers under 32 MB (every tensor of this model) cached in its arenas,
  # which RSS would count; a real model's tensors are larger, so mapped and unmapped. A fixed
  # mmap threshold makes this small model's buffers behave the same.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", MALLOC_MMAP_THRESHOLD_="65536")

  def run(script, *args):
    result = subprocess.run([sys.executable, "-c", script, *args], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split()[-1])

  workdir, hf, shard_bytes = str(tmp_path / "run"), str(tmp_path / "hf"), 16 << 20
  params_bytes = run(_SAVE_WITH_OPTIMIZER_STATE, workdir)
  exported = run(_PEAK_INCREASE, "to-hf", "--workdir", workdir, "--out", hf,
                 "--max_shard_bytes", str(shard_bytes))
  imported = run(_PEAK_INCREASE, "from-hf", "--hf", hf, "--workdir", str(tmp_path / "imported"))
  # The whole train state alone would be 3x the parameters.
  assert exported < 1.5 * params_bytes + shard_bytes, (exported, params_bytes)
  assert imported < 1.5 * params_bytes, (imported, params_bytes)
