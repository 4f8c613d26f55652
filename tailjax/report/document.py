"""``report.json``: the public contract of an eval run (other tools read it), written with its pages, read back,
several runs combined into one.

Per candidate a ``kld`` summary with ``mean``, ``median``, ``p90``, ``p95``, ``p99``, ``p99.9``, ``spike_rate`` and
``top1_agreement``; per model a ``ce`` summary with the same keys and ``ppl``. Every summary carries its serialized
sketch, so a saved report can be re-rendered, merged and compared (``tailjax report``) without the models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tailjax import __version__, files
from tailjax.report import run_pages
from tailjax.report.verdicts import compare_candidates
from tailjax.stats import Summary


def write(report: dict[str, Any], output) -> None:
  """``report.json``, ``report.md`` and ``report.html`` into the directory ``output``."""
  output = Path(output)
  output.mkdir(parents=True, exist_ok=True)
  files.write_atomic(output / "report.json", files.json_text(report), "the report")
  files.write_atomic(output / "report.md", run_pages.to_markdown(report), "the Markdown report")
  files.write_atomic(output / "report.html", run_pages.to_html(report), "the HTML report")


def read(path) -> dict[str, Any]:
  """A saved run: a directory holding ``report.json``, or the file itself."""
  path = Path(path)
  file = path / "report.json" if path.is_dir() else path
  try:
    result = json.loads(file.read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f"{file}: no such report (run tailjax eval --output {path} first)") from None
  except json.JSONDecodeError as err:
    raise ValueError(f"{file}: not a tailjax eval report ({err})") from err
  missing = {"run", "models", "candidates"} - set(result if isinstance(result, dict) else ())
  if missing:
    raise ValueError(f"{file}: not a tailjax eval report (no {sorted(missing)})")
  return result


def combine(reports: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
  """Several runs as one report: every model and candidate prefixed by its run's name."""
  combined: dict[str, Any] = {"tailjax_version": __version__, "reference": f"{names[0]}:{reports[0]['reference']}",
                              "run": {**reports[0]["run"], "corpus": ", ".join(r["run"]["corpus"] for r in reports)},
                              "models": {}, "candidates": {}}
  for name, r in zip(names, reports):
    if r["run"].get("fingerprint") != reports[0]["run"].get("fingerprint"):
      combined["run"]["note"] = "the runs scored different windows: compare their numbers with care"
    combined["models"].update({f"{name}:{k}": v for k, v in r["models"].items()})
    combined["candidates"].update({f"{name}:{k}": v for k, v in r["candidates"].items()})
  combined["comparison"] = compare_candidates({name: Summary.from_dict(c["kld"])
                                               for name, c in combined["candidates"].items()})
  return combined
