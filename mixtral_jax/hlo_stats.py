"""Reads collective traffic out of compiled HLO text (for tests and benchmarks)."""

import re

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
      sizes.append(sum(_DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
                       for dtype, dims in _SHAPE.findall(match.group(1))))
  return sizes
