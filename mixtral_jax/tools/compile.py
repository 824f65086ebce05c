"""`mixtral-compile`: prove a pod-scale run compiles and fits before renting the pod.

    mixtral-compile --config=configs/mixtral_8x7b.py --topology=v5p-128 [--config.x=y …]
        [--save DIR]

Builds the program `mixtral-train` would run on that TPU slice (the same `build`: mesh rules,
jit, dispatch), abstractly, over compile-only TPU devices that libtpu provides on any machine
(`pip install -e ".[tpu]"`), compiles it with XLA:TPU and prints per chip: HBM (parameters,
optimizer state, temporaries, total against the chip's capacity: "fits" or "does not fit"),
compiled FLOPs against the model's, collective bytes by kind, the MoE all-to-all bytes against
their minimum, XLA's own lower bound on the step time, and the compile time. Nothing runs.

Exit codes: 0 fits; 3 does not fit (the numbers say by how much); 1 an error in one line (a bad
config, an unknown topology); 2 a bad command line.
"""

import dataclasses
import math
import re
import time
from typing import Any, Optional

import jax

from mixtral_jax.errors import UserError
from mixtral_jax.model.mixtral import count_params
from mixtral_jax.runtime import hlo_stats
from mixtral_jax.training import build as build_lib

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Topology:
  jax_name: str  # jax.experimental.topologies' name, e.g. "v5p:4x4x4"
  chips: int
  hbm_gib: float  # per chip


def _slices(kind: str, hbm_gib: float, shapes: dict[int, str], per_chip: int = 1):
  """Cloud TPU names ("v5p-128": the number counts TensorCores on v4/v5p, chips on v5e/v6e)."""
  return {f"{kind}-{count}": Topology(f"{kind}:{shape}", count // per_chip, hbm_gib)
          for count, shape in shapes.items()}


_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_3D = {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8",
       512: "4x8x8"}
TOPOLOGIES = {**_slices("v4", 32, _3D, per_chip=2), **_slices("v5e", 16, _2D),
              **_slices("v5p", 95, _3D, per_chip=2), **_slices("v6e", 32, _2D)}


class CompileError(UserError, RuntimeError):
  """The topology or config cannot be compiled (one line)."""


def topology_devices(name: str) -> list:
  """The compile-only TPU devices of slice `name` (a key of TOPOLOGIES)."""
  from jax.experimental import topologies
  if name not in TOPOLOGIES:
    raise CompileError(f"--topology={name}: unknown; one of {', '.join(TOPOLOGIES)}")
  try:
    return topologies.get_topology_desc(topology_name=TOPOLOGIES[name].jax_name,
                                        platform="tpu").devices
  except Exception as e:  # no libtpu, or libtpu refuses the name
    raise CompileError(f"--topology={name}: no compile-only TPU devices "
                       f"({str(e).strip().splitlines()[0]}); pip install -e \".[tpu]\"") from None


def model_flops(config, model, params) -> dict[str, float]:
  """Training FLOPs of one step, whole slice (`model`: the built model's resolved config):
  6·N_active·tokens for the matmuls (2 forward, 4 backward) plus causal attention's scores and
  values; with remat the forward pass again."""
  tokens = config.global_batch_size * config.seq_len
  _, active = count_params(params, model)
  active -= model.vocab_size * model.hidden_size  # the embedding is a lookup, not a matmul
  window = min(model.sliding_window or config.seq_len, config.seq_len)
  # Q·Kᵀ and P·V, 2 FLOPs per multiply-add, over the keys each query sees (about half, causal).
  attention = 2 * 2 * model.num_layers * model.num_heads * model.head_dim * tokens * window / 2
  forward = 2 * active * tokens + attention
  return {"model": 3 * forward, "recompute": forward if model.remat else 0.0}


def _state_bytes(tree) -> int:
  """Bytes per chip of an abstract tree, from each leaf's sharding."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def _moe_minimum_elements(config, model, chips: int) -> float:
  """The fewest values one chip's MoE all-to-alls can move per step: each of its tokens' k slots
  goes to its expert and back, forward and backward (4 exchanges of D values; 6 with remat,
  which runs the forward exchanges again), every layer. (Counted in values, not bytes: XLA:TPU
  may send some exchanges in bf16.)"""
  tokens_per_chip = config.global_batch_size * config.seq_len / (chips / config.mesh.tensor)
  # Scanned, the compiled program holds one layer's exchanges (run L times).
  layers = 1 if model.scan_layers else model.num_layers
  exchanges = 6 if model.remat else 4
  return exchanges * layers * tokens_per_chip * model.experts_per_token * model.hidden_size


def _out_of_memory(error: Exception) -> Optional[dict[str, float]]:
  """What the program needed and the chip offered, if `error` is XLA's out-of-memory at compile
  time (e.g. "… required for HLO temporaries (76.42G) exceeds available HBM (15.75G)")."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text:
    return None
  scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
  sizes = [float(number) * scale[unit] for number, unit in re.findall(r"\(([\d.]+)([KMGT])\)",
                                                                       text)]
  found = {"needed": sizes[0], "available": sizes[1]} if len(sizes) >= 2 else {}
  return {"reason": text.strip().splitlines()[0], **found}


def report(config, topology: str) -> dict[str, Any]:
  """Compiles `config`'s train step for slice `topology`; the per-chip figures as a dict."""
  devices = topology_devices(topology)  # raises CompileError for an unknown name
  slice_ = TOPOLOGIES[topology]
  setup = build_lib.build(config, devices, abstract=True)
  state = setup.abstract_state
  result = {"topology": topology, "jax_topology": slice_.jax_name, "chips": len(devices),
            "scanned": bool(setup.model_config.scan_layers),
            "mesh": dict(setup.mesh.shape),
            # v4's compile-only devices are its chips' two TensorCores (no megacore), each
            # with half the chip's HBM; elsewhere a device is a chip.
            "hbm_per_chip": slice_.hbm_gib * GIB * slice_.chips / len(devices),
            "parameters": _state_bytes(state.params), "optimizer_state": _state_bytes(
                state.opt_state)}
  start = time.perf_counter()
  try:
    compiled = setup.train_step.lower(state, setup.abstract_batch()).compile()
  except Exception as e:
    memory = _out_of_memory(e)
    if memory is None:
      raise
    # XLA stops at the first buffer that does not fit: its figure is a lower bound.
    result.update(compile_seconds=time.perf_counter() - start, fits=False,
                  temporaries=memory.get("needed"), out_of_memory=memory["reason"],
                  total=memory.get("needed", 0) + result["parameters"] +
                  result["optimizer_state"])
    return result
  result["compile_seconds"] = time.perf_counter() - start
  memory = compiled.memory_analysis()
  result["temporaries"] = memory.temp_size_in_bytes
  result["total"] = (memory.argument_size_in_bytes + memory.output_size_in_bytes -
                     memory.alias_size_in_bytes + memory.temp_size_in_bytes +
                     memory.generated_code_size_in_bytes)
  result["fits"] = result["total"] <= result["hbm_per_chip"]
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  flops = model_flops(config, setup.model_config, state.params)
  result.update(compiled_flops=cost.get("flops", float("nan")),
                model_flops=flops["model"] / len(devices),
                recompute_flops=flops["recompute"] / len(devices))
  seconds = cost.get("optimal_seconds", -1.0)
  result["optimal_seconds"] = seconds if seconds > 0 else None  # negative: no estimate
  text = compiled.as_text()
  result["collectives"] = hlo_stats.collectives(text)
  result["kernels"] = hlo_stats.tpu_kernels(text)
  result["loops"] = len(hlo_stats.while_loops(text))
  if setup.mesh.shape["expert"] > 1:  # the ragged exchange: its buffers, sized for the worst case
    exchanged = [result["collectives"].get(kind, {}) for kind in ("all-to-all",
                                                                  "ragged-all-to-all")]
    result["moe_all_to_all_bytes"] = sum(c.get("bytes", 0) for c in exchanged)
    result["moe_all_to_all_ratio"] = (sum(c.get("elements", 0) for c in exchanged) /
                                      _moe_minimum_elements(config, setup.model_config, len(devices)))
  return result


def format_report(r: dict[str, Any]) -> str:
  """The report as the lines `mixtral-compile` prints."""
  gib = lambda b: f"{b / GIB:.2f} GiB"
  lines = [f"{r['topology']} ({r['jax_topology']}, {r['chips']} chips), mesh {r['mesh']}: "
           f"compiled in {r['compile_seconds']:.0f} s",
           f"HBM per chip: parameters {gib(r['parameters'])}, optimizer state "
           f"{gib(r['optimizer_state'])}"
           + (f", temporaries {gib(r['temporaries'])}" if r.get("temporaries") else "")
           + f"; total {gib(r['total'])} of {gib(r['hbm_per_chip'])}",
           "fits" if r["fits"] else
           f"does not fit: needs {'at least ' if 'out_of_memory' in r else ''}"
           f"{gib(r['total'])} of {gib(r['hbm_per_chip'])}"]
  if "out_of_memory" in r:
    lines.append(f"XLA:TPU: {r['out_of_memory']}")
  if "compiled_flops" in r:
    useful = r["model_flops"] + r["recompute_flops"]
    loops = (f" (XLA's static count: the bodies of the {r['loops']} loops left, e.g. scanned "
             f"layers or the chunked loss, count once)" if r["loops"] else "")
    lines.append(f"FLOPs per chip per step: compiled {r['compiled_flops']:.3e}{loops}, model "
                 f"{r['model_flops']:.3e} + remat recompute {r['recompute_flops']:.3e}: "
                 f"compiled ÷ (model + recompute) = {r['compiled_flops'] / useful:.2f}")
    lines.append("collectives per chip per step (ops as compiled, loop bodies once): " + (
        ", ".join(f"{kind} {c['count']}× {c['bytes'] / 1e6:.1f} MB"
                  for kind, c in r["collectives"].items()) or "none"))
    if r["kernels"]:
      lines.append("Pallas kernels: " + ", ".join(f"{name} {count}×"
                                                  for name, count in r["kernels"].items()))
    if "moe_all_to_all_bytes" in r:
      lines.append(f"MoE all-to-all: {r['moe_all_to_all_bytes'] / 1e6:.1f} MB of buffers, "
                   f"{r['moe_all_to_all_ratio']:.2f} × the values the tokens' k slots need")
    if r["optimal_seconds"]:
      mfu = r["model_flops"] / r["optimal_seconds"]
      lines.append(f"XLA:TPU's estimate (not a measurement): step ≥ {r['optimal_seconds']:.4f} "
                   f"s, so ≤ {mfu / 1e12:.0f} model TFLOP/s per chip")
  return "\n".join(lines)
