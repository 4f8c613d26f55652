import json

import jax
import numpy as np
import pytest

from tailjax import stats
from tailjax.stats.numbers import figure


def test_summarize_contract(rng):
  x = np.concatenate([rng.lognormal(np.log(1e-3), 1.5, 99_000), rng.lognormal(np.log(5), 1, 1_000)])
  x = x.astype(np.float32).reshape(100, 1000)
  s = stats.summarize(x, spike_thresholds=(0.5, 1.0))
  d = s.to_dict()
  for key in ("n", "mean", "median", "p90", "p95", "p99", "p99.9", "min", "max", "spike_rate", "tail_share",
              "nonfinite", "percentiles", "band_mass", "standardized"):
    assert key in d
  x64 = x.astype(np.float64).ravel()
  assert s.mean == pytest.approx(x64.mean(), rel=1e-6)
  for name, q in stats.summary.HEADLINE_QUANTILES.items():
    assert d[name] == pytest.approx(np.quantile(x64, q, method="lower"), rel=0.005)
  assert list(d["percentiles"]) == [f"p{p}" for p in range(5, 100, 5)]
  assert d["spike_rate"] == np.mean(x > 0.5) and d["spike_rates"]["1"] == np.mean(x > 1.0)
  assert sum(d["band_mass"].values()) == pytest.approx(1.0)
  assert d["band_mass"][">8"] == np.mean(x > 8.0)
  assert d["band_mass"]["0.5-1.5"] == pytest.approx(np.mean((x > 0.5) & (x <= 1.5)))
  back = stats.Summary.from_dict(json.loads(json.dumps(d)))
  assert back.to_dict(with_sketch=False) == s.to_dict(with_sketch=False)


def test_masks_and_merge_equal_one_pass(rng):
  x = rng.lognormal(0, 2, (4, 500)).astype(np.float32)
  where = rng.random((4, 500)) > 0.5
  whole = stats.summarize(x, where)
  halves = stats.summarize(x[:2], where[:2]).merge(stats.summarize(x[2:], where[2:]))
  np.testing.assert_array_equal(halves.sketch.counts, whole.sketch.counts)
  assert whole.n == where.sum()
  assert whole.mean == pytest.approx(x[where].astype(np.float64).mean(), rel=1e-6)


def test_nonfinite_are_reported():
  s = stats.summarize(np.array([0.1, np.nan, np.inf, 0.2], np.float32))
  assert s.nonfinite == 2 and s.to_dict()["nan"] == 1
  assert s.mean == pytest.approx(0.15)


def test_standardized_percentiles_and_profile_distance(rng):
  a = rng.lognormal(0, 1, 50_000).astype(np.float32)
  b = np.concatenate([a[:-2000], rng.lognormal(3, 1, 2000)]).astype(np.float32)
  sa, sb = stats.summarize(a), stats.summarize(b)
  p = np.quantile(a.astype(np.float64), [0.25, 0.5, 0.75, 0.99], method="lower")
  assert sa.standardized()["p99"] == pytest.approx((p[3] - p[1]) / (p[2] - p[0]), rel=0.03)
  assert stats.profile_distance(sa, sa) == 0.0
  assert stats.profile_distance(sa, sb) > 1.0  # b's upper tail extends after robust scaling
  assert sb.standardized()["p99"] > sa.standardized()["p99"]


def test_compare_rule():
  low = stats.summarize(np.linspace(0.0, 1.0, 1001, dtype=np.float32))
  high = stats.summarize(np.linspace(0.5, 2.0, 1001, dtype=np.float32))
  spiky = stats.summarize(np.concatenate([np.full(980, 0.1), np.full(20, 50.0)]).astype(np.float32))
  assert stats.compare(low, high, ("int4", "int3")).winner == "int4"
  assert stats.compare(high, low, ("int3", "int4")).winner == "int4"
  verdict = stats.compare(spiky, low, ("A", "B"))
  assert verdict.winner is None and verdict.text.startswith("trade-off") and "p99" in verdict.text
  same = stats.compare(low, stats.summarize(np.linspace(0.0, 1.0, 1001, dtype=np.float32)), ("A", "B"))
  assert same.winner is None and same.text.startswith("A and B are equal")
  tied_median = stats.summarize(np.concatenate([np.linspace(0.0, 1.0, 1001), [0.5] * 50]).astype(np.float32))
  assert tied_median.median == low.median and tied_median.quantile(0.99) < low.quantile(0.99)
  assert stats.compare(low, tied_median, ("A", "B")).winner == "B"  # as good at the median, better in the tail
  # each number beside its own name, whichever way round the winner was passed
  for pair in ((low, high, ("x:int4", "y:int3")), (high, low, ("y:int3", "x:int4"))):
    text = stats.compare(*pair).text
    assert text.startswith("x:int4 dominates y:int3")
    assert f"x:int4 median {figure(low.median)}, p99 {figure(low.quantile(0.99))}" in text  # the pages' number rule
    assert f"y:int3 median {figure(high.median)}, p99 {figure(high.quantile(0.99))}" in text
    assert text.index("x:int4 median") < text.index("y:int3 median")
  broken = stats.summarize(np.concatenate([np.linspace(0.0, 0.1, 600), [np.nan] * 300, [np.inf] * 100]))
  verdict = stats.compare(broken, high, ("nan", "B"))
  assert verdict.winner is None and "nan has 400 non-finite of 1000 values" in verdict.text


def test_candidates_with_non_finite_tokens_rank_last_and_get_no_verdict():
  from tailjax import report

  summary = lambda values: stats.summarize(np.asarray(values, np.float32))
  good = np.linspace(0.01, 1.0, 300)
  cands = {"cand": good, "nan": np.concatenate([good[:200] / 100, [np.nan] * 100]), "allnan": [np.nan] * 300,
           "twin": good}
  comparison = report.compare_candidates({k: summary(v) for k, v in cands.items()})
  assert comparison["rank_by_mean"] == comparison["rank_by_median"] == ["cand", "twin", "nan", "allnan"]
  assert comparison["nonfinite"] == {"nan": 100, "allnan": 300}
  assert "cand and twin are equal" in comparison["verdicts"][2]
  assert all(v.startswith("no verdict") for v in comparison["verdicts"] if "nan" in v)


def test_sequence_summary():
  ce = np.array([10.0, 20.0, 300.0, 0.0, 5.0])
  n = np.array([10, 10, 50, 0, 5])
  s = stats.SequenceSummary(ce, n, outlier_ppl=100.0)
  ppl = np.exp(np.array([1.0, 2.0, 6.0, 1.0]))
  d = s.to_dict()
  assert d["corpus_ppl"] == pytest.approx(np.exp(335 / 75))
  assert d["sequences"] == 4
  assert d["median_ppl"] == pytest.approx(np.median(ppl))
  assert d["p99_ppl"] == pytest.approx(np.quantile(ppl, 0.99))
  assert d["outliers"] == 1 and d["worst"][:2] == [2, 1]
  with pytest.raises(ValueError, match="differ in shape"):
    stats.SequenceSummary(ce, n[:3])


def test_from_device_sketch_equals_summarize(rng):
  x = rng.lognormal(-3, 2, 5000).astype(np.float32)
  spec = stats.spec_for(spike_thresholds=(0.5, 2.0))
  sketch = stats.LogHistogram.empty(spec).add(x)
  via_sketch = stats.Summary.from_sketch(sketch, spike_thresholds=(0.5, 2.0))
  direct = stats.summarize(x, spike_thresholds=(0.5, 2.0))
  assert via_sketch.to_dict(with_sketch=False) == direct.to_dict(with_sketch=False)
  assert stats.Summary.from_sketch(sketch).spike_thresholds == (0.5,)  # defaults to the declared ones
  with pytest.raises(ValueError, match="threshold 0.7 was not declared"):
    stats.Summary.from_sketch(sketch, spike_thresholds=(0.7,))


def test_paired_block_bootstrap_judges_a_difference_against_its_own_noise(rng):
  """Two candidates on the same 12 blocks: the blocks differ a lot (a shared block effect), the candidates by a
  small constant factor. Unpaired intervals of the medians overlap; paired resamples find the order every time."""
  from tailjax.stats.bootstrap import block_bootstrap, paired_block_bootstrap

  spec = stats.spec_for()
  scale = rng.lognormal(0, 1, 12)  # block effect
  base = [rng.lognormal(-4, 0.3, 400) * s for s in scale]
  a = [stats.HostHistogram.from_sketch(stats.LogHistogram.empty(spec).add(x.astype(np.float32))) for x in base]
  b = [stats.HostHistogram.from_sketch(stats.LogHistogram.empty(spec).add((x * 1.1).astype(np.float32))) for x in base]
  median = {"median": lambda s: s.quantile(0.5)}
  (_, hi_a), (lo_b, _) = block_bootstrap(a, median)["median"], block_bootstrap(b, median)["median"]
  assert lo_b < hi_a  # unpaired: the intervals overlap
  lower = lambda x, y: x.quantile(0.5) < y.quantile(0.5)
  assert paired_block_bootstrap(a, b, lower) == 1.0 and paired_block_bootstrap(b, a, lower) == 0.0
  assert np.isnan(paired_block_bootstrap(a[:1], b[:1], lower))
  with pytest.raises(ValueError, match="12 and 11 blocks"):
    paired_block_bootstrap(a, b[:11], lower)


def test_paired_confidence_is_spread_for_exchangeable_candidates_and_certain_for_a_worse_one(rng):
  """Over 40 runs of two candidates drawn alike (exchangeable, block by block), the share of paired resamples in
  which a's median is lower is spread around 50% (it behaves like a p-value) and seldom looks certain; a
  candidate with noise added to every token is beaten in (nearly) every resample."""
  from tailjax.stats.blocks import Blocks
  from tailjax.stats.bootstrap import paired_block_bootstrap

  runs, blocks, tokens = 40, 12, 300
  scale = rng.lognormal(0, 0.5, (runs, blocks, 1))  # a block effect both candidates share
  a = rng.lognormal(-4, 1, (runs, blocks, tokens)) * scale
  b = rng.lognormal(-4, 1, (runs, blocks, tokens)) * scale
  worse = a + np.abs(rng.normal(0, 0.01, a.shape))
  sketches = window_sketch(np.concatenate([a, b, worse]).reshape(-1, tokens))
  held = lambda i: Blocks.of([stats.HostHistogram.from_sketch(jax.tree.map(lambda f, j=j: f[j], sketches))
                              for j in range(i * blocks, (i + 1) * blocks)])
  lower = lambda x, y: x.quantile(0.5) < y.quantile(0.5)
  shares = np.array([paired_block_bootstrap(held(r), held(runs + r), lower, 200) for r in range(runs)])
  assert 0.35 < shares.mean() < 0.65 and shares.std() > 0.15
  assert np.mean((shares > 0.975) | (shares < 0.025)) <= 0.15  # seldom "certain" either way
  certain = [paired_block_bootstrap(held(r), held(2 * runs + r), lower, 200) for r in range(5)]
  assert min(certain) > 0.99


def test_mean_median_disagreement_says_whether_it_is_beyond_noise(rng):
  """b has the lower median and a heavy tail in every block, so mean and median rank a and b differently, and the
  split survives every paired block resample; the report says so with the share."""
  from tailjax.eval import summaries
  from tailjax.eval.state import EvalState

  spec = stats.spec_for()
  sketch = lambda x: window_sketch(x, spec)
  state = EvalState(["ref", "a", "b"])
  for _ in range(10):
    a = rng.lognormal(-3, 0.3, 300)
    b = np.concatenate([rng.lognormal(-5, 0.3, 290), rng.lognormal(1, 0.3, 10)])
    state.add_windows({"ce": {"ref": sketch(a), "a": sketch(a), "b": sketch(b)}, "kld": {"a": sketch(a),
                       "b": sketch(b)}, "dp": {"a": sketch(a), "b": sketch(b)}}, 1)
    for label in state.labels:
      state.seq_ce[label].append(300.0)
    state.seq_tokens.append(300)
  comparison = summaries.build_report(state, {}, {"ref": "r", "a": "a", "b": "b"}, replicates=200)["comparison"]
  assert comparison["rank_by_mean"] == ["a", "b"] and comparison["rank_by_median"] == ["b", "a"]
  assert "the split persists in 100% of paired block resamples for a vs b" in comparison["mean_median_disagree"]
  assert comparison["verdicts"] == [next(v for v in comparison["verdicts"] if v.startswith("trade-off"))]


def window_sketch(values, spec=None, where=None):
  """Sketches of windows ``values: [n, k]`` (``where`` masks them) as the device gives them
  (``evaluate.batch_step``): every field with a leading window axis; one window given ``[k]``."""
  values = np.asarray(values, np.float32)
  one = values.ndim == 1
  values = values[None] if one else values
  where = np.ones(values.shape, bool) if where is None else where
  empty = stats.LogHistogram.empty(spec or stats.spec_for())
  return jax.tree.map(np.asarray, jax.vmap(lambda v, w: empty.add(v, w))(values, where))


def test_blocks_are_windows_until_the_budget_then_neighbours_merge(rng, tmp_path):
  """Per-window blocks, merged in consecutive pairs each time the sparse sketches pass the budget; every block
  holds the same number of windows but the last, the merge is exact, and a state saved and resumed mid-run
  ends with the same blocks as one run through."""
  from tailjax.eval.state import EvalState, load_state, save_state

  values = [rng.lognormal(-3, 1, 200) for _ in range(37)]
  whole = stats.HostHistogram.from_sketch(stats.LogHistogram.empty(stats.spec_for()).add(
      np.concatenate(values).astype(np.float32)))

  def add(state, windows):
    x = np.stack(windows)
    state.add_windows({"kld": {"a": window_sketch(x)}, "ce": {"a": window_sketch(-x), "ref": window_sketch(x)}},
                      len(x))

  roomy = EvalState(["ref", "a"])
  add(roomy, values)
  assert roomy.num_blocks == 37 and roomy.windows_per_block == 1
  budget = roomy.nbytes // 2  # merged blocks share slots, so at least one halving, likely more
  tight = EvalState(["ref", "a"], block_budget=budget)
  add(tight, values[:20])
  save_state(tight, tmp_path / "state.npz")
  resumed = load_state(tmp_path / "state.npz")
  add(resumed, values[20:])
  add(tight, values[20:])
  for state in (tight, resumed):
    per = state.windows_per_block
    assert state.nbytes <= budget < roomy.nbytes and per in (2, 4, 8, 16) and state.num_blocks == -(-37 // per)
    blocks = state.sketches("kld", "a")
    for i in range(state.num_blocks):
      window = np.concatenate(values[per * i:per * (i + 1)]).astype(np.float32)
      assert blocks[i].n == len(window) and blocks[i].total == pytest.approx(window.astype(np.float64).sum(), 1e-6)
    merged = state.merged("kld", "a")
    np.testing.assert_array_equal(merged.counts, whole.counts)
    assert (merged.min, merged.max) == (whole.min, whole.max)
    assert merged.total == pytest.approx(whole.total, rel=1e-6)  # float32 sums per window vs one
    np.testing.assert_array_equal(state.merged("ce", "ref").counts, whole.counts)
  assert [b.slots.tolist() for b in tight.sketches("ce", "a").sketches] == [
      b.slots.tolist() for b in resumed.sketches("ce", "a").sketches]


def test_block_resamples_equal_dense_weighted_sums(rng):
  """``Blocks.resample`` (sparse, densified in chunks) equals the weighted sum of the dense block sketches."""
  from tailjax.stats import blocks as blockmod

  values = np.where(np.arange(52) < 50 + np.arange(300)[:, None] % 3, rng.lognormal(-2, 2, (300, 52)), np.nan)
  batched = window_sketch(values, where=np.arange(52) < 50 + np.arange(300)[:, None] % 3 + 1)  # some NaNs
  dense = [stats.HostHistogram.from_sketch(jax.tree.map(lambda f, i=i: f[i], batched)) for i in range(300)]
  held = blockmod.Blocks.of(dense)
  assert len(held) == 300 and held.nbytes < sum(d.counts.nbytes for d in dense) / 20
  weights = rng.multinomial(300, np.full(300, 1 / 300), size=3).astype(np.float64)
  for row, got in zip(weights, held.resample(weights)):
    np.testing.assert_array_equal(got.counts, sum(int(w) * d.counts for w, d in zip(row, dense)))
    assert got.nan == sum(int(w) * d.nan for w, d in zip(row, dense))
    assert got.total == pytest.approx(sum(w * d.total for w, d in zip(row, dense)), rel=1e-12)
  with pytest.raises(ValueError, match="weights for 299 blocks, 300 held"):
    held.resample(weights[:, :299])


def test_every_kind_of_number_prints_by_one_rule():
  """``stats.numbers``: what every page and verdict prints."""
  from tailjax.stats import numbers

  assert [numbers.figure(x) for x in (0.0291, 122.0, 0.5, 12345.6, 1.23456e-7, float("inf"))] == \
      ["0.02910", "122.0", "0.5000", "12346", "1.235e-07", "inf"]  # trailing zeros kept: a column reads alike
  assert numbers.figure(None) == numbers.figure(float("nan")) == numbers.share(None) == "n/a"
  assert numbers.share(float("nan")) == "n/a"
  assert [numbers.share(x) for x in (0.7391, 0.087, 5.23e-4, 1.0, 0.0)] == ["73.9%", "8.70%", "0.0523%", "100%", "0%"]
  assert numbers.ratio(1.000123) == "1.0001" and numbers.error(0.001234) == "0.0012"
