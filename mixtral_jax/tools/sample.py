"""Sampling with a KV cache: `generate` (`mixtral-sample`, cli/sample.py, is its command line).

One jitted program per setting: the prompt runs through the model once (the prefill fills the
cache), then a `lax.while_loop` takes one step per new token that attends to the cache; a
model with a sliding window keeps a rolling cache of `sliding_window` entries. Prompts of
different lengths share a batch, padded on the left; EOS ends a sample. The model runs on the
config's mesh, experts split over its `expert` axis as in training.
"""

import functools
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from mixtral_jax import config as config_lib
from mixtral_jax.errors import UserError
from mixtral_jax.model import dispatchers
from mixtral_jax.model.mixtral import Mixtral
from mixtral_jax.parallel import sharding
from mixtral_jax.training import build as build_lib


class SampleError(UserError, ValueError):
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


def _pad_batch(prompts: Sequence[Sequence[int]], shards: int) -> list[Sequence[int]]:
  """Prompts repeated from the first to a multiple of `shards` rows (the batch's split)."""
  return list(prompts) + [prompts[0]] * (-len(prompts) % shards)


@functools.lru_cache(maxsize=16)
def _decoder(prefill_config: ml_collections.FrozenConfigDict,
             step_config: ml_collections.FrozenConfigDict, mesh: Optional[Mesh],
             cache_size: int, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
             eos_id: int):
  """A jitted (params, tokens, positions, key) → new tokens [B, max_new_tokens] (-1 after a
  row's EOS): the prefill, then a `lax.while_loop` of one cached step per token that stops
  once every row has drawn EOS. Built once per setting, so repeated calls do not recompile."""
  model, step_model = Mixtral(prefill_config, mesh), Mixtral(step_config, mesh)
  choose = lambda logits, key: next_tokens(logits[:, -1], key, temperature, top_k, top_p)

  def run(params, tokens, positions, key):
    keys = jax.random.split(key, max_new_tokens)
    padding = (positions < 0).astype(jnp.int32)  # its own segment: the prompt never sees it
    (logits, _), cache = model.apply({"params": params}, tokens, positions, padding,
                                     padding == 0, cache_size=cache_size, mutable=["cache"])
    token = choose(logits, keys[0])  # [B]
    done = token == eos_id
    out = jnp.full((tokens.shape[0], max_new_tokens), -1, jnp.int32)
    out = out.at[:, 0].set(jnp.where(done, -1, token))
    next_position = positions[:, -1] + 1  # [B]: where the first new token sits

    def more(carry):
      i, _, _, _, done = carry
      return (i < max_new_tokens) & ~jnp.all(done)

    def step(carry):
      i, token, cache, out, done = carry
      (logits, _), cache = step_model.apply(
          {"params": params, "cache": cache}, token[:, None], (next_position + i - 1)[:, None],
          jnp.zeros_like(token[:, None]), cache_size=cache_size, mutable=["cache"])
      token = choose(logits, keys[i]).astype(jnp.int32)
      done = done | (token == eos_id)
      return i + 1, token, cache["cache"], out.at[:, i].set(jnp.where(done, -1, token)), done

    carry = (jnp.int32(1), token.astype(jnp.int32), cache["cache"], out, done)
    return jax.lax.while_loop(more, step, carry)[3]

  return jax.jit(run)


def generate(params, config: ml_collections.ConfigDict, prompts: Sequence[Sequence[int]],
             max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, eos_id: Optional[int] = None,
             mesh: Optional[Mesh] = None) -> list[list[int]]:
  """The new tokens after each prompt (token ids), up to `max_new_tokens` or before `eos_id`.

  `params` and `config` as training saved them (build.restore_params). With `mesh` (see
  `place`) the model runs as in training: rows over the batch axes, experts over `expert`.
  SampleError for an invalid setting.
  """
  _check(prompts, max_new_tokens, temperature, top_k, top_p, config.seq_len)
  platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
  shards = 1 if mesh is None else math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
  rows = _pad_batch(prompts, shards)
  lengths = np.array([len(p) for p in rows])
  width = int(lengths.max())
  prefill_config, step_config = dispatchers.sampling_configs(
      config_lib.model_config(config.model, platform), len(rows))
  window = prefill_config.sliding_window
  cache_size = min(width + max_new_tokens, window) if window else width + max_new_tokens
  decode = _decoder(prefill_config, step_config, mesh,
                    cache_size, max_new_tokens, float(temperature), int(top_k), float(top_p),
                    -1 if eos_id is None else int(eos_id))
  tokens = np.zeros((len(rows), width), np.int32)
  for row, prompt in enumerate(rows):
    tokens[row, width - len(prompt):] = prompt
  positions = (np.arange(width)[None, :] - (width - lengths)[:, None]).astype(np.int32)
  if mesh is not None:
    tokens, positions = jax.device_put((tokens, positions), sharding.batch_sharding(mesh))
  drawn = np.asarray(decode(params, tokens, positions, jax.random.PRNGKey(seed)))
  return [row[:np.argmax(row < 0)].tolist() if (row < 0).any() else row.tolist()
          for row in drawn[:len(prompts)]]


def place(params, config: ml_collections.ConfigDict,
          devices: Optional[Sequence[jax.Device]] = None) -> tuple[Any, Mesh]:
  """(params on `config.mesh` over `devices` (default: all) with training's shardings, the
  mesh), for `generate(..., mesh=)`. config.ConfigError if the mesh does not fit them."""
  setup = build_lib.build(config, devices, abstract=True)
  return jax.device_put(params, setup.state_sharding.params), setup.mesh
