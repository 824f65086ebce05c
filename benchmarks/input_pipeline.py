"""Input pipeline batches/s ÷ train steps/s on the default config: is data ever the bottleneck?

The pipeline is measured alone, from a fresh iterator (so the first documents of every stream
are tokenized inside the timing) through packing to global device arrays; the train step is the
default config's jitted step on the same batches. Rounds of each alternate in one process.
Writes its table into benchmarks/README.md.
"""

import os
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.report import publish  # noqa: E402
from configs import default  # noqa: E402
from mixtral_jax.data import pipeline as data_lib  # noqa: E402
from mixtral_jax.data import processes  # noqa: E402
from mixtral_jax.runtime import cpu_runtime  # noqa: E402
from mixtral_jax.training import build as build_lib  # noqa: E402

ROUNDS = 3
PIPELINE_BATCHES = 200
TRAIN_STEPS = 5


def main():
  cpu_runtime.reuse_step_memory()  # as mixtral-train does
  config = default.get_config()
  setup = build_lib.build(config)
  step, state = setup.train_step, setup.state
  layout = processes.ProcessRows(setup.batch_sharding, config.global_batch_size)
  data = data_lib.make_data(config, layout.rows)
  batches = data.train_iterator()
  for _ in range(2):  # compile
    state, metrics = step(state, layout.global_batch(next(batches)))
  jax.block_until_ready(metrics)

  pipeline, steps = [], []
  for _ in range(ROUNDS):
    start = time.perf_counter()
    fresh = data.train_iterator()
    for _ in range(PIPELINE_BATCHES):
      jax.block_until_ready(layout.global_batch(next(fresh)))
    pipeline.append(PIPELINE_BATCHES / (time.perf_counter() - start))
    start = time.perf_counter()
    for _ in range(TRAIN_STEPS):
      state, metrics = step(state, layout.global_batch(next(batches)))
    jax.block_until_ready(metrics)  # the loop reads metrics at log steps only
    steps.append(TRAIN_STEPS / (time.perf_counter() - start))

  batches_per_s, steps_per_s = statistics.median(pipeline), statistics.median(steps)
  tokens = config.global_batch_size * config.seq_len
  lines = [f"Default config (batch {config.global_batch_size}×{config.seq_len}, "
           f"{config.data.source} corpus, {config.data.num_streams} streams), "
           f"{jax.device_count()} {jax.default_backend()} device(s), median of {ROUNDS} "
           "alternating rounds.", "",
           "| | per second | tokens/s |", "|---|---:|---:|",
           f"| input pipeline alone: batches | {batches_per_s:.1f} | {batches_per_s * tokens:,.0f} |",
           f"| train steps | {steps_per_s:.2f} | {steps_per_s * tokens:,.0f} |",
           "", f"**pipeline ÷ train = {batches_per_s / steps_per_s:.0f}** (goal ≥ 10)"]
  publish("input_pipeline", lines)


if __name__ == "__main__":
  main()
