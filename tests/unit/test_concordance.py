import itertools

import numpy as np
import pytest
from scipy import stats as scipy_stats

from tailjax import stats

# The paper's Table 2 (TinyStories, 250K steps): lower is better for every summary.
PAPER = {
    "teacher": {"mean": 1.442, "median": 0.609, "p99": 5.57},
    "full-kl": {"mean": 1.489, "median": 0.632, "p99": 5.73},
    "top40": {"mean": 1.520, "median": 0.620, "p99": 5.88},
    "top15": {"mean": 1.568, "median": 0.596, "p99": 6.37},
    "top5": {"mean": 1.708, "median": 0.525, "p99": 7.82},
}


def test_concordance_by_hand_counted_pairs():
  # Mean and p99 order the five checkpoints teacher < full-kl < top40 < top15 < top5;
  # median orders them top5 < top15 < teacher < top40 < full-kl. Of the 10 pairs, mean and
  # median agree only on (teacher, full-kl) and (teacher, top40).
  concordant = 0
  names = list(PAPER)
  for a, b in itertools.combinations(names, 2):
    signs = {np.sign(PAPER[a][s] - PAPER[b][s]) for s in ("mean", "median")}
    concordant += len(signs) == 1
  assert concordant == 2  # (teacher, full-kl) and (teacher, top40)
  assert stats.concordance(PAPER, ["mean", "median"]) == pytest.approx(2 / 10)
  assert stats.concordance(PAPER, ["mean", "p99"]) == 1.0
  assert stats.concordance(PAPER, ["mean", "median", "p99"]) == pytest.approx(2 / 10)


def test_two_summaries_equal_one_plus_kendall_tau_over_two(rng):
  for _ in range(5):
    x, y = rng.standard_normal(12), rng.standard_normal(12)
    table = {f"c{i}": {"x": x[i], "y": y[i]} for i in range(12)}
    tau = scipy_stats.kendalltau(x, y).statistic
    assert stats.concordance(table, ["x", "y"]) == pytest.approx((1 + tau) / 2)


def test_tie_rule():
  table = {"a": {"x": 1.0, "y": 1.0}, "b": {"x": 1.0, "y": 2.0}, "c": {"x": 1.0, "y": 1.0}}
  # (a,b): x ties, y orders -> discordant; (a,c): both tie -> concordant; (b,c): x ties, y orders -> discordant.
  assert stats.concordance(table, ["x", "y"]) == pytest.approx(1 / 3)


def test_pairwise_matrix_and_discordant_pairs():
  m = stats.pairwise_concordance(PAPER, ["mean", "median", "p99"])
  assert m["mean"]["mean"] == 1.0 and m["mean"]["median"] == m["median"]["mean"] == pytest.approx(0.2)
  assert ("teacher", "top5") in stats.discordant_pairs(PAPER)
  assert ("teacher", "full-kl") not in stats.discordant_pairs(PAPER)


def test_correlations_match_scipy():
  judge = {"teacher": 2.01, "full-kl": 1.92, "top40": 1.97, "top15": 2.00, "top5": 2.06}
  got = stats.correlations(PAPER, judge)
  med = [PAPER[n]["median"] for n in PAPER]
  score = [judge[n] for n in PAPER]
  assert got["median"]["pearson"] == pytest.approx(scipy_stats.pearsonr(med, score).statistic)
  assert got["median"]["spearman"] == pytest.approx(scipy_stats.spearmanr(med, score).statistic)
  assert got["median"]["spearman"] < -0.8 < 0 < got["mean"]["spearman"]  # the paper's finding
  with pytest.raises(ValueError, match="NaN task scores"):
    stats.correlations(PAPER, {**judge, "top5": float("nan")})


def test_selection_rules_regime_and_warning():
  with pytest.warns(UserWarning, match="mean selects teacher but median selects top5"):
    sel = stats.select(PAPER, by="median", summaries=("mean", "median", "p99"))
  assert sel.selected == "top5" and sel.selected_by["mean"] == "teacher" and sel.selected_by["p99"] == "teacher"
  assert sel.regime == "reshaping" and sel.concordance["mean,median"] == pytest.approx(0.2)
  assert sel.concordance["mean,median,p99"] == pytest.approx(0.2)
  uniform = {f"c{i}": {"mean": 3.0 - i * 0.1, "median": 1.0 - i * 0.05, "p99": 9 - i} for i in range(5)}
  sel = stats.select(uniform, summaries=("mean", "median", "p99"))
  assert sel.regime == "uniform improvement" and sel.warning is None and sel.selected == "c4"
  assert "mean and median pick the same" in sel.verdict


def test_one_verdict_when_orders_agree_but_picks_differ():
  """High concordance with different picks (the smoke recipe's case) is reshaping, not uniform improvement:
  the verdict and the warning cannot contradict each other, and the verdict states its threshold."""
  table = {"a": {"mean": 1.0, "median": 0.51}, "b": {"mean": 1.1, "median": 0.5}, "c": {"mean": 2, "median": 1},
           "d": {"mean": 3, "median": 2}, "e": {"mean": 4, "median": 3}}
  with pytest.warns(UserWarning, match="mean selects a but median selects b"):
    sel = stats.select(table, summaries=("mean", "median"))
  assert sel.concordance["mean,median"] == pytest.approx(0.9) and 0.9 >= stats.UNIFORM_CONCORDANCE
  assert sel.regime == "reshaping" and "reshapes" in sel.warning
  assert sel.verdict.startswith("reshaping (C(mean, median) = 0.90, uniform improvement needs >= 0.75")


def test_bad_tables():
  with pytest.raises(ValueError, match="at least two checkpoints"):
    stats.concordance({"a": {"mean": 1.0}}, ["mean"])
  with pytest.raises(ValueError, match="missing summaries"):
    stats.concordance({"a": {"mean": 1.0}, "b": {"median": 1.0}}, ["mean"])
  with pytest.raises(ValueError, match="NaN summaries"):
    stats.concordance({"a": {"mean": 1.0}, "b": {"mean": float("nan")}}, ["mean"])
