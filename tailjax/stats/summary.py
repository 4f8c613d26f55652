"""Summaries of one per-token quantity, of per-sequence perplexity, and comparisons of two.

A ``Summary`` is what a report prints for KLD or CE: the mean next to the median, the
tail percentiles, spike rates and how much of the mean the top 1% of tokens carry.
It keeps its sketch, so summaries of shards, batches or runs merge exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from tailjax.stats.numbers import figure
from tailjax.stats.sketch import BucketSpec, HostHistogram, LogHistogram

HEADLINE_QUANTILES = {"median": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99, "p99.9": 0.999}
EVERY_5TH = tuple(range(5, 100, 5))
DEFAULT_SPIKE_THRESHOLD = 0.5
# CE bands (nats) for the mass-redistribution view of top-K distillation (paper, appendix E).
DEFAULT_BANDS = (0.1, 0.5, 1.5, 4.0, 8.0)
PROFILE_PERCENTILES = (*EVERY_5TH, 99)


def spec_for(spike_thresholds: Iterable[float] = (DEFAULT_SPIKE_THRESHOLD,), bands: Iterable[float] = DEFAULT_BANDS,
             relative_accuracy: float = 0.005) -> BucketSpec:
  """Bucket spec whose thresholds make every spike rate and band mass exact."""
  return BucketSpec(relative_accuracy=relative_accuracy, thresholds=tuple(sorted({*spike_thresholds, *bands})))


@dataclasses.dataclass
class Summary:
  """Distribution of one per-token quantity, read off its sketch."""

  sketch: HostHistogram
  spike_thresholds: tuple[float, ...] = (DEFAULT_SPIKE_THRESHOLD,)
  bands: tuple[float, ...] = DEFAULT_BANDS

  @classmethod
  def from_sketch(cls, sketch: LogHistogram | HostHistogram, spike_thresholds=None, bands=None) -> Summary:
    host = sketch.host() if isinstance(sketch, LogHistogram) else sketch
    declared = host.spec.thresholds
    spikes = tuple(spike_thresholds) if spike_thresholds is not None else tuple(
        t for t in (DEFAULT_SPIKE_THRESHOLD,) if t in declared)
    bands = tuple(bands) if bands is not None else tuple(t for t in DEFAULT_BANDS if t in declared)
    for t in (*spikes, *bands):
      if t not in declared:
        raise ValueError(f"threshold {t} was not declared when the sketch was built (declared: {declared})")
    return cls(host, spikes, bands)

  @property
  def n(self) -> int:
    return self.sketch.n

  @property
  def nonfinite(self) -> int:
    """NaN and ±inf values: counted and reported, never averaged in."""
    return self.sketch.nan + self.sketch.n_inf

  @property
  def mean(self) -> float:
    return self.sketch.mean

  def quantile(self, q: float) -> float:
    return self.sketch.quantile(q)

  @property
  def median(self) -> float:
    return self.quantile(0.5)

  def percentiles(self, percents: Iterable[float] = EVERY_5TH) -> dict[str, float]:
    percents = tuple(percents)
    values = self.sketch.quantiles(np.asarray(percents) / 100)
    return {f"p{p:g}": float(v) for p, v in zip(percents, values)}

  def spike_rate(self, threshold: float | None = None) -> float:
    """Exact share of tokens above ``threshold`` (default: the first declared spike threshold)."""
    if threshold is None:
      if not self.spike_thresholds:
        return math.nan
      threshold = self.spike_thresholds[0]
    return self.sketch.fraction_above(threshold)

  def tail_share(self, top: float = 0.01) -> float:
    return self.sketch.tail_share(top)

  def band_mass(self) -> dict[str, float]:
    """Exact share of non-NaN tokens in each band ``(edge_i, edge_i+1]`` of ``bands``, open at both ends."""
    if not self.bands:
      return {}
    above = [1.0] + [self.sketch.fraction_above(t) for t in self.bands] + [0.0]
    names = [f"<{self.bands[0]:g}"] + [f"{a:g}-{b:g}" for a, b in zip(self.bands[:-1], self.bands[1:])]
    names.append(f">{self.bands[-1]:g}")
    return {name: above[i] - above[i + 1] for i, name in enumerate(names)}

  def standardized(self, percents: Iterable[float] = PROFILE_PERCENTILES) -> dict[str, float]:
    """IQR-standardized percentiles ``(P_q - P_50) / (P_75 - P_25)`` (paper, appendix F)."""
    percents = tuple(percents)
    p25, p50, p75 = self.sketch.quantiles([0.25, 0.5, 0.75])
    iqr = p75 - p25
    values = self.sketch.quantiles(np.asarray(percents) / 100)
    return {f"p{p:g}": float((v - p50) / iqr) if iqr > 0 else math.nan for p, v in zip(percents, values)}

  def merge(self, other: Summary) -> Summary:
    return Summary(self.sketch.merge(other.sketch), self.spike_thresholds, self.bands)

  def to_dict(self, with_sketch: bool = True) -> dict[str, Any]:
    d: dict[str, Any] = {"n": self.n, "nonfinite": self.nonfinite, "nan": self.sketch.nan, "mean": self.mean}
    d.update({name: self.quantile(q) for name, q in HEADLINE_QUANTILES.items()})
    d.update(min=self.sketch.min, max=self.sketch.max, percentiles=self.percentiles(),
             spike_rate=self.spike_rate(),
             spike_rates={f"{t:g}": self.spike_rate(t) for t in self.spike_thresholds},
             tail_share=self.tail_share(), band_mass=self.band_mass(), standardized=self.standardized())
    if with_sketch:
      d["sketch"] = self.sketch.to_dict()
      d["spike_thresholds"], d["bands"] = list(self.spike_thresholds), list(self.bands)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> Summary:
    return cls(HostHistogram.from_dict(d["sketch"]), tuple(d["spike_thresholds"]), tuple(d["bands"]))


def summarize(values, where=None, *, spike_thresholds: Iterable[float] = (DEFAULT_SPIKE_THRESHOLD,),
              bands: Iterable[float] = DEFAULT_BANDS, relative_accuracy: float = 0.005) -> Summary:
  """Summary of ``values`` (any shape; ``where`` masks them), sketched on the values' device."""
  spike_thresholds, bands = tuple(spike_thresholds), tuple(bands)
  spec = spec_for(spike_thresholds, bands, relative_accuracy)
  sketch = _add(LogHistogram.empty(spec), jnp.asarray(values), None if where is None else jnp.asarray(where, bool))
  return Summary(sketch.host(), spike_thresholds, bands)


@jax.jit
def _add(sketch: LogHistogram, values, where) -> LogHistogram:
  return sketch.add(values, where)


# --------------------------------------------------------------------------------------------
# Per-sequence perplexity (the "Mean Perplexity Is Lying to You" protocol).


@dataclasses.dataclass
class SequenceSummary:
  """Perplexity per sequence from per-sequence CE sums and token counts (exact, float64)."""

  ce_sums: np.ndarray  # [S] summed token CE of each sequence (nats)
  token_counts: np.ndarray  # [S] scored tokens of each sequence
  outlier_ppl: float = 100.0

  def __post_init__(self):
    self.ce_sums = np.asarray(self.ce_sums, np.float64)
    self.token_counts = np.asarray(self.token_counts, np.int64)
    if self.ce_sums.shape != self.token_counts.shape:
      raise ValueError(f"ce_sums {self.ce_sums.shape} and token_counts {self.token_counts.shape} differ in shape")

  @property
  def ppl(self) -> np.ndarray:
    """[S] per-sequence perplexity (NaN for sequences with no scored token)."""
    with np.errstate(divide="ignore", invalid="ignore"):
      return np.exp(self.ce_sums / self.token_counts)

  @property
  def corpus_ppl(self) -> float:
    """Token-weighted: ``exp(sum CE / sum tokens)``, the number the field reports."""
    total = self.token_counts.sum()
    return float(np.exp(self.ce_sums.sum() / total)) if total else math.nan

  def worst(self, count: int = 5) -> list[int]:
    ppl = np.where(self.token_counts > 0, self.ppl, -np.inf)
    return [int(i) for i in np.argsort(-ppl, kind="stable")[:count]]

  def to_dict(self) -> dict[str, Any]:
    """Quantiles over sequences with a finite PPL; those with NaN/inf CE are counted apart."""
    ppl = self.ppl[self.token_counts > 0]
    finite = ppl[np.isfinite(ppl)]
    q = np.quantile(finite, [0.5, 0.95, 0.99]) if finite.size else [math.nan] * 3
    return {"sequences": int(ppl.size), "nonfinite": int(ppl.size - finite.size), "corpus_ppl": self.corpus_ppl,
            "median_ppl": float(q[0]),
            "p95_ppl": float(q[1]), "p99_ppl": float(q[2]), "outlier_threshold": self.outlier_ppl,
            "outliers": int(np.sum(finite > self.outlier_ppl)), "worst": self.worst()}


# --------------------------------------------------------------------------------------------
# Comparing two candidates (the "lower median AND lower p99" rule).


@dataclasses.dataclass(frozen=True)
class Verdict:
  winner: str | None  # name of the dominating candidate; None for a trade-off, a tie or no verdict
  text: str


def compare(a: Summary, b: Summary, names: tuple[str, str] = ("A", "B")) -> Verdict:
  """A dominates B when its median and p99 are both no higher and one is lower; equal on both, they are equal;
  otherwise it is a trade-off. A summary with non-finite values (NaN/Inf, counted apart from its sketch) gets no
  verdict: its median and p99 describe only its finite part.

  The text names the candidates in the order it speaks of them (the winner first) and puts each one's median and
  p99 beside its own name."""
  broken = [f"{name} has {s.nonfinite} non-finite of {s.n} values" for name, s in zip(names, (a, b))
            if s.nonfinite]
  if broken:
    return Verdict(None, f"no verdict between {names[0]} and {names[1]}: {'; '.join(broken)}")
  (ma, pa), (mb, pb) = (a.median, a.quantile(0.99)), (b.median, b.quantile(0.99))
  figures = {names[0]: (ma, pa), names[1]: (mb, pb)}
  numbers = lambda first, second: "; ".join(
      f"{name} median {figure(figures[name][0])}, p99 {figure(figures[name][1])}" for name in (first, second))
  if ma == mb and pa == pb:
    return Verdict(None, f"{names[0]} and {names[1]} are equal ({numbers(*names)})")
  if ma <= mb and pa <= pb:
    return Verdict(names[0], f"{names[0]} dominates {names[1]} ({numbers(*names)})")
  if mb <= ma and pb <= pa:
    return Verdict(names[1], f"{names[1]} dominates {names[0]} ({numbers(names[1], names[0])})")
  return Verdict(None, f"trade-off between {names[0]} and {names[1]} ({numbers(*names)})")


def profile_distance(a: Summary, b: Summary, percents: Iterable[float] = PROFILE_PERCENTILES) -> float:
  """L2 distance between IQR-standardized percentile profiles (paper, appendix F)."""
  za, zb = a.standardized(percents), b.standardized(percents)
  return float(np.sqrt(sum((za[k] - zb[k])**2 for k in za)))
