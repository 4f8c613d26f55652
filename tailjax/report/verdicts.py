"""Verdicts between candidates from their KLD summaries: who dominates whom (median and p99), and whether mean and
median rank them alike; with paired block resamples, how often each holds."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from tailjax.stats.numbers import share as percent
from tailjax.stats import Summary, compare


class PairedShares(NamedTuple):
  """Shares of paired block resamples (``stats.bootstrap.paired_resamples``) over candidates ``(a, b)``:
  ``dominates[(a, b)]`` where ``a``'s median and p99 KLD are both no higher than ``b``'s, ``split[(a, b)]``
  (``a`` before ``b`` in candidate order) where mean and median order the pair differently."""

  dominates: dict[tuple[str, str], float]
  split: dict[tuple[str, str], float]


def compare_candidates(summaries: dict[str, Summary], shares: PairedShares | None = None) -> dict[str, Any]:
  """Dominance verdicts (median and p99 KLD, ``stats.compare``) and whether mean and median rank alike, from each
  candidate's KLD ``Summary`` (in candidate order).

  With ``shares`` (``tailjax.eval.summaries.paired_shares``: the run's blocks are at hand) each dominance verdict, and a mean/median
  disagreement, says in what share of paired block resamples it holds. A candidate with non-finite KLD tokens
  is ranked after every finite one (fewest non-finite first) and gets no dominance verdict: its finite part's
  figures say nothing about the tokens it lost."""
  names = list(summaries)
  verdicts = []
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      verdict = compare(summaries[a], summaries[b], (a, b))
      text = verdict.text
      share = None if shares is None or verdict.winner is None else \
          shares.dominates[(verdict.winner, b if verdict.winner == a else a)]
      if share is not None and math.isfinite(share):
        text += f"; median and p99 no higher in {percent(share)} of paired block resamples"
      verdicts.append(text)
  nonfinite = {n: summaries[n].nonfinite for n in names if summaries[n].nonfinite}
  value = lambda x: math.inf if math.isnan(x) else x  # a candidate with no finite KLD
  rank = lambda stat: sorted(names, key=lambda n: (nonfinite.get(n, 0), value(stat(summaries[n]))))
  by_mean, by_median = rank(lambda s: s.mean), rank(lambda s: s.median)
  note = None
  if by_mean != by_median:
    note = (f"mean and median KLD rank the candidates differently: by mean {' < '.join(by_mean)}, "
            f"by median {' < '.join(by_median)}")
    split = [(a, b, share) for (a, b), share in (shares.split if shares else {}).items()
             if (by_mean.index(a) < by_mean.index(b)) != (by_median.index(a) < by_median.index(b))]
    if split:
      note += "; the split persists in " + ", ".join(f"{percent(share)} of paired block resamples for {a} vs {b}"
                                                     for a, b, share in split)
      note += " (near 100%: beyond noise; near 50% or below: within it)"
  return {"verdicts": verdicts, "rank_by_mean": by_mean, "rank_by_median": by_median, "mean_median_disagree": note,
          "nonfinite": nonfinite}
