"""Numbers as people read them, one rule everywhere a figure is printed (report pages, verdicts, selections):
values with 4 significant digits, shares as percentages with 3, values near 1 (PPL ratio, cosine) with 5, an
uncertainty (±) with 2; ``n/a`` where nothing finite was measured. Here, below ``stats.summary`` (whose verdicts
print figures) and ``tailjax.report.pages`` (which re-exports them)."""

from __future__ import annotations

import math


def figure(x: float | None, digits: int = 4) -> str:
  """A measured value (nats, perplexity, an error, a correlation) with 4 significant digits, trailing zeros kept
  (122.0, 0.02910), whole numbers past them as they are (12346, never 1.235e+04); ``n/a`` for a missing or NaN
  one (report.json stores those as null)."""
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "n/a"
  if math.isfinite(x) and abs(x) >= 10**digits:
    return f"{x:.0f}"
  return f"{x:#.{digits}g}".rstrip(".") if math.isfinite(x) else f"{x}"


def ratio(x: float | None) -> str:
  """A value near 1 (PPL ratio, cosine): 5 significant digits, so its distance from 1 keeps 3 or 4."""
  return figure(x, 5)


def error(x: float | None) -> str:
  """An uncertainty (the ± of a value): 2 significant digits."""
  return figure(x, 2)


def share(x: float | None) -> str:
  """A share or probability as a percentage with 3 significant digits (73.9%, 8.70%, 0.0523%, 100%, 0%); ``n/a``
  when missing or not finite."""
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "n/a"
  return "0%" if x == 0 else f"{figure(100 * x, 3)}%"
