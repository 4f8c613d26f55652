"""``tailjax`` command line: thin wrappers over functions a user can call from Python."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console

from tailjax import __version__


@click.group()
@click.version_option(__version__)
def main() -> None:
  """Judge and train language models by the shape of their per-token loss."""


@main.command()
@click.argument("tables", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--by", default="median", show_default=True, help="Summary that selects: mean, median or pNN.")
@click.option("--summaries", default="mean,median,p90,p99", show_default=True,
              help="Comma-separated summaries whose concordance is reported.")
@click.option("--task-scores", type=click.Path(path_type=Path), help="CSV name,score to correlate summaries with.")
@click.option("--output", type=click.Path(path_type=Path), help="Directory for selection.json.")
def select(tables: tuple[Path, ...], by: str, summaries: str, task_scores: Path | None, output: Path | None) -> None:
  """Select a checkpoint from summary TABLES (CSV with a name column, or JSON), with concordance diagnostics."""
  from tailjax import select as selection

  console = Console()
  try:
    table: dict[str, dict[str, float]] = {}
    for path in tables:
      part = selection.read_table(path)
      clash = sorted(set(part) & set(table))
      if clash:
        raise ValueError(f"{path}: checkpoints {clash[:5]} already came from an earlier table")
      table.update(part)
    scores = selection.read_scores(task_scores) if task_scores else None
    report = selection.select_checkpoints(table, by=by, summaries=[s for s in summaries.split(",") if s],
                                          scores=scores)
  except (ValueError, FileNotFoundError) as err:
    raise click.ClickException(str(err)) from None
  selection.render(report, console)
  if output:
    output.mkdir(parents=True, exist_ok=True)
    (output / "selection.json").write_text(json.dumps(report.to_dict(), indent=2))
    console.print(f"wrote {output / 'selection.json'}")


if __name__ == "__main__":
  sys.exit(main())
