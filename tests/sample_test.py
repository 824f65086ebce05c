"""Sampling with the KV cache: greedy equals recomputing the whole forward at every step."""

import subprocess

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax import config as config_lib
from mixtral_jax.model.mixtral import Mixtral
from mixtral_jax.tools import sample


def _model_and_params(config):
  model = Mixtral(config_lib.model_config(config.model, "cpu"))
  params = nn.unbox(model.init(jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32))["params"])
  return model, params


def _greedy_by_recomputing(model, params, prompt, steps, width=32):
  # The whole forward over the tokens so far, at every step; right-padded to one width (a
  # causal model's logits at position t do not depend on what follows), compiled once.
  forward = jax.jit(lambda tokens: model.apply({"params": params}, tokens)[0][0])
  tokens = list(prompt)
  for _ in range(steps):
    logits = forward(jnp.asarray([tokens + [0] * (width - len(tokens))]))
    tokens.append(int(jnp.argmax(logits[len(tokens) - 1])))
  return tokens[len(prompt):]


@pytest.mark.parametrize("window, scan", [(0, False), (6, False), (6, True)])
def test_greedy_with_the_cache_equals_recomputing_every_step(tiny_config, window, scan):
  config = tiny_config(seq_len=64)
  config.model.update(sliding_window=window, scan_layers=scan)
  model, params = _model_and_params(config)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 320, size=n).tolist() for n in (11, 4, 1)]  # longer than the window
  got = sample.generate(params, config, prompts, 12)
  for prompt, tokens in zip(prompts, got):
    assert tokens == _greedy_by_recomputing(model, params, prompt, 12)


@pytest.mark.parametrize("mesh", [dict(data=-1, fsdp=2, expert=2, tensor=1),
                                  dict(data=1, fsdp=1, expert=4, tensor=2)])
def test_sampling_on_the_configs_mesh_equals_one_device(tiny_config, mesh):
  config = tiny_config(seq_len=64)
  _, params = _model_and_params(config)
  prompts = [[5, 6, 7, 8, 9], [9, 10], [11]]  # 3 rows: padded to the batch's split
  one_device = sample.generate(params, config, prompts, 10)
  config.mesh.update(mesh)
  placed, on_mesh = sample.place(params, config, jax.devices()[:8])
  assert on_mesh.shape["expert"] == mesh["expert"]
  experts = placed["layer_0"]["moe"]["experts"]["gate_up"]
  assert experts.sharding.shard_shape(experts.shape)[0] == 4 // mesh["expert"]
  assert sample.generate(placed, config, prompts, 10, mesh=on_mesh) == one_device
  assert sample.generate(placed, config, prompts, 10, temperature=1.0, seed=2,
                         mesh=on_mesh) == sample.generate(params, config, prompts, 10,
                                                          temperature=1.0, seed=2)


def test_sampling_is_reproducible_and_its_limits_are_greedy(tiny_config):
  config = tiny_config(seq_len=64)
  _, params = _model_and_params(config)
  prompts = [[5, 6, 7, 8], [9, 10]]
  greedy = sample.generate(params, config, prompts, 10)
  draw = lambda **kw: sample.generate(params, config, prompts, 10, **kw)
  assert draw(temperature=1.0, seed=3) == draw(temperature=1.0, seed=3)
  assert draw(temperature=1.0, seed=3) != draw(temperature=1.0, seed=4)
  assert draw(temperature=1.0, top_k=1, seed=3) == greedy
  assert draw(temperature=0.7, top_p=1e-6, seed=3) == greedy  # only the likeliest survives
  assert draw(temperature=0.0, top_k=40, top_p=0.9, seed=3) == greedy
  first = greedy[0][0]
  stopped = sample.generate(params, config, prompts, 10, eos_id=first)
  assert stopped[0] == [] and len(stopped[1]) <= 10


@pytest.mark.parametrize("kwargs, message", [
    ({"prompts": [[1, 2], []]}, "a prompt is empty"),
    ({"top_p": 0.0}, "--top_p=0.0: must be in (0, 1]"),
    ({"top_p": 1.5}, "--top_p=1.5: must be in (0, 1]"),
    ({"max_new_tokens": 70}, "--max_new_tokens=70: the longest prompt (2 tokens) plus the new "
                             "tokens exceed the model's context of 64 (config.seq_len)"),
])
def test_bad_settings_are_one_line(tiny_config, kwargs, message):
  config = tiny_config(seq_len=64)
  _, params = _model_and_params(config)
  args = {"prompts": [[1, 2]], "max_new_tokens": 4, **kwargs}
  with pytest.raises(sample.SampleError) as error:
    sample.generate(params, config, args.pop("prompts"), args.pop("max_new_tokens"), **args)
  assert str(error.value).startswith(message)


@pytest.mark.parametrize("window", [0, 5])
def test_cached_logits_equal_the_full_forward_for_left_padded_rows(tiny_config, window):
  config = tiny_config(seq_len=64)
  config.model.update(sliding_window=window)
  model, params = _model_and_params(config)
  prompts, width, new = [[7, 8, 9, 10, 11, 12, 13, 14, 15], [20, 21, 22]], 9, 6
  cache_size = min(width + new, window) if window else width + new
  tokens = np.zeros((2, width), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, width - len(prompt):] = prompt
  lengths = np.array([len(p) for p in prompts])
  positions = np.arange(width)[None] - (width - lengths)[:, None]
  padding = (positions < 0).astype(np.int32)
  (logits, _), cache = model.apply({"params": params}, tokens, positions, padding, padding == 0,
                                   cache_size=cache_size, mutable=["cache"])
  forward = jax.jit(lambda t: model.apply({"params": params}, t)[0][0])
  sequences = [list(p) for p in prompts]
  last = logits[:, -1]
  for i in range(new):
    for row, seq in enumerate(sequences):
      full = forward(jnp.asarray([seq + [0] * (32 - len(seq))]))[len(seq) - 1]
      np.testing.assert_allclose(last[row], full, rtol=2e-4, atol=2e-4)
    token = jnp.asarray([3 + 17 * i, 5 + 11 * i], jnp.int32)  # any tokens; both rows the same way
    for row, seq in enumerate(sequences):
      seq.append(int(token[row]))
    (logits, _), cache = model.apply({"params": params, **cache}, token[:, None],
                                     jnp.asarray(lengths + i)[:, None], jnp.zeros((2, 1), int),
                                     cache_size=cache_size, mutable=["cache"])
    last = logits[:, -1]


def test_mixtral_sample_continues_a_prompt_from_a_checkpoint(tmp_path, train_command, repo):
  workdir = str(tmp_path / "run")
  args, env = train_command(workdir, 4)
  subprocess.run(args, cwd=repo, env=env, check=True, capture_output=True, timeout=300)
  command = [args[0], "-m", "mixtral_jax.cli.sample", f"--workdir={workdir}"]
  run = lambda *flags: subprocess.run(command + list(flags), cwd=repo, env=env,
                                      capture_output=True, text=True, timeout=300)
  greedy = run("--prompt=def f(x):", "--prompt=return", "--max_new_tokens=8",
               "--temperature=0")
  assert greedy.returncode == 0, greedy.stderr[-2000:]
  texts = greedy.stdout.split("-" * 40 + "\n")[:-1]
  assert len(texts) == 2 and texts[0].startswith("def f(x):") and texts[1].startswith("return")
  assert run("--prompt=def f(x):", "--prompt=return", "--max_new_tokens=8", "--temperature=0",
             "--top_k=5", "--one_device").stdout == greedy.stdout  # nor do top_k and the mesh
  for flags, message in (
      (["--prompt="], "error: a prompt is empty; give at least one token of text"),
      (["--prompt=x", "--top_p=0"], "error: --top_p=0.0: must be in (0, 1]"),
      (["--prompt=x", "--max_new_tokens=40"], "error: --max_new_tokens=40: the longest prompt"),
      ([f"--workdir={tmp_path}", "--prompt=x"], f"error: {tmp_path}/checkpoints: no checkpoints "
                                                "directory")):
    result = run(*flags)
    assert result.returncode == 1 and result.stderr.strip().startswith(message), result.stderr
