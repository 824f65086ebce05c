"""A sweep's results: one row per trial from the study and the trial's metrics.jsonl, written as
DIR/results.csv, DIR/results.md (sorted by the objective) and two plots."""

import csv
import io
from typing import Any, Optional

import numpy as np
import optuna
from optuna.trial import TrialState

from mixtral_jax.runtime.files import write_atomically
from mixtral_jax.runtime.workdir import SweepDir
from mixtral_jax.training import metrics as metrics_lib
from mixtral_jax.training.plot import plt, save_png

# Order of the states after the completed trials.
_STATE_ORDER = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.RUNNING: 2,
                TrialState.WAITING: 3, TrialState.FAIL: 4}
# (column, metrics.jsonl name): the last logged value of each.
_LAST = (("eval_loss", "eval_loss"), ("ce_loss", "ce_loss"), ("aux_loss", "aux_loss"),
         ("dropped_fraction", "dropped_fraction"), ("max_load_ratio", "max_load_ratio"),
         ("starved_experts", "starved_experts"))


def _records(workdir: str, number: int) -> list[dict]:
  return metrics_lib.read_records(SweepDir(workdir).trial(number).path)


def _last(records: list[dict], name: str) -> Optional[float]:
  values = [r[name] for r in records if name in r]
  return values[-1] if values else None


def space(study: optuna.Study) -> dict[str, Any]:
  """The sweep's space as stored with its study (sweep.describe)."""
  return study.user_attrs.get("space", {"params": {}, "objective": "eval_loss",
                                        "direction": "minimize"})


def rows(study: optuna.Study, records_of: dict[int, list[dict]]) -> list[dict[str, Any]]:
  """One dict per trial: trial, state, each swept field, final eval loss, CE, aux loss, dropped
  fraction, tokens/s (median of the logged intervals after the first, which compiles), steps,
  wall seconds and the reason a trial failed or was pruned; best first. `records_of`: trial
  number → the records of its metrics.jsonl."""
  described = space(study)
  objective, fields = described["objective"], list(described["params"])
  table = []
  for trial in study.get_trials(deepcopy=False):
    records = records_of.get(trial.number, [])  # none yet for a trial begun since
    speeds = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r][1:]
    row = {"trial": trial.number, "state": trial.state.name.lower()}
    row.update({field: trial.params.get(field, trial.system_attrs.get("fixed_params", {}).get(
        field)) for field in fields})
    row.update({column: _last(records, name) for column, name in _LAST})
    if objective not in row:
      row[objective] = trial.value if trial.state == TrialState.COMPLETE else _last(records,
                                                                                 objective)
    row.update(tokens_per_sec=float(np.median(speeds)) if speeds else None,
               steps=records[-1]["step"] if records else 0,
               wall_seconds=trial.user_attrs.get("seconds"),
               note=trial.user_attrs.get("reason", ""))
    table.append(row)
  sign = -1.0 if described["direction"] == "maximize" else 1.0

  def order(row):
    value = row[objective]
    return (_STATE_ORDER.get(TrialState[row["state"].upper()], 5),
            sign * value if row["state"] == "complete" and value is not None else 0.0,
            row["trial"])

  return sorted(table, key=order)


def _text(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
  return str(value)


def to_csv(table: list[dict[str, Any]]) -> str:
  """The rows as CSV, full precision."""
  out = io.StringIO()
  if table:
    writer = csv.DictWriter(out, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
  return out.getvalue()


def to_markdown(table: list[dict[str, Any]]) -> str:
  """The rows as a markdown table."""
  if not table:
    return "(no trials yet)\n"
  names = list(table[0])
  lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
  lines += ["| " + " | ".join(_text(row[name]) for name in names) + " |" for row in table]
  return "\n".join(lines) + "\n"


def _label(row: dict[str, Any], fields: list[str]) -> str:
  return f"trial {row['trial']}: " + ", ".join(f"{f.split('.')[-1]}={row[f]}" for f in fields)


# The curves plotted per trial: metrics.jsonl name → (file, axis label, title).
_CURVES = {"eval_loss": ("eval_loss_curves.png", "eval loss (nats/token)",
                         "Eval loss of each trial"),
           "max_load_ratio": ("max_load_curves.png", "busiest expert's load ÷ balanced load",
                              "Expert balance of each trial (worst layer; 1 = balanced)")}


def plot_curves(study: optuna.Study, records_of: dict[int, list[dict]],
                table: list[dict[str, Any]], path: str, metric: str = "eval_loss") -> None:
  """`metric` (a key of _CURVES) against step, one line per trial (`records_of` as in `rows`)."""
  _, ylabel, title = _CURVES[metric]
  fields = list(space(study)["params"])
  figure, axes = plt.subplots(figsize=(7, 4.5))
  for row in sorted(table, key=lambda r: r["trial"]):
    points = [(r["step"], r[metric]) for r in records_of.get(row["trial"], []) if metric in r]
    if points:
      steps, losses = zip(*points)
      axes.plot(steps, losses, marker="o", markersize=3, label=_label(row, fields) +
                ("" if row["state"] == "complete" else f" ({row['state']})"))
  axes.set(xlabel="step", ylabel=ylabel, title=title)
  axes.grid(alpha=0.3)
  if axes.lines:
    axes.legend(fontsize=7)
  figure.tight_layout()
  save_png(figure, path)


def plot_by_field(study: optuna.Study, table: list[dict[str, Any]], path: str) -> None:
  """The objective of each completed trial against each swept field."""
  described = space(study)
  objective, fields = described["objective"], list(described["params"])
  done = [row for row in table if row["state"] == "complete" and row[objective] is not None]
  figure, axes = plt.subplots(1, max(len(fields), 1), figsize=(3.5 * max(len(fields), 1), 3.5),
                              squeeze=False)
  for axis, field in zip(axes[0], fields):
    values = [row[field] for row in done]
    distribution = optuna.distributions.json_to_distribution(described["params"][field])
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
      labels = [str(c) for c in distribution.choices]  # the sweep's own order
      x = [labels.index(str(v)) for v in values]
      axis.set_xticks(range(len(labels)), labels)
      axis.set_xlim(-0.5, len(labels) - 0.5)
    else:
      x = values
      if distribution.log:
        axis.set_xscale("log")
    axis.scatter(x, [row[objective] for row in done])
    axis.set(xlabel=field, ylabel=objective)
    axis.grid(alpha=0.3)
  figure.suptitle(f"Final {objective} by swept field")
  figure.tight_layout()
  save_png(figure, path)


def write(study: optuna.Study, workdir: str) -> list[dict[str, Any]]:
  """Writes results.csv, results.md, eval_loss_curves.png and objective_by_field.png in
  `workdir`; returns the rows."""
  records_of = {t.number: _records(workdir, t.number) for t in study.get_trials(deepcopy=False)}
  table = rows(study, records_of)
  sweep_dir = SweepDir(workdir)
  write_atomically(sweep_dir.result("results.csv"), to_csv(table).encode())
  write_atomically(sweep_dir.result("results.md"), to_markdown(table).encode())
  for metric, (name, _, _) in _CURVES.items():
    if metric == "eval_loss" or any(metric in r for rs in records_of.values() for r in rs):
      plot_curves(study, records_of, table, sweep_dir.result(name), metric)
  plot_by_field(study, table, sweep_dir.result("objective_by_field.png"))
  return table
