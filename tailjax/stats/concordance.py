"""Do a set of summaries tell one selection story over a checkpoint family?

``table`` maps a checkpoint name to its summaries (lower is better for every one),
e.g. ``{"top5-250k": {"mean": 1.708, "median": 0.525, "p99": 7.82}, ...}``.

Concordance (paper in ``shared/mission/001``, appendix A): the share of unordered
checkpoint pairs that every summary in a set orders the same way. Tie rule: a tie is
an order of its own, so a pair is concordant when all summaries put the same one
first *or* all tie it; a pair tied in one summary and ordered in another is not.
Without ties, the concordance of two summaries is ``(1 + Kendall's tau) / 2``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from typing import Iterable, Mapping

import numpy as np
from scipy import stats as scipy_stats

Table = Mapping[str, Mapping[str, float]]

# Concordance of {mean, median} at or above which a family counts as uniformly improving.
UNIFORM_CONCORDANCE = 0.75


def _matrix(table: Table, summaries: Iterable[str]) -> tuple[list[str], np.ndarray]:
  names = list(table)
  summaries = list(summaries)
  if len(names) < 2:
    raise ValueError(f"concordance needs at least two checkpoints, got {len(names)}")
  if not summaries:
    raise ValueError("concordance needs at least one summary")
  missing = [(n, s) for n in names for s in summaries if s not in table[n]]
  if missing:
    raise ValueError(f"missing summaries (checkpoint, summary): {missing[:5]}")
  values = np.array([[float(table[n][s]) for s in summaries] for n in names])
  if np.isnan(values).any():
    bad = [(names[i], summaries[j]) for i, j in zip(*np.nonzero(np.isnan(values)))]
    raise ValueError(f"NaN summaries cannot be ranked (checkpoint, summary): {bad[:5]}")
  return names, values


def concordance(table: Table, summaries: Iterable[str]) -> float:
  """Share of unordered checkpoint pairs on which all ``summaries`` agree (see module docstring)."""
  _, values = _matrix(table, summaries)
  signs = np.sign(values[:, None, :] - values[None, :, :])  # [C, C, S]
  agree = np.all(signs == signs[..., :1], axis=-1)
  upper = np.triu_indices(len(values), k=1)
  return float(np.mean(agree[upper]))


def pairwise_concordance(table: Table, summaries: Iterable[str]) -> dict[str, dict[str, float]]:
  """Concordance of every pair of summaries: the matrix a heat map shows."""
  summaries = list(summaries)
  return {a: {b: concordance(table, [a, b]) for b in summaries} for a in summaries}


def discordant_pairs(table: Table, a: str = "mean", b: str = "median") -> list[tuple[str, str]]:
  """Checkpoint pairs that ``a`` and ``b`` order differently."""
  names, values = _matrix(table, [a, b])
  signs = np.sign(values[:, None, :] - values[None, :, :])
  return [(names[i], names[j]) for i, j in itertools.combinations(range(len(names)), 2)
          if signs[i, j, 0] != signs[i, j, 1]]


def correlations(table: Table, scores: Mapping[str, float], summaries: Iterable[str] | None = None) -> dict:
  """Pearson and Spearman correlation of every summary with an external task score, per summary.

  Lower loss should go with a higher score, so a good summary correlates *negatively*.
  """
  names = [n for n in table if n in scores]
  if len(names) < 3:
    raise ValueError(f"correlations need at least three checkpoints with scores, got {len(names)}")
  y = np.array([float(scores[n]) for n in names])
  if np.isnan(y).any():
    raise ValueError(f"NaN task scores for: {[n for n, v in zip(names, y) if np.isnan(v)]}")
  summaries = list(summaries) if summaries is not None else list(next(iter(table.values())))
  _, values = _matrix({n: table[n] for n in names}, summaries)
  out = {}
  for j, s in enumerate(summaries):
    x = values[:, j]
    constant = np.ptp(x) == 0 or np.ptp(y) == 0
    out[s] = {"pearson": math.nan if constant else float(scipy_stats.pearsonr(x, y).statistic),
              "spearman": math.nan if constant else float(scipy_stats.spearmanr(x, y).statistic)}
  return out


def best_by(table: Table, summary: str) -> str:
  """Checkpoint with the lowest ``summary`` (ties: first in table order)."""
  names, values = _matrix(table, [summary])
  return names[int(np.argmin(values[:, 0]))]


@dataclasses.dataclass
class Selection:
  selected: str
  selected_by: dict[str, str]  # rule -> checkpoint
  rule: str
  concordance: dict[str, float]  # comma-joined summary set -> value
  regime: str  # "uniform improvement" or "reshaping": the one verdict (``verdict`` says why)
  discordant: list[tuple[str, str]]
  warning: str | None  # set when mean and median pick different checkpoints
  verdict: str = ""


def select(table: Table, by: str = "median", summaries: Iterable[str] = ("mean", "median", "p90", "p99"),
           uniform_threshold: float = UNIFORM_CONCORDANCE) -> Selection:
  """Pick a checkpoint by ``by`` (median by default) and say whether the choice of summary matters."""
  summaries = list(dict.fromkeys([*summaries, by]))
  rules = list(dict.fromkeys(["mean", "median", by, *summaries]))
  selected_by = {rule: best_by(table, rule) for rule in rules if all(rule in row for row in table.values())}
  if by not in selected_by:
    raise ValueError(f"summary {by!r} is missing from the table")
  conc = {"mean,median": concordance(table, ["mean", "median"]), ",".join(summaries): concordance(table, summaries)}
  c = conc["mean,median"]
  same_pick = selected_by.get("mean") == selected_by.get("median")
  # one verdict from both signals: a family improves uniformly only if mean and median agree on the order
  # (C at or above the threshold) and on the pick
  regime = "uniform improvement" if c >= uniform_threshold and same_pick else "reshaping"
  why = f"C(mean, median) = {c:.2f}, uniform improvement needs >= {uniform_threshold:g} and one pick"
  warning = None
  if not same_pick:
    warning = (f"mean selects {selected_by['mean']} but median selects {selected_by['median']}: the loss "
               f"distribution reshapes across this family ({why})")
    warnings.warn(warning, stacklevel=2)
  verdict = f"{regime} ({why}" + (f"; mean picks {selected_by['mean']}, median {selected_by['median']})"
                                  if not same_pick else "; mean and median pick the same)")
  return Selection(selected_by[by], selected_by, by, conc, regime, discordant_pairs(table), warning, verdict)
