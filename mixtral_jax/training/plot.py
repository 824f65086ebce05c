"""`mixtral-plot WORKDIR [--out DIR]`: PNGs of a run's metrics.jsonl (a sweep trial's too).

    loss.png         train and eval loss against step
    expert_load.png  a heatmap per layer: experts × logged steps, colour = the fraction of
                     token-slots each expert got, centred on the balanced 1/E; each title
                     gives the last log's busiest expert ÷ balanced, the starved experts
                     (under a tenth of balanced) and, for aux-free balancing, the bias range

Training writes them into its workdir when it ends.
"""

import io
import math
import os
from typing import Any, Optional

import matplotlib
import numpy as np

from mixtral_jax.errors import UserError
from mixtral_jax.runtime.files import write_atomically
from mixtral_jax.training import metrics as metrics_lib

matplotlib.use("Agg")  # files only; no display on a training host
import matplotlib.colors  # noqa: E402
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402


class PlotError(UserError, ValueError):
  """Nothing to plot; the message names the workdir."""


def save_png(figure, path: str) -> None:
  """Writes `figure` to `path` as a PNG that readers never see half-drawn, and closes it."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=110)
  plt.close(figure)
  write_atomically(path, buffer.getvalue())


def plot_losses(records: list[dict[str, Any]], path: str) -> None:
  """Train loss (and its cross-entropy part) and eval loss against step."""
  figure, axes = plt.subplots(figsize=(7, 4.5))
  for name, label, style in (("loss", "train loss", "-"), ("ce_loss", "train cross-entropy", ":"),
                             ("eval_loss", "eval loss", "o-")):
    points = [(r["step"], r[name]) for r in records if name in r]
    if points:
      axes.plot(*zip(*points), style, markersize=4, label=label)
  axes.set(xlabel="step", ylabel="nats/token", title="Loss")
  axes.grid(alpha=0.3)
  axes.legend()
  figure.tight_layout()
  save_png(figure, path)


def _health(record: dict[str, Any], layer: int) -> str:
  """The last logged balance figures of `layer` (training/step.py's expert_health), if any."""
  if "max_load_ratio_per_layer" not in record:
    return ""
  text = (f"\nmax/balanced {record['max_load_ratio_per_layer'][layer]:.2f}, starved "
          f"{record['starved_experts_per_layer'][layer]:.0f}")
  if "router_bias_range_per_layer" in record:
    text += f", bias range {record['router_bias_range_per_layer'][layer]:.3f}"
  return text


def plot_expert_load(records: list[dict[str, Any]], path: str) -> None:
  """One heatmap per layer of the expert load at each logged step."""
  logged = [r for r in records if "expert_load" in r]
  steps = [r["step"] for r in logged]
  load = np.asarray([r["expert_load"] for r in logged], np.float64)  # [S, L, E]
  _, layers, experts = load.shape
  balanced = 1.0 / experts
  columns = min(layers, 4)
  rows = math.ceil(layers / columns)
  figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns + 1.2, 2.8 * rows + 0.6),
                              squeeze=False, layout="constrained")
  norm = matplotlib.colors.TwoSlopeNorm(vcenter=balanced, vmin=0.0,
                                        vmax=max(float(load.max()), 2 * balanced))
  for layer, axis in enumerate(axes.flat):
    if layer >= layers:
      axis.axis("off")
      continue
    image = axis.imshow(load[:, layer, :].T, aspect="auto", cmap="RdBu_r", norm=norm,
                        interpolation="nearest", origin="lower")
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 5)).round().astype(int))
    axis.set_xticks(ticks, [str(steps[t]) for t in ticks])
    axis.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axis.set(title=f"layer {layer}" + _health(logged[-1], layer), xlabel="step",
             ylabel="expert")
  bar = figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9)
  bar.set_label("fraction of token-slots")
  bar.set_ticks([0.0, balanced, norm.vmax], labels=["0", f"1/{experts} balanced",
                                                    f"{norm.vmax:.2f}"])
  bar.ax.axhline(balanced, color="black", linewidth=1.5)
  figure.suptitle("Expert load per layer (white = balanced)")
  save_png(figure, path)


def write(workdir: str, out: Optional[str] = None) -> list[str]:
  """Writes loss.png and expert_load.png of `workdir`'s metrics into `out` (default: the
  workdir); returns their paths. PlotError if the workdir has no metrics."""
  records = metrics_lib.read_records(workdir)
  if not any("loss" in r for r in records):
    raise PlotError(f"{workdir} has no metrics.jsonl with train losses to plot")
  out = out or workdir
  os.makedirs(out, exist_ok=True)
  written = []
  for name, draw in (("loss.png", plot_losses), ("expert_load.png", plot_expert_load)):
    if name == "expert_load.png" and not any("expert_load" in r for r in records):
      continue
    path = os.path.join(out, name)
    draw(records, path)
    written.append(path)
  return written
