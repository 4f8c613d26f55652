"""Checkpoint selection over a family: summaries -> concordance, regime, choice.

Inputs are summary tables: a CSV with a ``name`` column and one column per summary
(``mean``, ``median``, ``p90``, ``p99``, ...; lower is better), or JSON mapping each
name to its summaries, a saved ``tailjax eval`` report (its directory or ``report.json``):
one row per model, its per-token CE summary, or a ``tailjax distill`` run (or one of its
checkpoints): one row per checkpoint, the validation CE summary saved with it. Task
scores (optional) are a CSV ``name,score``, or the task accuracy a distill run saved with each checkpoint
(``eval_task``).
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import json
import math
import warnings
from pathlib import Path
from typing import Any, Iterable, NamedTuple

from tailjax import files, stats
from tailjax.report import pages
from tailjax.stats import numbers

DEFAULT_SUMMARIES = ("mean", "median", "p90", "p99")


def _number(value: str, where: str) -> float:
  try:
    return float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{where}: {value!r} is not a number") from None


EVAL_SUMMARIES = ("mean", "median", "p90", "p95", "p99", "p99.9")
BAND_PREFIX = "band "  # table keys of CE band masses: shown, never ranked (higher is not worse)


def read_eval_report(path: str | Path) -> tuple[dict[str, dict[str, float]], str]:
  """A ``tailjax eval`` report -> (``{model: CE summaries}``, fingerprint of the windows it scored)."""
  from tailjax import report

  saved = report.read(path)
  return {name: _ce_row(m["ce"]) for name, m in saved["models"].items()}, str(saved["run"].get("fingerprint"))


def _ce_row(ce: dict[str, Any]) -> dict[str, float]:
  """A saved CE summary -> its table row: headline summaries, every 5th percentile, band masses."""
  row = {k: float(ce[k]) for k in EVAL_SUMMARIES}
  row.update({k: float(v) for k, v in ce.get("percentiles", {}).items()})
  row.update({BAND_PREFIX + k: float(v) for k, v in ce.get("band_mass", {}).items()})
  return row


class Source(NamedTuple):
  """What one input of ``tailjax select`` gives: ``table`` ``{checkpoint: {summary: value}}``, the ``fingerprint``
  of the tokens it was measured on (None: unknown), and ``scores`` ``{checkpoint: task accuracy}`` when every
  checkpoint of a distill run was scored on its ``eval_task`` (else None)."""

  table: dict[str, dict[str, float]]
  fingerprint: str | None
  scores: dict[str, float] | None = None


def read_distill_run(path: str | Path, corpus: str | None = None, device_mesh=None, dtype: str = "auto") -> Source:
  """A ``tailjax distill`` run -> its ``Source``: ``{run@step: CE summaries}``, the validation windows' fingerprint,
  and each checkpoint's task accuracy when the run measured one.

  A checkpoint without a saved summary is evaluated on ``corpus`` when one is given (on
  ``device_mesh`` if any, with parameters in ``dtype``).
  """
  from tailjax import distill

  table, fingerprints, scores = {}, set(), {}
  for name, saved in distill.read_run(path, corpus, device_mesh, dtype).items():
    table[name] = _ce_row(saved["ce"])
    fingerprints.add(saved["fingerprint"])
    if "task" in saved:
      scores[name] = float(saved["task"]["accuracy"])
  if len(fingerprints) > 1:
    raise ValueError(f"{path}: checkpoints were evaluated on different validation windows")
  return Source(table, fingerprints.pop(), scores if len(scores) == len(table) else None)


def read_source(path: str | Path, corpus: str | None = None, device_mesh=None, dtype: str = "auto") -> Source:
  """Any input of ``tailjax select`` -> its ``Source``."""
  path = Path(path)
  if path.is_dir() and ((path / "checkpoints").is_dir() or (path / "tailjax_model.json").exists()):
    return read_distill_run(path, corpus, device_mesh, dtype)
  if path.is_dir() or path.name == "report.json":
    return Source(*read_eval_report(path))
  return Source(read_table(path), None)


def read_table(path: str | Path) -> dict[str, dict[str, float]]:
  """A summary table file -> ``{checkpoint: {summary: value}}``."""
  path = Path(path)
  if path.is_dir() or path.name == "report.json":
    return read_source(path).table
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
  families: dict[str, tuple[list[str], stats.Selection]] = dataclasses.field(default_factory=dict)
  missing: list[str] = dataclasses.field(default_factory=list)  # default summaries the table lacks (left out)

  def to_dict(self) -> dict[str, Any]:
    s = self.selection
    d = {"selected": s.selected, "rule": s.rule, "selected_by": s.selected_by, "concordance": s.concordance,
         "regime": s.regime, "verdict": s.verdict, "pairwise_concordance": self.pairwise,
         "mean_median_discordant_pairs": [list(p) for p in s.discordant], "warning": s.warning,
         "summaries": self.summaries, "missing_summaries": self.missing, "table": self.table}
    if self.correlations is not None:
      d["correlations"] = self.correlations
    if self.families:
      d["families"] = {name: {"checkpoints": members, "selected": f.selected, "selected_by": f.selected_by,
                              "concordance": f.concordance, "regime": f.regime, "warning": f.warning}
                       for name, (members, f) in self.families.items()}
    return d


def family_members(table: dict[str, dict[str, float]], families: dict[str, str]) -> dict[str, list[str]]:
  """``{family: glob}`` -> ``{family: checkpoints whose name matches}``; a family of fewer than two is an error."""
  members = {name: [c for c in table if fnmatch.fnmatchcase(c, pattern)] for name, pattern in families.items()}
  small = {name: found for name, found in members.items() if len(found) < 2}
  if small:
    raise ValueError("a family needs at least two checkpoints: " + "; ".join(
        f"{name}={families[name]} matches {found}" for name, found in small.items()))
  return members


def select_checkpoints(table: dict[str, dict[str, float]], by: str = "median",
                       summaries: Iterable[str] | None = None, scores: dict[str, float] | None = None,
                       families: dict[str, str] | None = None) -> SelectionReport:
  """Selection over the whole table and, with ``families`` (``{name: glob}``), within each subset.

  ``summaries`` whose concordance is reported; None: those of ``DEFAULT_SUMMARIES`` every row has (the report
  names the ones left out), while summaries asked for by name must be in every row."""
  if len(table) < 2:
    raise ValueError(f"selection needs at least two checkpoints, got {len(table)}: {list(table)}")
  absent = lambda names: sorted({s for s in names for row in table.values() if s not in row})
  left_out = absent(DEFAULT_SUMMARIES) if summaries is None else []
  if summaries is None:
    summaries = [s for s in DEFAULT_SUMMARIES if s not in left_out]
  summaries = list(dict.fromkeys([*summaries, by]))
  missing = absent(summaries)
  if missing:
    raise ValueError(f"summaries {missing} are missing for some checkpoints; the table has "
                     f"{sorted(set().union(*table.values()))}")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the report carries the warnings
    selection = stats.select(table, by=by, summaries=summaries)
    subsets = {name: (found, stats.select({c: table[c] for c in found}, by=by, summaries=summaries))
               for name, found in family_members(table, families or {}).items()}
  correlations = None
  if scores is not None:
    unknown = sorted(set(table) - set(scores))
    if unknown:
      raise ValueError(f"task scores are missing for {unknown[:5]}")
    correlations = stats.correlations(table, scores, summaries)
  return SelectionReport(table, summaries, selection, stats.pairwise_concordance(table, summaries), correlations,
                         subsets, left_out)


def _rows(report: SelectionReport) -> tuple[list[str], list[list[str]]]:
  """Table head and rows: the ranked summaries, p99.9 and band masses when known, and each rule's pick."""
  s = report.selection
  extra = [k for k in ("p99.9",) if k not in report.summaries and all(k in r for r in report.table.values())]
  bands = [k for k in next(iter(report.table.values())) if k.startswith(BAND_PREFIX)]
  head = ["checkpoint", *report.summaries, *extra]
  if bands:
    head.append("band mass " + " / ".join(b.removeprefix(BAND_PREFIX) for b in bands))
  head.append("best by")
  rows = []
  for ckpt, row in report.table.items():
    cells = [ckpt, *(numbers.figure(row[n]) for n in (*report.summaries, *extra))]
    if bands:
      cells.append(" / ".join(numbers.share(row.get(b, math.nan)) for b in bands))
    cells.append(", ".join(rule for rule, pick in s.selected_by.items() if pick == ckpt))
    rows.append(cells)
  return head, rows


def _notes(report: SelectionReport) -> list[str]:
  s = report.selection
  notes = [f"selected by {s.rule}: {s.selected}"]
  if report.missing:
    notes.append(f"summaries {', '.join(report.missing)} are not in every row of the table: left out")
  notes += [f"concordance C({{{key}}}) = {numbers.figure(value)}" for key, value in s.concordance.items()]
  notes.append(f"regime: {s.verdict}")
  for name, (members, f) in report.families.items():
    notes.append(f"family {name} ({len(members)} checkpoints): C({{mean,median}}) = "
                 f"{numbers.figure(f.concordance['mean,median'])}, regime {f.regime}, selected by {f.rule}: {f.selected}"
                 + (f"; mean selects {f.selected_by['mean']}" if f.warning else ""))
  for name, c in (report.correlations or {}).items():
    notes.append(f"{name} vs task score: Pearson {numbers.figure(c['pearson'])}, Spearman {numbers.figure(c['spearman'])}")
  if s.warning:
    notes.append(f"warning: {s.warning}")
  return notes


def render(report: SelectionReport, console) -> None:
  """Terminal view: the table with the selected checkpoint marked, then concordance, regime, warnings."""
  from rich.table import Table

  s = report.selection
  head, rows = _rows(report)
  table = Table(title=f"{len(report.table)} checkpoints (lower is better); selected by {s.rule}: {s.selected}")
  for i, column in enumerate(head):
    table.add_column(column, justify="left" if i in (0, len(head) - 1) else "right")
  for ckpt, row in zip(report.table, rows):
    table.add_row(*row, style="bold green" if ckpt == s.selected else None)
  console.print(table)
  for note in _notes(report)[1:]:
    console.print(note.replace("warning:", "[yellow]warning:[/yellow]"))


def to_markdown(report: SelectionReport) -> str:

  head, rows = _rows(report)
  pairwise = report.pairwise
  names = list(pairwise)
  lines = ["# tailjax select", "", *pages.markdown_table(head, rows), "", *(f"- {n}" for n in _notes(report)), "",
           "## Pairwise concordance", "", *pages.markdown_table(["", *names],
                                                          [[a, *(f"{pairwise[a][b]:.2f}" for b in names)] for a in names])]
  return "\n".join(lines) + "\n"


def _run_and_step(name: str) -> tuple[str, int] | None:
  run, at, step = name.rpartition("@")
  return (run, int(step)) if at and step.isdigit() else None


def plots(report: SelectionReport) -> dict[str, str]:
  """Base64 PNGs: mean vs median per checkpoint (runs joined in step order), IQR-standardized percentile
  profiles (when the table has percentiles), and the pairwise concordance heatmap."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  out = {}
  fig, ax = plt.subplots(figsize=(5.5, 4.5))
  runs: dict[str, list[tuple[int, str]]] = {}
  for name in report.table:
    parsed = _run_and_step(name)
    runs.setdefault(parsed[0] if parsed else name, []).append((parsed[1] if parsed else 0, name))
  hue, shade = pages.colors(runs), pages.run_shades(runs)
  for run, points in runs.items():
    points.sort()
    xs = [report.table[n]["mean"] for _, n in points]
    ys = [report.table[n]["median"] for _, n in points]
    ax.plot(xs, ys, "-", color=hue[run], alpha=0.5, label=run)
    ax.scatter(xs, ys, color=[shade[n] for _, n in points], zorder=3)
  ax.set(xlabel="mean CE", ylabel="median CE", title="mean vs median (lower-left is better)")
  ax.legend(fontsize=7)
  out["mean_vs_median"] = pages.png(fig)
  plt.close(fig)

  percents = [f"p{q}" for q in (*range(5, 100, 5), 99)]
  if all(all(p in row for p in percents) for row in report.table.values()):
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, row in report.table.items():
      iqr = row["p75"] - row["p25"]
      ax.plot([int(p[1:]) for p in percents], [(row[p] - row["p50"]) / iqr if iqr > 0 else math.nan for p in percents],
              label=name, linewidth=1, color=shade[name])
    ax.set(xlabel="percentile", ylabel="(P_q - P50) / IQR", title="standardized CE percentile profiles")
    ax.legend(fontsize=6, ncol=2)
    out["standardized_profiles"] = pages.png(fig)
    plt.close(fig)

  names = list(report.pairwise)
  fig, ax = plt.subplots(figsize=(1 + 0.6 * len(names), 0.8 + 0.6 * len(names)))
  image = ax.imshow([[report.pairwise[a][b] for b in names] for a in names], vmin=0, vmax=1, cmap="viridis")
  ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
  ax.set_yticks(range(len(names)), names)
  for i, a in enumerate(names):
    for j, b in enumerate(names):
      ax.text(j, i, f"{report.pairwise[a][b]:.2f}", ha="center", va="center", fontsize=7, color="w")
  fig.colorbar(image, ax=ax, label="concordance")
  ax.set_title("pairwise concordance of summaries")
  out["concordance"] = pages.png(fig)
  plt.close(fig)
  return out


def to_html(report: SelectionReport) -> str:

  head, rows = _rows(report)
  names = list(report.pairwise)
  pairwise = pages.html_table(["", *names], [[a, *(f"{report.pairwise[a][b]:.2f}" for b in names)] for a in names])
  s = report.selection
  return pages.html_page("tailjax select", f"{len(report.table)} checkpoints; selected by {s.rule}: {s.selected}",
                         [pages.html_table(head, rows), pairwise], _notes(report), plots(report))


def write(report: SelectionReport, output: str | Path) -> None:
  """``selection.json`` (the contract), ``selection.md`` and a self-contained ``selection.html``."""
  output = Path(output)
  output.mkdir(parents=True, exist_ok=True)
  files.write_atomic(output / "selection.json", files.json_text(report.to_dict(), indent=2), "the selection")
  files.write_atomic(output / "selection.md", to_markdown(report), "the Markdown selection")
  files.write_atomic(output / "selection.html", to_html(report), "the HTML selection")
