"""Block-bootstrap confidence intervals from per-block sketches.

Tokens of one sequence are not independent, so an interval that treats them as such is
too narrow. Instead each block of sequences keeps its own sketch; a bootstrap replicate
redraws blocks with replacement and *merges their sketches* (a weighted sum of counts),
so any statistic a sketch can answer (mean, quantiles, spike rates) gets an interval at
the cost of one matrix product.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from tailjax.stats.sketch import HostHistogram


def block_bootstrap(blocks: Sequence[HostHistogram], statistics: Mapping[str, Callable[[HostHistogram], float]],
                    replicates: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float]]:
  """``{name: (low, high)}`` percentile intervals of each statistic over block resamples.

  With fewer than two blocks there is nothing to resample: the intervals are NaN.
  """
  if len(blocks) < 2:
    return {name: (float("nan"), float("nan")) for name in statistics}
  spec = blocks[0].spec
  counts = np.stack([b.counts for b in blocks]).astype(np.float64)
  nan = np.array([b.nan for b in blocks], np.float64)
  totals = np.array([b.total for b in blocks])
  lo, hi = min(b.min for b in blocks), max(b.max for b in blocks)
  rng = np.random.default_rng(seed)
  weights = rng.multinomial(len(blocks), np.full(len(blocks), 1 / len(blocks)), size=replicates).astype(np.float64)
  resampled_counts = (weights @ counts).astype(np.int64)
  resampled_nan, resampled_totals = (weights @ nan).astype(np.int64), weights @ totals
  values = {name: np.empty(replicates) for name in statistics}
  for r in range(replicates):
    sketch = HostHistogram(spec, resampled_counts[r], int(resampled_nan[r]), float(resampled_totals[r]), lo, hi)
    for name, statistic in statistics.items():
      values[name][r] = statistic(sketch)
  tail = (1 - level) / 2
  interval = lambda v: (float(np.nanquantile(v, tail)), float(np.nanquantile(v, 1 - tail))) if np.any(v == v) else (
      float("nan"), float("nan"))
  return {name: interval(v) for name, v in values.items()}


def paired_block_bootstrap(a_blocks: Sequence[HostHistogram], b_blocks: Sequence[HostHistogram],
                           holds: Callable[[HostHistogram, HostHistogram], bool], replicates: int = 1000,
                           seed: int = 0) -> float:
  """The share of block resamples in which ``holds(a, b)`` is true, ``a`` and ``b`` resampled with the *same*
  blocks (two candidates scored on the same windows: their block-to-block variation is shared, so a difference
  between them is judged against its own noise, not against the sum of both). NaN with fewer than two blocks."""
  if len(a_blocks) != len(b_blocks):
    raise ValueError(f"paired blocks: {len(a_blocks)} and {len(b_blocks)} blocks")
  if len(a_blocks) < 2:
    return float("nan")
  rng = np.random.default_rng(seed)
  n = len(a_blocks)
  weights = rng.multinomial(n, np.full(n, 1 / n), size=replicates).astype(np.float64)

  def resampled(blocks):
    counts = (weights @ np.stack([b.counts for b in blocks]).astype(np.float64)).astype(np.int64)
    nan = (weights @ np.array([b.nan for b in blocks], np.float64)).astype(np.int64)
    totals = weights @ np.array([b.total for b in blocks])
    lo, hi = min(b.min for b in blocks), max(b.max for b in blocks)
    return [HostHistogram(blocks[0].spec, counts[r], int(nan[r]), float(totals[r]), lo, hi) for r in range(replicates)]

  return float(np.mean([holds(a, b) for a, b in zip(resampled(a_blocks), resampled(b_blocks))]))
