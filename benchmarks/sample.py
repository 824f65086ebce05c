"""Decode speed: `sample.generate` with its KV cache ÷ recomputing the whole forward for every
new token, and ÷ HF transformers' `generate` (with its cache) on the exported model.

The default config's model (its initial weights scaled ×8 so routing and logits differ
between tokens) with seq_len 512, greedy, 16-token prompts, 256 new tokens, batch 1 and 8, one
CPU device and torch on the same cores. Each timing is the best of 2 runs after a warm-up run
(compilation excluded). Writes its table into benchmarks/README.md.
"""

import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.report import publish  # noqa: E402
from configs import default  # noqa: E402
from mixtral_jax.tools import convert
from mixtral_jax.tools import sample
from mixtral_jax.training import build  # noqa: E402

PROMPT, NEW = 16, 256


def _best(run, rounds=2) -> float:
  run()  # warm-up: compiles
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return min(times)


def _recompute(model, params, prompts, width):
  forward = jax.jit(lambda tokens: model.apply({"params": params}, tokens)[0])

  def run():
    tokens = np.zeros((len(prompts), width), np.int32)
    tokens[:, :PROMPT] = prompts
    for t in range(PROMPT, PROMPT + NEW):  # causal: the zeros after t do not matter
      logits = forward(jnp.asarray(tokens))
      tokens[:, t] = np.asarray(jnp.argmax(logits[:, t - 1], axis=-1))
    return tokens

  return run


def main():
  config = default.get_config()
  config.seq_len = 512
  setup = build.build(build.on_one_device(config), jax.devices()[:1])
  params = jax.tree.map(lambda p: p * 8.0 if p.ndim > 1 else p, setup.state.params)
  torch.set_num_threads(os.cpu_count())
  rows = []
  with tempfile.TemporaryDirectory() as root:
    hf_dir = os.path.join(root, "hf")
    convert.export_hf(params, config.model, hf_dir)
    kwargs = {"experts_implementation": "eager"} if transformers.__version__ >= "5" else {}
    hf = transformers.MixtralForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                         **kwargs).eval()
    for batch in (1, 8):
      prompts = np.random.default_rng(0).integers(3, config.model.vocab_size, (batch, PROMPT))
      cached = _best(lambda: sample.generate(params, config, prompts.tolist(), NEW))
      recomputed = _best(_recompute(setup.model, params, prompts, config.seq_len), rounds=1)

      def hf_generate():
        with torch.no_grad():
          hf.generate(torch.from_numpy(prompts), max_new_tokens=NEW, min_new_tokens=NEW,
                      do_sample=False)

      theirs = _best(hf_generate)
      rows.append((batch, cached, recomputed, theirs))
  tokens = lambda batch, seconds: batch * NEW / seconds
  lines = [f"Default config's model (seq_len 512), greedy, {PROMPT}-token prompts, {NEW} new "
           f"tokens, 1 CPU device, torch on {os.cpu_count()} threads; best of 2 after a "
           "warm-up.", "",
           "| batch | cached tok/s | recompute tok/s | HF generate tok/s | cached ÷ recompute "
           "| cached ÷ HF |", "|---:|---:|---:|---:|---:|---:|"]
  for batch, cached, recomputed, theirs in rows:
    lines.append(f"| {batch} | {tokens(batch, cached):,.0f} | {tokens(batch, recomputed):,.0f} | "
                 f"{tokens(batch, theirs):,.0f} | {recomputed / cached:.1f} | "
                 f"{theirs / cached:.2f} |")
  lines += ["", "Goals: cached ÷ recompute ≥ 10 at 256 new tokens; cached ÷ HF generate ≥ 1.5."]
  publish("sample", lines)


if __name__ == "__main__":
  main()
