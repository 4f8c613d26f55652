"""Per-block sketches of one quantity, held sparse: what a block bootstrap resamples.

Tokens of one window are not independent, windows (nearly) are. An evaluation therefore keeps one sketch per
*block* of consecutive windows: one window per block, as long as they fit in memory. A window's sketch touches
at most as many slots as it has tokens (a few hundred of the spec's ~7.4k), so each block stores only its
nonzero slots and their counts (``slots, counts``) beside its NaN count, compensated total, min and max.

Merging is exact integer addition, so a block of several windows is the merge of theirs, and the run's sketch
is the merge of every block (``merged``). Past a memory budget neighbours are merged in pairs (``pairs_merged``):
the blocks stay consecutive and equal-sized, and the intervals get only a little coarser (measured in
tests/test_eval.py: coverage on real text).

A bootstrap replicate draws blocks with replacement: ``resample(weights)`` merges them with weights
``[replicates, blocks]`` (one product per chunk of blocks made dense).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from tailjax.stats.sketch import BucketSpec, HostHistogram

_DENSE_CHUNK = 256  # blocks made dense at once by ``resample``: 256 x 7.4k float64 = 15 MB


class SparseSketch(NamedTuple):
  """One block's sketch: ``slots: int32 [k]`` increasing nonzero slots of the spec's count vector, ``counts:
  int64 [k]`` their counts; ``nan`` NaN values, ``total`` the sum of finite values (float64), ``min``/``max``
  of the non-NaN values (+inf/-inf when empty)."""

  slots: np.ndarray
  counts: np.ndarray
  nan: int
  total: float
  min: float
  max: float

  @classmethod
  def from_dense(cls, counts: np.ndarray, nan: int, total: float, lo: float, hi: float) -> SparseSketch:
    slots = np.flatnonzero(counts).astype(np.int32)
    return cls(slots, np.asarray(counts, np.int64)[slots], int(nan), float(total), float(lo), float(hi))

  def merge(self, other: SparseSketch) -> SparseSketch:
    slots, where = np.unique(np.concatenate([self.slots, other.slots]), return_inverse=True)
    counts = np.zeros(len(slots), np.int64)
    np.add.at(counts, where, np.concatenate([self.counts, other.counts]))
    return SparseSketch(slots.astype(np.int32), counts, self.nan + other.nan, self.total + other.total,
                        min(self.min, other.min), max(self.max, other.max))

  def dense(self, spec: BucketSpec) -> HostHistogram:
    counts = np.zeros(spec.size, np.int64)
    counts[self.slots] = self.counts
    return HostHistogram(spec, counts, self.nan, self.total, self.min, self.max)

  @property
  def nbytes(self) -> int:
    return self.slots.nbytes + self.counts.nbytes + 32


class Blocks:
  """Consecutive blocks' sketches of one quantity (one spec), each a ``SparseSketch``. A sequence: ``len``,
  ``blocks[i]`` (a dense ``HostHistogram``)."""

  def __init__(self, spec: BucketSpec, sketches: Iterable[SparseSketch] = ()):
    self.spec = spec
    self.sketches: list[SparseSketch] = list(sketches)
    self.nbytes = sum(s.nbytes for s in self.sketches)  # kept up to date by ``append``

  @classmethod
  def of(cls, histograms: Sequence[HostHistogram]) -> Blocks:
    """Blocks from dense sketches (one per block)."""
    if not histograms:
      raise ValueError("no blocks: give at least one sketch")
    spec = histograms[0].spec
    if any(h.spec != spec for h in histograms):
      raise ValueError("blocks with different bucket specs")
    return cls(spec, (SparseSketch.from_dense(h.counts, h.nan, h.total, h.min, h.max) for h in histograms))

  def __len__(self) -> int:
    return len(self.sketches)

  def __getitem__(self, i: int) -> HostHistogram:
    return self.sketches[i].dense(self.spec)

  def append(self, sketch: SparseSketch, into_last: bool = False) -> None:
    """A new block, or (``into_last``) more windows of the last one."""
    if into_last and self.sketches:
      self.nbytes -= self.sketches[-1].nbytes
      sketch = self.sketches.pop().merge(sketch)
    self.sketches.append(sketch)
    self.nbytes += sketch.nbytes

  def merged(self) -> HostHistogram:
    """The sketch of every block together (exact)."""
    if not self.sketches:
      raise ValueError("no blocks to merge")
    weights = np.ones((1, len(self)))
    return self.resample(weights)[0]

  def pairs_merged(self) -> Blocks:
    """Neighbours merged in pairs (0 with 1, 2 with 3, ...; an odd last block stays alone): half the blocks."""
    s = self.sketches
    return Blocks(self.spec, (s[i].merge(s[i + 1]) if i + 1 < len(s) else s[i] for i in range(0, len(s), 2)))

  def resample(self, weights: np.ndarray) -> list[HostHistogram]:
    """One merged sketch per row of ``weights: [R, len(self)]`` (how often each block is drawn): the blocks'
    counts, NaNs and totals weighted and summed; min and max of the whole run."""
    weights = np.asarray(weights, np.float64)
    if weights.shape[-1] != len(self):
      raise ValueError(f"weights for {weights.shape[-1]} blocks, {len(self)} held")
    counts = np.zeros((len(weights), self.spec.size))
    for start in range(0, len(self), _DENSE_CHUNK):
      chunk = self.sketches[start:start + _DENSE_CHUNK]
      dense = np.zeros((len(chunk), self.spec.size))
      for row, sketch in enumerate(chunk):
        dense[row, sketch.slots] = sketch.counts
      counts += weights[:, start:start + len(chunk)] @ dense
    nan = weights @ np.array([s.nan for s in self.sketches], np.float64)
    totals = weights @ np.array([s.total for s in self.sketches])
    lo, hi = min(s.min for s in self.sketches), max(s.max for s in self.sketches)
    return [HostHistogram(self.spec, np.rint(c).astype(np.int64), int(round(n)), float(t), lo, hi)
            for c, n, t in zip(counts, nan, totals)]

  # Saving: flat arrays, so a state file holds any number of blocks.

  def to_arrays(self) -> dict[str, np.ndarray]:
    """``offsets [n+1]`` into ``slots``/``counts``, and ``scalars [n, 4]`` (nan, total, min, max)."""
    sizes = [len(s.slots) for s in self.sketches]
    return {"offsets": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
            "slots": np.concatenate([s.slots for s in self.sketches] or [np.zeros(0, np.int32)]),
            "counts": np.concatenate([s.counts for s in self.sketches] or [np.zeros(0, np.int64)]),
            "scalars": np.array([[s.nan, s.total, s.min, s.max] for s in self.sketches], np.float64).reshape(-1, 4)}

  @classmethod
  def from_arrays(cls, spec: BucketSpec, offsets, slots, counts, scalars) -> Blocks:
    return cls(spec, (SparseSketch(slots[a:b].astype(np.int32), counts[a:b].astype(np.int64), int(n), float(t),
                                   float(lo), float(hi))
                      for a, b, (n, t, lo, hi) in zip(offsets[:-1], offsets[1:], scalars)))
