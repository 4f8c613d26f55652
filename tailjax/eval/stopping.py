"""Stop an evaluation once its intervals are narrow enough (``--until-ci X``).

After each batch, every candidate's KLD blocks (``tailjax.eval.state``) are resampled (block bootstrap,
``tailjax.stats.bootstrap``, the same resamples as the report's intervals) and the full width of the 95% interval
of each chosen summary is compared with the summary itself: relative width ``(high - low) / |value|`` (0 when the
interval is a point, as for a candidate identical to the reference). The interval the rule checked last is the
one the report prints. The run stops when every width is at most ``X`` and the blocks are enough to trust an interval
(``MIN_RELIABLE_BLOCKS``). On a 70B pair that is hours saved; the report says how many windows it took.

Windows are then scored in a seeded random order (``data.Windows.shuffled``), so the windows used are a random
sample of the corpus, not its first pages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from tailjax.eval.state import EvalState
from tailjax.stats.bootstrap import MIN_RELIABLE_BLOCKS, REPLICATES, block_bootstrap
from tailjax.stats.sketch import HostHistogram
from tailjax.stats.summary import HEADLINE_QUANTILES

# Summaries an early stop can wait for: their value on a sketch.
STATISTICS = {"mean": lambda s: s.mean,
              **{name: (lambda s, q=q: s.quantile(q)) for name, q in HEADLINE_QUANTILES.items()}}
DEFAULT_SUMMARIES = ("median",)


class Precision(NamedTuple):
  """How precisely a run knows each candidate's KLD summaries: ``widths[candidate][summary]`` the 95% interval's
  width relative to the value (NaN: no interval yet), from ``blocks`` blocks."""

  widths: dict[str, dict[str, float]]
  blocks: int

  def within(self, relative_width: float) -> bool:
    """Every width at most ``relative_width``, from enough blocks to trust the intervals."""
    return self.blocks >= MIN_RELIABLE_BLOCKS and all(
        w <= relative_width for by_summary in self.widths.values() for w in by_summary.values())


def check_summaries(summaries: Sequence[str]) -> tuple[str, ...]:
  unknown = [s for s in summaries if s not in STATISTICS]
  if unknown or not summaries:
    raise ValueError(f"until-ci summaries {', '.join(unknown) or '(none)'}: choose from {', '.join(STATISTICS)}")
  return tuple(summaries)


def _relative(low: float, high: float, value: float) -> float:
  if not (math.isfinite(low) and math.isfinite(high)):
    return math.nan
  if high == low:
    return 0.0
  return (high - low) / abs(value) if value else math.inf


def kld_precision(state: EvalState, summaries: Sequence[str] = DEFAULT_SUMMARIES) -> Precision:
  """``Precision`` of every candidate's KLD ``summaries`` in ``state`` (block bootstrap of its blocks)."""
  chosen = {name: STATISTICS[name] for name in check_summaries(summaries)}
  widths = {}
  for label in state.labels[1:]:
    if "kld" not in state.blocks:
      widths[label] = {name: math.nan for name in chosen}
      continue
    blocks = state.sketches("kld", label)
    merged: HostHistogram = blocks.merged()
    intervals = block_bootstrap(blocks, chosen, REPLICATES)
    widths[label] = {name: _relative(*intervals[name], float(np.float64(chosen[name](merged)))) for name in chosen}
  return Precision(widths, state.num_blocks)
