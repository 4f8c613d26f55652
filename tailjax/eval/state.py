"""What an evaluation has accumulated, on host: enough to resume, to stop early and to report.

Per quantity and model, one sketch per *block* of consecutive windows (``tailjax.stats.blocks``): one window
per block until the blocks pass ``block_budget`` bytes, then neighbours merged in pairs (and each later block
filled with as many windows). Block-bootstrap intervals (``tailjax.stats.bootstrap``) resample these blocks;
their merge is the run's distribution. Beside them: per-window CE sums, per-candidate ``Moments``, the worst
tokens and MoE routing sums.

``save_state`` / ``load_state`` write and read it (``state.npz``); because blocks are merged by exact integer
addition, a resumed run ends with the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from tailjax import files
from tailjax.stats import BucketSpec, HostHistogram
from tailjax.stats.blocks import Blocks, SparseSketch

# Sparse per-window sketches of a 3-model run take ~53 KB a window (the embedded default: 512-token windows, 14
# quantities): 256 MiB holds ~5,000 windows before neighbours are merged.
DEFAULT_BLOCK_BUDGET = 256 * 2**20
STATE_FORMAT = 2  # 1 (tailjax <= session 12): one dense block per batch


class Moments(NamedTuple):
  """Per-candidate sums over scored tokens (arrays ``[C]`` from a batch; float64 on host, summed over the run)
  from which the PPL ratio, the CE correlation and RMS Δp follow: ``tokens`` with both CEs and the KLD finite, and
  over those tokens: top-1 agreements, Δp and Δp², both CEs, their squares and their product."""

  tokens: Any
  top1: Any
  dp: Any
  dp2: Any
  ref_ce: Any
  cand_ce: Any
  ref_ce2: Any
  cand_ce2: Any
  ref_cand_ce: Any


def worst_first(entries: list[tuple[float, int, int]]) -> list[tuple[float, int, int]]:
  """``(KLD, window, position)`` entries, highest KLD first and NaN above all (a token the candidate lost)."""
  return sorted(entries, key=lambda e: (e[0] != e[0], e[0] if e[0] == e[0] else 0.0), reverse=True)


@dataclasses.dataclass
class EvalState:
  """Everything a run has accumulated, on host."""

  labels: list[str]  # models: reference first, then candidates
  windows_done: int = 0
  blocks: dict[str, dict[str, Blocks]] = dataclasses.field(default_factory=dict)  # {quantity: {label: Blocks}}
  windows_per_block: int = 1  # doubles each time the blocks pass block_budget
  last_block_windows: int = 0  # windows in the last block (every other one holds windows_per_block)
  block_budget: int = DEFAULT_BLOCK_BUDGET  # bytes of sparse sketches before neighbours are merged
  seq_ce: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # per model, per window
  seq_tokens: list[int] = dataclasses.field(default_factory=list)
  moments: dict[str, Moments] = dataclasses.field(default_factory=dict)  # per candidate, float64
  worst: dict[str, list[tuple[float, int, int]]] = dataclasses.field(default_factory=dict)  # (KLD, window, pos)
  # MoE models: "load/<label>" [MoE layers, experts] scored-token assignments; "overlap/<label>" [MoE layers]
  # summed |top-k ∩ reference's top-k| / k of a candidate routed like the reference.
  routing: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  # Candidates whose layers line up with the reference's: {label: {"rel_error" | "cos_distance": [per layer]}},
  # the residual stream's divergence after each layer over every scored token (tailjax.models.lockstep).
  layers: dict[str, dict[str, list[HostHistogram]]] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    for label in self.labels:
      self.seq_ce.setdefault(label, [])
    for label in self.labels[1:]:
      self.moments.setdefault(label, Moments(*np.zeros(len(Moments._fields))))

  @property
  def quantities(self) -> set[str]:
    return set(self.blocks)

  @property
  def num_blocks(self) -> int:
    return len(next(iter(next(iter(self.blocks.values())).values()))) if self.blocks else 0

  def sketches(self, quantity: str, label: str) -> Blocks:
    """The blocks' sketches of ``quantity`` for ``label``: what the bootstrap resamples."""
    return self.blocks[quantity][label]

  def merged(self, quantity: str, label: str) -> HostHistogram:
    """The run's distribution of ``quantity`` for ``label``: its blocks merged (exact integer sums)."""
    return self.blocks[quantity][label].merged()

  @property
  def nbytes(self) -> int:
    return sum(b.nbytes for by_label in self.blocks.values() for b in by_label.values())

  def add_windows(self, sketches: dict[str, dict[str, Any]], count: int) -> None:
    """The first ``count`` windows of a batch: ``sketches`` ``{quantity: {label: sketch}}`` fetched from the device,
    each field with a leading window axis (``LogHistogram`` vmapped over windows). Then, past ``block_budget``,
    neighbouring blocks merged until they fit (never below one block)."""
    for row in range(count):
      into_last = 0 < self.last_block_windows < self.windows_per_block
      for quantity, by_label in sketches.items():
        for label, s in by_label.items():
          sparse = SparseSketch.from_dense(s.counts[row], s.nan[row], float(s.total[row]) + float(s.total_err[row]),
                                           s.min[row], s.max[row])
          self.blocks.setdefault(quantity, {}).setdefault(label, Blocks(s.spec)).append(sparse, into_last)
      self.last_block_windows = self.last_block_windows + 1 if into_last else 1
    while self.nbytes > self.block_budget and self.num_blocks > 1:
      self.coarsen()

  def add_layers(self, label: str, sketches: Any) -> None:
    """A batch's per-layer sketches of ``label`` (``evaluate.LayerSketches`` fetched: a leading layer axis), merged
    into the run's."""
    for metric, stacked in sketches._asdict().items():
      self.merge_layers(label, metric, [HostHistogram.from_sketch(jax.tree.map(lambda f, i=i: f[i], stacked))
                                        for i in range(len(stacked.nan))])

  def merge_layers(self, label: str, metric: str, rows: list[HostHistogram]) -> None:
    """Per-layer sketches ``rows`` of ``label``'s ``metric`` merged into the run's (or the first ones)."""
    held = self.layers.setdefault(label, {}).get(metric)
    self.layers[label][metric] = rows if held is None else [a.merge(b) for a, b in zip(held, rows)]

  @classmethod
  def concat(cls, states: list[EvalState]) -> EvalState:
    """Runs of the same models over different windows (several corpora) as one, for reporting: blocks side by
    side, per-window values in order (windows renumbered), sums added, worst tokens merged."""
    first = states[0]
    if any(s.labels != first.labels for s in states):
      raise ValueError("states of different models cannot be pooled")
    pooled = cls(list(first.labels), windows_done=sum(s.windows_done for s in states), block_budget=first.block_budget)
    for quantity in set.intersection(*(s.quantities for s in states)):
      pooled.blocks[quantity] = {
          label: Blocks(b.spec, [sketch for s in states for sketch in s.blocks[quantity][label].sketches])
          for label, b in first.blocks[quantity].items()}
    offset = 0
    for state in states:
      for label in pooled.labels:
        pooled.seq_ce[label] += state.seq_ce[label]
      pooled.seq_tokens += state.seq_tokens
      for label in pooled.labels[1:]:
        pooled.moments[label] = Moments(*(np.asarray(pooled.moments[label]) + np.asarray(state.moments[label])))
        renumbered = [(v, w + offset, p) for v, w, p in state.worst.get(label, [])]
        pooled.worst[label] = pooled.worst.get(label, []) + renumbered
      for key, value in state.routing.items():  # "layers/<label>" names MoE layers: the same in every state
        pooled.routing[key] = value if key.startswith("layers/") else pooled.routing.get(key, 0) + value
      for label, by_metric in state.layers.items():
        for metric, rows in by_metric.items():
          pooled.merge_layers(label, metric, rows)
      offset += len(state.seq_tokens)
    keep = max((len(s.worst.get(label, [])) for s in states for label in first.labels[1:]), default=0)
    pooled.worst = {label: worst_first(entries)[:keep] for label, entries in pooled.worst.items()}
    return pooled

  def coarsen(self) -> None:
    """Neighbouring blocks merged in pairs, in every quantity alike: half the blocks, twice the windows each."""
    odd = self.num_blocks % 2 == 1
    self.blocks = {q: {label: b.pairs_merged() for label, b in by_label.items()} for q, by_label in self.blocks.items()}
    if not odd:  # the last pair holds a full block and the (maybe partial) last one
      self.last_block_windows += self.windows_per_block
    self.windows_per_block *= 2


def save_state(state: EvalState, path: Path) -> None:
  """Atomic write (temporary file, then rename): a kill mid-write leaves the last good state. Each
  ``quantity/label``'s blocks are stored as flat sparse arrays (``Blocks.to_arrays``)."""
  arrays: dict[str, np.ndarray] = {"windows_done": np.asarray(state.windows_done),
                                   "seq_tokens": np.asarray(state.seq_tokens, np.int64)}
  keys = sorted((q, label) for q, by_label in state.blocks.items() for label in by_label)
  for quantity, label in keys:
    for name, value in state.blocks[quantity][label].to_arrays().items():
      arrays[f"{name}:{quantity}/{label}"] = value
  for label in state.labels:
    arrays[f"seq_ce:{label}"] = np.asarray(state.seq_ce[label], np.float64)
  for label in state.labels[1:]:
    arrays[f"moments:{label}"] = np.asarray(state.moments[label], np.float64)
    arrays[f"worst:{label}"] = np.asarray(state.worst.get(label, []), np.float64).reshape(-1, 3)
  for key, value in state.routing.items():
    arrays[f"routing:{key}"] = value
  layer_specs = {}  # "metric/label": the per-layer sketches' spec
  for label, by_metric in sorted(state.layers.items()):
    for metric, rows in sorted(by_metric.items()):
      key = f"{metric}/{label}"
      arrays[f"layers:{key}"] = np.stack([r.counts for r in rows])
      arrays[f"layer_scalars:{key}"] = np.array([[r.nan, r.total, r.min, r.max] for r in rows], np.float64)
      layer_specs[key] = rows[0].spec.to_dict()
  meta = {"format": STATE_FORMAT, "labels": state.labels, "keys": [f"{q}/{label}" for q, label in keys],
          "layers": layer_specs,
          "specs": {f"{q}/{label}": state.blocks[q][label].spec.to_dict() for q, label in keys},
          "windows_per_block": state.windows_per_block, "last_block_windows": state.last_block_windows,
          "block_budget": state.block_budget, "routing": sorted(state.routing)}
  files.write_atomic(path, lambda f: np.savez_compressed(f, meta=np.asarray(json.dumps(meta)), **arrays),
                     "the evaluation state")


def load_state(path: Path) -> EvalState:
  with files.npz(path, "evaluation state", "delete it to start the run over") as z:
    meta = json.loads(str(z["meta"]))
    if meta.get("format", 1) != STATE_FORMAT:
      raise ValueError(f"{path}: evaluation state of format {meta.get('format', 1)} (one block per batch, an older "
                       f"tailjax); this one reads format {STATE_FORMAT}: delete it to start the run over")
    state = EvalState(meta["labels"], windows_done=int(z["windows_done"]), seq_tokens=z["seq_tokens"].tolist(),
                      windows_per_block=int(meta["windows_per_block"]),
                      last_block_windows=int(meta["last_block_windows"]), block_budget=int(meta["block_budget"]))
    for key in meta["keys"]:
      quantity, label = key.split("/", 1)
      spec = meta["specs"][key]
      spec = BucketSpec(**{**spec, "thresholds": tuple(spec["thresholds"])})
      state.blocks.setdefault(quantity, {})[label] = Blocks.from_arrays(
          spec, *(z[f"{name}:{key}"] for name in ("offsets", "slots", "counts", "scalars")))
    for label in state.labels:
      state.seq_ce[label] = z[f"seq_ce:{label}"].tolist()
    for label in state.labels[1:]:
      state.moments[label] = Moments(*z[f"moments:{label}"])
      state.worst[label] = [(float(v), int(w), int(p)) for v, w, p in z[f"worst:{label}"]]
    state.routing = {key: z[f"routing:{key}"] for key in meta.get("routing", [])}
    for key, spec in meta["layers"].items():
      metric, label = key.split("/", 1)
      spec = BucketSpec(**{**spec, "thresholds": tuple(spec["thresholds"])})
      state.layers.setdefault(label, {})[metric] = [
          HostHistogram(spec, counts.astype(np.int64), int(n), float(t), float(lo), float(hi))
          for counts, (n, t, lo, hi) in zip(z[f"layers:{key}"], z[f"layer_scalars:{key}"])]
  return state
