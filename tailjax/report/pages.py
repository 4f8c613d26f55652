"""What reports are made of: Markdown and HTML tables, self-contained HTML pages, PNG figures, colours.

``tailjax.report`` (eval) and ``tailjax.selection`` (selection) build their pages from these, so both look and
read alike; their numbers follow one rule (``tailjax.stats.numbers``). Colours: ``colors`` gives each model one colour in every plot of a page; ``run_shades`` gives
each run of a selection one hue and its checkpoints shades of it, darker with the step.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable


def markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
  """Lines of a Markdown table."""
  return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def html_table(head: list[str], rows: list[list[str]], left: Iterable[int] = ()) -> str:
  """A table: the first column and those in ``left`` (text, such as decoded tokens) left-aligned, numbers right."""
  left = set(left)
  align = lambda i: ' style="text-align:left"' if i in left else ""
  cells = "".join(f"<th{align(i)}>{html.escape(h)}</th>" for i, h in enumerate(head))
  body = "".join("<tr>" + "".join(f"<td{align(i)}>{html.escape(c)}</td>" for i, c in enumerate(row)) + "</tr>"
                 for row in rows)
  return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def html_page(title: str, subtitle: str, tables: list[str], notes: list[str], images: dict[str, str],
              sections: Iterable[tuple[str, str]] = ()) -> str:
  """A self-contained page: tables, a list of notes, base64 PNG figures, then ``(heading, html)`` sections."""
  figures = "".join(f'<figure><img alt="{name}" src="data:image/png;base64,{png}"></figure>'
                    for name, png in images.items())
  items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
  after = "".join(f"<h2>{html.escape(heading)}</h2>{body}" for heading, body in sections)
  style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
           "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,"
           "th:first-child{text-align:left}figure{display:inline-block;margin:0.5em}code{white-space:pre}")
  return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}"
          f"</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p>{''.join(tables)}"
          f"<ul>{items}</ul>{figures}{after}</body></html>")


def png(figure) -> str:
  """A matplotlib figure as a base64 PNG (for ``html_page``)."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
  return base64.b64encode(buffer.getvalue()).decode()


def colors(names: Iterable[str]) -> dict[str, str]:
  """One colour per name, in order (matplotlib's ``tab10``, then ``tab20``): the same model keeps its colour in
  every plot of a page."""
  import matplotlib

  names = list(dict.fromkeys(names))
  palette = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
  return {name: matplotlib.colors.to_hex(palette(i % palette.N)) for i, name in enumerate(names)}


def run_shades(points: dict[str, list[tuple[int, str]]]) -> dict[str, str]:
  """``{run: [(step, checkpoint), ...]}`` -> a colour per checkpoint: one hue per run (``colors``), lighter for
  earlier steps, the run's last step at full strength."""
  import matplotlib
  import numpy as np

  hues = colors(points)
  out = {}
  for run, steps in points.items():
    base = np.asarray(matplotlib.colors.to_rgb(hues[run]))
    ordered = sorted(steps)
    for i, (_, name) in enumerate(ordered):
      strength = 0.35 + 0.65 * (i + 1) / len(ordered)
      out[name] = matplotlib.colors.to_hex(1 - strength * (1 - base))
  return out
