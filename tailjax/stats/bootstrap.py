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


def _weights(blocks: int, replicates: int, seed: int) -> np.ndarray:
  """``[replicates, blocks]`` multinomial counts: how often each block is drawn in each resample."""
  rng = np.random.default_rng(seed)
  return rng.multinomial(blocks, np.full(blocks, 1 / blocks), size=replicates).astype(np.float64)


def _resample(blocks: Sequence[HostHistogram], weights: np.ndarray) -> list[HostHistogram]:
  """One merged sketch per row of ``weights``: the blocks' counts, NaNs and totals weighted and summed."""
  counts = (weights @ np.stack([b.counts for b in blocks]).astype(np.float64)).astype(np.int64)
  nan = (weights @ np.array([b.nan for b in blocks], np.float64)).astype(np.int64)
  totals = weights @ np.array([b.total for b in blocks])
  lo, hi = min(b.min for b in blocks), max(b.max for b in blocks)
  return [HostHistogram(blocks[0].spec, c, int(n), float(t), lo, hi) for c, n, t in zip(counts, nan, totals)]


def block_bootstrap(blocks: Sequence[HostHistogram], statistics: Mapping[str, Callable[[HostHistogram], float]],
                    replicates: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float]]:
  """``{name: (low, high)}`` percentile intervals of each statistic over block resamples.

  With fewer than two blocks there is nothing to resample: the intervals are NaN.
  """
  if len(blocks) < 2:
    return {name: (float("nan"), float("nan")) for name in statistics}
  resampled = _resample(blocks, _weights(len(blocks), replicates, seed))
  values = {name: np.array([statistic(sketch) for sketch in resampled]) for name, statistic in statistics.items()}
  tail = (1 - level) / 2
  interval = lambda v: (float(np.nanquantile(v, tail)), float(np.nanquantile(v, 1 - tail))) if np.any(v == v) else (
      float("nan"), float("nan"))
  return {name: interval(v) for name, v in values.items()}


def paired_resamples(blocks: Mapping[str, Sequence[HostHistogram]], replicates: int = 1000,
                     seed: int = 0) -> dict[str, list[HostHistogram]] | None:
  """Each label's blocks resampled with the *same* draws (candidates scored on the same windows: their
  block-to-block variation is shared, so a difference between them is judged against its own noise, not
  against the sum of both): ``{label: [replicates merged sketches]}``; None with fewer than two blocks."""
  sizes = {len(b) for b in blocks.values()}
  if len(sizes) > 1:
    raise ValueError(f"paired blocks: {' and '.join(str(len(b)) for b in blocks.values())} blocks")
  n = sizes.pop() if sizes else 0
  if n < 2:
    return None
  weights = _weights(n, replicates, seed)
  return {label: _resample(b, weights) for label, b in blocks.items()}


def paired_block_bootstrap(a_blocks: Sequence[HostHistogram], b_blocks: Sequence[HostHistogram],
                           holds: Callable[[HostHistogram, HostHistogram], bool], replicates: int = 1000,
                           seed: int = 0) -> float:
  """The share of paired block resamples (``paired_resamples``) in which ``holds(a, b)`` is true; NaN with fewer
  than two blocks."""
  resampled = paired_resamples({"a": a_blocks, "b": b_blocks}, replicates, seed)
  if resampled is None:
    return float("nan")
  return float(np.mean([holds(a, b) for a, b in zip(resampled["a"], resampled["b"])]))
