"""The pod presets compiled for TPU slices on this machine: per-chip HBM, FLOPs, exchanges, compile time.

Each row runs `mixtral-compile` (the entry users run, over compile-only TPU devices) in a fresh
process and reads its `--save`d report:
- v5p-128 at the preset (configs/mixtral_8x7b.py: seq 4096, 4 sequences per chip, fsdp 16 ×
  expert 4, bf16, remat, scanned layers) in each dispatch: padded and ragged dropless, capacity
  1.0 and 1.25;
- v6e-256 at MaxText's published Mixtral 8x7B setting: 32 sequences of 1024 tokens per chip,
  full remat, FSDP over all 256 chips (also with the experts' width in 8 slices, in capacity
  1.25, at 16 per chip, and as 2 micro-batches of 16);
- compile time with and without `scan_layers` at 4 and 32 layers. The unrolled rows take one
  sequence per chip and compute the loss from full logits, so that no loop is left in the
  program and XLA's FLOP count (which takes a loop body once) covers the whole step: they give
  the compiled ÷ model FLOPs;
- the ~1B MoE preset (configs/moe_1b.py) on v5e-16 and v4-32.

Run: `python benchmarks/pod_compile.py [--no-write] [--only NAME …]` (needs the tpu extra).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.report import publish  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1 << 30


def maxtext_v6e(per_chip: int = 32) -> list[str]:
  """MaxText's Mixtral 8x7B on v6e-256: `per_chip` sequences of 1024 tokens (its published
  setting: 32), FSDP over every chip."""
  return ["--config.seq_len=1024", f"--config.global_batch_size={256 * per_chip}",
          "--config.mesh.fsdp=256", "--config.mesh.expert=1"]


# One sequence per chip: the FLOP ratio does not depend on the batch, and an unrolled 32-layer
# program at the preset's 4 does not fit.
UNROLLED = ["--config.model.scan_layers=False", "--config.model.loss_chunk_tokens=0",
            "--config.global_batch_size=64"]
MIXTRAL, MOE_1B = "configs/mixtral_8x7b.py", "configs/moe_1b.py"
CASES = [  # (name, config file, topology, --config overrides)
    ("dropless padded", MIXTRAL, "v5p-128", []),
    ("dropless ragged", MIXTRAL, "v5p-128", ["--config.model.all_to_all=ragged"]),
    ("capacity 1.0", MIXTRAL, "v5p-128", ["--config.model.dispatch=capacity",
                                          "--config.model.capacity_factor=1.0"]),
    ("capacity 1.25", MIXTRAL, "v5p-128", ["--config.model.dispatch=capacity",
                                           "--config.model.capacity_factor=1.25"]),
    ("MaxText setting, dropless", MIXTRAL, "v6e-256", maxtext_v6e()),
    ("MaxText setting, dropless, width in 8 slices", MIXTRAL, "v6e-256",
     maxtext_v6e() + ["--config.model.expert_mlp_chunks=8"]),
    ("MaxText setting, capacity 1.25", MIXTRAL, "v6e-256",
     maxtext_v6e() + ["--config.model.dispatch=capacity", "--config.model.capacity_factor=1.25"]),
    ("MaxText setting, 16 per chip", MIXTRAL, "v6e-256", maxtext_v6e(16)),
    ("MaxText setting, 2 micro-batches", MIXTRAL, "v6e-256",
     maxtext_v6e() + ["--config.grad_accum_steps=2"]),
    ("scan, 4 layers", MIXTRAL, "v5p-128", ["--config.model.num_layers=4"]),
    ("scan, 4 layers, 1 per chip", MIXTRAL, "v5p-128",
     ["--config.model.num_layers=4", "--config.global_batch_size=64"]),
    ("unrolled, 4 layers", MIXTRAL, "v5p-128", ["--config.model.num_layers=4"] + UNROLLED),
    ("unrolled, 32 layers", MIXTRAL, "v5p-128", UNROLLED),
    ("unrolled, 4 layers, capacity 1.0", MIXTRAL, "v5p-128",
     ["--config.model.num_layers=4", "--config.model.dispatch=capacity",
      "--config.model.capacity_factor=1.0"] + UNROLLED),
    ("moe_1b preset", MOE_1B, "v5e-16", []),
    ("moe_1b preset", MOE_1B, "v4-32", []),
]


def run_case(config: str, topology: str, overrides: list[str], timeout: float) -> dict:
  """mixtral-compile's saved report, or {"error": …}."""
  with tempfile.TemporaryDirectory() as save:
    command = [sys.executable, "-m", "mixtral_jax.cli.compile", f"--config={config}",
               f"--topology={topology}", "--save", save, *overrides]
    try:
      out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
      return {"error": f"did not finish in {timeout:.0f} s"}
    path = os.path.join(save, "report.json")
    if out.returncode not in (0, 3) or not os.path.exists(path):
      lines = [l for l in out.stderr.splitlines() if l.startswith("error:")] or \
          out.stderr.strip().splitlines()[-1:]
      return {"error": f"exit {out.returncode}: {lines[0] if lines else ''}"}
    with open(path) as f:
      return json.load(f)


def _row(name: str, topology: str, r: dict) -> str:
  if "error" in r:
    return f"| {name} | {topology} | — | — | — | {r['error']} | — | — | — |"
  mesh = " × ".join(f"{axis} {size}" for axis, size in r["mesh"].items() if size > 1)
  memory = (f"{r['total'] / GIB:.1f} = {r['parameters'] / GIB:.2f} + "
            f"{r['optimizer_state'] / GIB:.2f} + {(r['temporaries'] or 0) / GIB:.1f}")
  fits = "yes" if r["fits"] else "**no**"
  flops = ("—" if r.get("loops", 1) or "compiled_flops" not in r else
           f"{r['compiled_flops'] / (r['model_flops'] + r['recompute_flops']):.3f}")
  exchange = (f"{r['moe_all_to_all_ratio']:.2f} ({r['moe_all_to_all_bytes'] / 1e9:.1f} GB)"
              if "moe_all_to_all_ratio" in r else "—")
  bound = (f"{r['model_flops'] / r['optimal_seconds'] / 1e12:.0f}"
           if r.get("optimal_seconds") else "—")
  return (f"| {name} | {topology} | {mesh} | {memory} of {r['hbm_per_chip'] / GIB:.0f} "
          f"| {fits} | {flops} | {exchange} | {bound} | {r['compile_seconds']:.0f} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--no-write", action="store_true", help="print only; leave README alone")
  parser.add_argument("--only", nargs="*", help="names of the rows to run")
  parser.add_argument("--timeout", type=float, default=1800, help="seconds per compile")
  args = parser.parse_args()
  lines = ["Mixtral 8x7B (`configs/mixtral_8x7b.py`; the last rows `configs/moe_1b.py`) compiled by XLA:TPU for compile-only "
           "devices on this CPU machine, per chip and step. HBM in GiB: total = parameters + "
           "optimizer state + temporaries, of the chip's capacity. FLOPs: compiled ÷ (model + "
           "remat recompute), from programs with no loop left (see the docstring). All-to-all: "
           "the MoE exchanges' values ÷ the fewest the tokens' k slots need (forward, the "
           "remat recompute and backward), and their bytes; a scanned program's exchanges are "
           "one layer's. TFLOP/s bound: model FLOPs ÷ XLA:TPU's `optimal_seconds` (the "
           "compiler's estimate, not a measurement).", "",
           "| row | slice | mesh | HBM GiB | fits | FLOPs ratio | all-to-all ÷ min | TFLOP/s "
           "bound | compile s |", "|---|---|---|---|---|---:|---:|---:|---:|"]
  seconds = {}
  for name, config, topology, overrides in CASES:
    if args.only and name not in args.only:
      continue
    result = run_case(config, topology, overrides, args.timeout)
    seconds[name] = result.get("compile_seconds")
    lines.append(_row(name, topology, result))
    print(lines[-1], flush=True)
  if seconds.get("dropless padded") and seconds.get("scan, 4 layers"):
    lines += ["", f"Scanned, 32 layers compile in {seconds['dropless padded'] / seconds['scan, 4 layers']:.2f}× "
              f"the time of 4."]
  publish("pod_compile", lines, write=not args.no_write)


if __name__ == "__main__":
  main()
