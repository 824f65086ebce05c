"""The default config's train step as configured ÷ the same with its "auto" choices written out.

`make train` runs `loss_chunk_tokens = -1` (auto: 512 tokens per device on CPU). A step that
read the unresolved config once computed the loss one position at a time (1.35× slower, no
test failing); this times both programs alternating in one process, and compares their
compiled HLO. Goal ≤ 1.05. Writes its table into benchmarks/README.md.
"""

import argparse
import os
import re
import statistics
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.reference import Ours, make_batches  # noqa: E402
from benchmarks.report import publish  # noqa: E402
from configs import default  # noqa: E402
from mixtral_jax.runtime import cpu_runtime  # noqa: E402
from mixtral_jax.runtime import hlo_stats  # noqa: E402


def _program(hlo_text: str) -> str:
  """Compiled HLO without its module name and debug metadata (source lines of the callers)."""
  text = re.sub(r"HloModule \S+", "", hlo_text)
  text = re.sub(r", metadata=\{[^}]*\}", "", text)
  return "\n".join(line for line in text.splitlines()
                   if not re.match(r"\d+ \{(file_name_id|file_location_id)=", line))


class Variant(Ours):
  """One config's train step on its own state, with its compiled program."""

  def __init__(self, config, batch):
    super().__init__(config)
    self.batch = jax.device_put(batch, self.setup.batch_sharding)
    lowered = self.setup.train_step.lower(self.setup.abstract_state,
                                          self.setup.abstract_batch())
    self.hlo = _program(lowered.compile().as_text())
    self.seconds = []
    self.timed_step(self.batch)  # compile, warm up


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--no-write", action="store_true", help="print only; leave README alone")
  args = parser.parse_args()
  cpu_runtime.reuse_step_memory()  # as mixtral-train does

  configured = default.get_config()
  explicit = default.get_config()
  explicit.model.loss_chunk_tokens = 512
  batch = make_batches(1, configured.global_batch_size, configured.seq_len,
                       configured.model.vocab_size)[0]
  variants = {"as configured (`loss_chunk_tokens = -1`, auto)": Variant(configured, batch),
              "`--config.model.loss_chunk_tokens=512`": Variant(explicit, batch)}
  for _ in range(args.rounds):
    for variant in variants.values():
      variant.seconds.append(variant.timed_step(variant.batch))
  (auto_name, auto), (_, fixed) = variants.items()
  medians = {name: statistics.median(v.seconds) for name, v in variants.items()}
  ratio = medians[auto_name] / statistics.median(fixed.seconds)
  same = "identical" if auto.hlo == fixed.hlo else "different"
  loops = [count for _, count in hlo_stats.while_loops(auto.hlo)]
  tokens = configured.global_batch_size * configured.seq_len
  lines = [f"Default config (batch {configured.global_batch_size}×{configured.seq_len}), "
           f"{jax.device_count()} {jax.default_backend()} device, JAX {jax.__version__}; median "
           f"of {args.rounds} alternating steps.", "",
           "| train step | ms | tokens/s |", "|---|---:|---:|"]
  lines += [f"| {name} | {s * 1e3:.0f} | {tokens / s:,.0f} |" for name, s in medians.items()]
  lines += ["", f"**as configured ÷ explicit = {ratio:.3f}** (goal ≤ 1.05); the two compiled "
            f"programs are {same}; while loops and trip counts: "
            f"{', '.join('data-dependent' if n is None else str(n) for n in loops)}."]
  publish("default_step", lines, write=not args.no_write)


if __name__ == "__main__":
  main()
