"""Training metrics: one JSON object per logged step in metrics.jsonl, and a console progress line."""

import json
import os
from typing import Any, Mapping, Optional

import numpy as np

from mixtral_jax.files import write_atomically


def _jsonable(value: Any) -> Any:
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


class MetricsWriter:
  """Appends `{"step": …, name: value, …}` lines to WORKDIR/metrics.jsonl.

  Only an `enabled` writer writes: in a multi-process run the primary process, as the metrics
  are global and the workdir is shared.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")

  def truncate(self, last_step: int) -> None:
    """Drops the records after `last_step`, which a run resumed from there logs again (and a
    line cut short by a killed process)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    kept = []
    with open(self.path) as f:
      for line in f:
        try:
          if json.loads(line)["step"] <= last_step:
            kept.append(line)
        except (ValueError, KeyError, TypeError):
          continue
    write_atomically(self.path, "".join(kept).encode())


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class ProgressBar:
  """Prints `step 120/600 [#####.....]  20% | loss 3.214 | 12,345 tok/s | ETA 2m10s`."""

  def __init__(self, total_steps: int, width: int = 24):
    self.total_steps = total_steps
    self.width = width

  def line(self, step: int, loss: float, tokens_per_sec: float,
           seconds_per_step: Optional[float]) -> str:
    """`seconds_per_step` None (e.g. a step that included compilation) prints no ETA."""
    frac = step / self.total_steps
    filled = int(round(frac * self.width))
    eta = "--" if seconds_per_step is None else _duration(
        seconds_per_step * (self.total_steps - step))
    return (f"step {step}/{self.total_steps} [{'#' * filled}{'.' * (self.width - filled)}] "
            f"{frac:4.0%} | loss {loss:.3f} | {tokens_per_sec:,.0f} tok/s | ETA {eta}")

  def show(self, step: int, loss: float, tokens_per_sec: float,
           seconds_per_step: Optional[float]) -> None:
    print(self.line(step, loss, tokens_per_sec, seconds_per_step), flush=True)
