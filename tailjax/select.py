"""Checkpoint selection over a family: summaries -> concordance, regime, choice.

Inputs are summary tables: a CSV with a ``name`` column and one column per summary
(``mean``, ``median``, ``p90``, ``p99``, ...; lower is better), or JSON mapping each
name to its summaries, a saved ``tailjax eval`` report (its directory or ``report.json``):
one row per model, its per-token CE summary, or a ``tailjax distill`` run (or one of its
checkpoints): one row per checkpoint, the validation CE summary saved with it. Task
scores (optional) are a CSV ``name,score``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Any, Iterable

from tailjax import stats

DEFAULT_SUMMARIES = ("mean", "median", "p90", "p99")


def _number(value: str, where: str) -> float:
  try:
    return float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{where}: {value!r} is not a number") from None


EVAL_SUMMARIES = ("mean", "median", "p90", "p95", "p99", "p99.9")


def read_eval_report(path: str | Path) -> tuple[dict[str, dict[str, float]], str]:
  """A ``tailjax eval`` report -> (``{model: CE summaries}``, fingerprint of the windows it scored)."""
  from tailjax import report

  saved = report.read(path)
  table = {name: {k: float(m["ce"][k]) for k in EVAL_SUMMARIES} for name, m in saved["models"].items()}
  return table, str(saved["run"].get("fingerprint"))


def read_distill_run(path: str | Path) -> tuple[dict[str, dict[str, float]], str]:
  """A ``tailjax distill`` run -> (``{run@step: CE summaries}``, fingerprint of its validation windows)."""
  from tailjax import distill

  table, fingerprints = {}, set()
  for name, saved in distill.read_run(path).items():
    ce = saved["ce"]
    table[name] = {**{k: float(ce[k]) for k in EVAL_SUMMARIES}, **{k: float(v) for k, v in ce["percentiles"].items()}}
    fingerprints.add(saved["fingerprint"])
  if len(fingerprints) > 1:
    raise ValueError(f"{path}: checkpoints were evaluated on different validation windows")
  return table, fingerprints.pop()


def read_source(path: str | Path) -> tuple[dict[str, dict[str, float]], str | None]:
  """Any input of ``tailjax select`` -> (table, fingerprint of the tokens it was measured on, if known)."""
  path = Path(path)
  if path.is_dir() and ((path / "checkpoints").is_dir() or (path / "eval.json").exists()):
    return read_distill_run(path)
  if path.is_dir() or path.name == "report.json":
    return read_eval_report(path)
  return read_table(path), None


def read_table(path: str | Path) -> dict[str, dict[str, float]]:
  """A summary table file -> ``{checkpoint: {summary: value}}``."""
  path = Path(path)
  if path.is_dir() or path.name == "report.json":
    return read_source(path)[0]
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such summary table")
  if path.suffix == ".json":
    try:
      data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
      raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
      raise ValueError(f"{path}: expected a JSON object mapping checkpoint name -> {{summary: value}}")
    return {str(n): {str(k): _number(v, f"{path} checkpoint {n!r} summary {k!r}") for k, v in row.items()}
            for n, row in data.items()}
  if path.suffix != ".csv":
    raise ValueError(f"{path}: expected a summary table (.csv or .json)")
  with path.open(newline="") as f:
    reader = csv.DictReader(f)
    if reader.fieldnames is None or "name" not in reader.fieldnames:
      raise ValueError(f"{path}: the CSV needs a 'name' column (found {reader.fieldnames})")
    table = {}
    for line, row in enumerate(reader, start=2):
      name = row.pop("name")
      if name in table:
        raise ValueError(f"{path}:{line}: checkpoint {name!r} appears twice")
      table[name] = {k: _number(v, f"{path}:{line} column {k!r}") for k, v in row.items() if v not in ("", None)}
  return table


def read_scores(path: str | Path) -> dict[str, float]:
  """A ``name,score`` CSV -> ``{checkpoint: score}``."""
  table = read_table(path)
  missing = [n for n, row in table.items() if "score" not in row]
  if missing:
    raise ValueError(f"{path}: no 'score' for {missing[:5]}")
  return {n: row["score"] for n, row in table.items()}


@dataclasses.dataclass
class SelectionReport:
  table: dict[str, dict[str, float]]
  summaries: list[str]
  selection: stats.Selection
  pairwise: dict[str, dict[str, float]]
  correlations: dict[str, dict[str, float]] | None

  def to_dict(self) -> dict[str, Any]:
    s = self.selection
    d = {"selected": s.selected, "rule": s.rule, "selected_by": s.selected_by, "concordance": s.concordance,
         "regime": s.regime, "pairwise_concordance": self.pairwise,
         "mean_median_discordant_pairs": [list(p) for p in s.discordant], "warning": s.warning,
         "summaries": self.summaries, "table": self.table}
    if self.correlations is not None:
      d["correlations"] = self.correlations
    return d


def select_checkpoints(table: dict[str, dict[str, float]], by: str = "median",
                       summaries: Iterable[str] = DEFAULT_SUMMARIES,
                       scores: dict[str, float] | None = None) -> SelectionReport:
  if len(table) < 2:
    raise ValueError(f"selection needs at least two checkpoints, got {len(table)}: {list(table)}")
  summaries = list(dict.fromkeys([*summaries, by]))
  missing = sorted({s for s in summaries for row in table.values() if s not in row})
  if missing:
    raise ValueError(f"summaries {missing} are missing for some checkpoints; the table has "
                     f"{sorted(set().union(*table.values()))}")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the report carries the warning
    selection = stats.select(table, by=by, summaries=summaries)
  correlations = None
  if scores is not None:
    unknown = sorted(set(table) - set(scores))
    if unknown:
      raise ValueError(f"task scores are missing for {unknown[:5]}")
    correlations = stats.correlations(table, scores, summaries)
  return SelectionReport(table, summaries, selection, stats.pairwise_concordance(table, summaries), correlations)


def render(report: SelectionReport, console) -> None:
  """Terminal view: the table with each rule's pick marked, concordance, regime and warning."""
  from rich.table import Table

  s = report.selection
  table = Table(title=f"{len(report.table)} checkpoints (lower is better); selected by {s.rule}: {s.selected}")
  table.add_column("checkpoint")
  for name in report.summaries:
    table.add_column(name, justify="right")
  table.add_column("best by")
  for ckpt, row in report.table.items():
    rules = [rule for rule, pick in s.selected_by.items() if pick == ckpt]
    style = "bold green" if ckpt == s.selected else None
    table.add_row(ckpt, *(f"{row[n]:.4g}" for n in report.summaries), ", ".join(rules), style=style)
  console.print(table)
  for key, value in s.concordance.items():
    console.print(f"concordance C({{{key}}}) = {value:.3f}")
  console.print(f"regime: {s.regime}")
  if report.correlations:
    corr = Table(title="correlation with task score (a good loss summary correlates negatively)")
    for col in ("summary", "pearson", "spearman"):
      corr.add_column(col, justify="right")
    for name, c in report.correlations.items():
      corr.add_row(name, *(f"{c[k]:.3f}" if not math.isnan(c[k]) else "n/a" for k in ("pearson", "spearman")))
    console.print(corr)
  if s.warning:
    console.print(f"[yellow]warning:[/yellow] {s.warning}")
