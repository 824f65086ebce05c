"""Sampling with a KV cache: `generate` (Python) and `mixtral-sample` (its command line).

    mixtral-sample --workdir=/tmp/run --prompt="def fib(" --max_new_tokens=128 \
        --temperature=0.8 --top_k=40 --top_p=0.95 --seed=0 [--num_samples=4] [--step=N]

The prompt runs through the model once (a jitted prefill that fills the cache), then one
jitted step per new token attends to the cache; a model with a sliding window keeps a rolling
cache of `sliding_window` entries. Prompts of different lengths share a batch, padded on the
left; EOS ends a sample.
"""

import argparse
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from mixtral_jax import build as build_lib
from mixtral_jax import checkpoint as checkpoint_lib
from mixtral_jax import config as config_lib
from mixtral_jax import tokenizer as tokenizer_lib
from mixtral_jax.model import Mixtral


class SampleError(ValueError):
  """A sampling setting or input is invalid; the message names it."""


def _check(prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
           top_k: int, top_p: float, context: int) -> None:
  if not prompts or any(len(p) == 0 for p in prompts):
    raise SampleError("a prompt is empty; give at least one token of text")
  if max_new_tokens < 1:
    raise SampleError(f"--max_new_tokens={max_new_tokens}: must be at least 1")
  if not temperature >= 0:
    raise SampleError(f"--temperature={temperature}: must be >= 0 (0 = greedy)")
  if top_k < 0:
    raise SampleError(f"--top_k={top_k}: must be >= 0 (0 = all tokens)")
  if not 0 < top_p <= 1:
    raise SampleError(f"--top_p={top_p}: must be in (0, 1]")
  longest = max(len(p) for p in prompts)
  if longest + max_new_tokens > context:
    raise SampleError(f"--max_new_tokens={max_new_tokens}: the longest prompt ({longest} tokens) "
                      f"plus the new tokens exceed the model's context of {context} "
                      "(config.seq_len)")


def next_tokens(logits, key, temperature: float, top_k: int, top_p: float):
  """logits [B, V] → tokens [B]: argmax at temperature 0, else a draw from the tempered
  distribution kept to its `top_k` likeliest tokens (0: all) and its top-`top_p` mass."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    before = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1) - jax.nn.softmax(
        sorted_logits, axis=-1)  # mass of the likelier tokens: the first always stays
    sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
    logits = jnp.full_like(logits, -jnp.inf).at[
        jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
  return jax.random.categorical(key, logits, axis=-1)


def generate(params, config: ml_collections.ConfigDict, prompts: Sequence[Sequence[int]],
             max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, eos_id: Optional[int] = None,
             mesh=None) -> list[list[int]]:
  """The new tokens after each prompt (token ids), up to `max_new_tokens` or before `eos_id`.

  `params` and `config` as training saved them (build.restore_params); `mesh` places the
  model as in training (default: one device). SampleError for an invalid setting.
  """
  _check(prompts, max_new_tokens, temperature, top_k, top_p, config.seq_len)
  platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
  lengths = np.array([len(p) for p in prompts])
  width, batch = int(lengths.max()), len(prompts)
  model_config = config_lib.model_config(config.model, platform).as_configdict()
  # A decode step routes batch × k token-slots: blocks of training's size would be mostly
  # padding (the dropless layout pads each expert's group to a whole block).
  model_config.block_size = min(model_config.block_size,
                                max(8, -(-batch * model_config.experts_per_token // 8) * 8))
  model = Mixtral(ml_collections.FrozenConfigDict(model_config), mesh)
  window = model_config.sliding_window
  cache_size = width + max_new_tokens
  if window:
    cache_size = min(cache_size, window)
  tokens = np.zeros((batch, width), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, width - len(prompt):] = prompt
  positions = np.arange(width)[None, :] - (width - lengths)[:, None]  # padding: < 0
  padding = (positions < 0).astype(np.int32)  # its own segment: the prompt never sees it
  choose = lambda logits, key: next_tokens(logits[:, -1], key, temperature, top_k, top_p)

  @jax.jit
  def prefill(params, tokens, positions, padding, key):
    (logits, _), cache = model.apply({"params": params}, tokens, positions, padding,
                                     padding == 0, cache_size=cache_size, mutable=["cache"])
    return choose(logits, key), cache["cache"]

  @jax.jit
  def step(params, cache, token, position, key):
    (logits, _), cache = model.apply({"params": params, "cache": cache}, token[:, None],
                                     position[:, None], jnp.zeros_like(token[:, None]),
                                     cache_size=cache_size, mutable=["cache"])
    return choose(logits, key), cache["cache"]

  keys = jax.random.split(jax.random.PRNGKey(seed), max_new_tokens)
  token, cache = prefill(params, tokens, positions, padding, keys[0])
  out, done = [[] for _ in prompts], np.zeros(batch, bool)
  for i in range(max_new_tokens):
    drawn = np.asarray(token)
    for row in range(batch):
      if not done[row]:
        if eos_id is not None and drawn[row] == eos_id:
          done[row] = True
        else:
          out[row].append(int(drawn[row]))
    if done.all() or i == max_new_tokens - 1:
      break
    token, cache = step(params, cache, token.astype(jnp.int32),
                        jnp.asarray(lengths + i, jnp.int32), keys[i + 1])
  return out


def main(argv: Optional[list[str]] = None) -> None:
  """Console-script entry point (`mixtral-sample`)."""
  parser = argparse.ArgumentParser(prog="mixtral-sample", description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a training workdir with a checkpoint")
  parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
  parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
  parser.add_argument("--prompt_file", help="a file whose whole text is one more prompt")
  parser.add_argument("--max_new_tokens", type=int, default=128)
  parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
  parser.add_argument("--top_k", type=int, default=40, help="0 = all tokens")
  parser.add_argument("--top_p", type=float, default=0.95)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num_samples", type=int, default=1, help="samples per prompt")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.ERROR)  # Orbax's notes on a read-only checkpoint manager
  try:
    texts = list(args.prompt)
    if args.prompt_file:
      with open(args.prompt_file) as f:
        texts.append(f.read())
    if not texts:
      raise SampleError("give --prompt=TEXT (or --prompt_file=FILE)")
    if args.num_samples < 1:
      raise SampleError(f"--num_samples={args.num_samples}: must be at least 1")
    params, config = build_lib.restore_params(args.workdir, args.step)
    tokenizer = tokenizer_lib.load_tokenizer(f"{args.workdir}/tokenizer.model")
    prompts = [tokenizer.encode(t) for t in texts for _ in range(args.num_samples)]
    samples = generate(params, config, prompts, args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       seed=args.seed, eos_id=tokenizer.eos_id())
  except (SampleError, checkpoint_lib.CheckpointError, OSError) as e:
    sys.exit(f"error: {e}")
  for prompt, sample in zip(prompts, samples):
    print(tokenizer.decode(prompt + sample))
    print("-" * 40)


if __name__ == "__main__":
  main()
