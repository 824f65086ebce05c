"""Reads collective traffic, TPU kernels and loops out of compiled HLO text (for tests and
benchmarks)."""

import re
from typing import Optional

import numpy as np

_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1,
                "f64": 8, "s64": 8}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_ALL_TO_ALL = re.compile(r"=\s*(.*?)\s+all-to-all(?:-start)?\(")


def all_to_all_bytes(hlo_text: str) -> list[int]:
  """Per-device result bytes of each all-to-all in `hlo_text`, in program order."""
  sizes = []
  for line in hlo_text.splitlines():
    match = _ALL_TO_ALL.search(line)
    if match:
      sizes.append(_bytes(_SHAPE.findall(match.group(1))))
  return sizes


_COLLECTIVE = re.compile(r"=\s*(.*?)\s+(all-to-all|ragged-all-to-all|all-gather|reduce-scatter|"
                         r"all-reduce|collective-permute)(-start)?\(")


def _bytes(shapes: list[tuple[str, str]]) -> int:
  return sum(_DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
             for dtype, dims in shapes)


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {"count", "bytes", "elements"}} of the collectives in `hlo_text`: ops as written (one
  inside a loop body counts once, not per iteration) and their per-device results."""
  totals = {}
  for line in hlo_text.splitlines():
    match = _COLLECTIVE.search(line)
    if match:
      shapes = _SHAPE.findall(match.group(1))
      if match.group(3) and match.group(2) != "all-to-all":  # async start: (operands…, result)
        shapes = shapes[-1:]
      kind = totals.setdefault(match.group(2), {"count": 0, "bytes": 0, "elements": 0})
      kind["count"] += 1
      kind["bytes"] += _bytes(shapes)
      kind["elements"] += sum(int(np.prod([int(d) for d in dims.split(",") if d]))
                              for _, dims in shapes)
  return totals


_TPU_KERNEL = re.compile(r"%([\w-]+?)(?:\.\d+)? = .*custom_call_target=\"tpu_custom_call\"")


def tpu_kernels(hlo_text: str) -> dict[str, int]:
  """{name: count} of the Pallas/Mosaic kernels in compiled TPU HLO text (XLA names each call
  after its kernel, e.g. splash_mha_fwd_segmented_residuals)."""
  kernels = {}
  for match in _TPU_KERNEL.finditer(hlo_text):
    kernels[match.group(1)] = kernels.get(match.group(1), 0) + 1
  return kernels


_KNOWN_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def while_loops(hlo_text: str) -> list[tuple[str, Optional[int]]]:
  """(op_name, trip count) of each while loop compiled HLO text keeps, in program order: the
  count XLA knows, or None where it depends on the data (a fori_loop to a computed bound).
  XLA's FLOP count takes each loop's body once."""
  loops = []
  for line in hlo_text.splitlines():
    if " while(" in line:
      name, count = _OP_NAME.search(line), _KNOWN_TRIP_COUNT.search(line)
      loops.append((name[1] if name else "", int(count[1]) if count else None))
  return loops
