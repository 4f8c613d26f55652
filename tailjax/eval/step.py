"""Reference vs candidates over token windows: per-token values stream into sketches on device.

Each batch of windows runs the reference (any ``tailjax.eval.references.Reference``) and every
candidate side by side; the fused head (``tailjax.head.candidates_token_stats``) gives per-token
KLD, both CEs, top-1 agreement and the target log-prob delta without materializing logits; these
go straight into sketches (``tailjax.stats``), one per window. Only a ``BatchStats`` leaves the device, once per
batch: the sketches as ``{quantity: {label: sketch}}`` (each with a leading window axis), per-window CE sums,
``Moments`` and the worst tokens (``batch_step`` is the public, compiled step). On host each window's sketches
become a bootstrap *block* (``tailjax.eval.state``): merged they give the run's distribution, resampled
they give block-bootstrap confidence intervals that do not assume independent tokens.

An ``Evaluator`` holds the models and ``EvalOptions`` (configured once) and runs the step over windows, batch by
batch, into an ``EvalState``; the state after each batch is what a run directory saves to resume
(``tailjax.eval.run_dir``), and ``stop(state)`` before each batch ends a run early (``tailjax.eval.stopping``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tailjax import head, mesh
from tailjax.data import Windows
from tailjax.eval.state import DEFAULT_BLOCK_BUDGET, EvalState, Moments, worst_first
from tailjax.frozen import frozen_jit
from tailjax.models import LoadedModel, lockstep
from tailjax.eval.references import Reference, check_compatible
from tailjax.stats import BucketSpec, LogHistogram, spec_for

# Signed Δp in [-1, 1]: quantiles need resolution near 0 but no thresholds.
DELTA_P_SPEC = BucketSpec(relative_accuracy=0.005, min_value=1e-9, max_value=2.0)
# Per-layer relative error and cosine distance of the residual stream (lockstep): 0.5% from 1e-10 up.
LAYER_SPEC = BucketSpec(relative_accuracy=0.005, min_value=1e-10, max_value=1e4)
# Bands of the reference's top-1 probability (its confidence) in which each candidate's KLD is also sketched:
# where a quantization's damage sits (exllamav3's model_diff reports the same split).
CONFIDENCE_BANDS = (0.0, 0.3, 0.6, 0.9, 1.0)


def confidence_quantity(lo: float, hi: float) -> str:
  """The sketch quantity of KLD on tokens whose reference top-1 probability lies in ``[lo, hi)`` (the last band
  includes 1)."""
  return f"kld_conf_{lo:g}_{hi:g}"


# KLD on tokens where the candidate made the target more likely (log p_cand(target) > log p_ref(target): the
# disagreement moved mass *towards* what came) and where it did not (<=): volume vs direction (the two sum to
# the KLD sketch, token for token).
DIRECTION_QUANTITIES = ("kld_rose", "kld_fell")
# Per candidate, only against a model reference (stored log-probs lack the full distributions): KL(cand || ref),
# and the top-K overlaps, whose means the report gives; the reference's entropy is sketched as "entropy".
MODEL_REFERENCE_QUANTITIES = ("reverse_kld", "top5_overlap", "top10_overlap", "top1_in_top5")


class WorstTokens(NamedTuple):
  """A batch's highest-KLD tokens per candidate: ``values, index: [C, k]`` (index ``window * (T-1) + position``
  in the batch; NaN sorts first, -inf marks fewer than k scored tokens)."""

  values: jax.Array
  index: jax.Array


class LayerSketches(NamedTuple):
  """One candidate's residual stream against the reference's after each layer, over a batch's scored tokens
  (``tailjax.models.lockstep``): sketches with a leading ``[L]`` layer axis."""

  rel_error: LogHistogram
  cos_distance: LogHistogram


class BatchStats(NamedTuple):
  """What one batch leaves the device with (``batch_step``); the per-token values stay there.

  ``sketches``: ``{quantity: {label: LogHistogram}}``, one per window (fields with a leading ``[B]`` axis;
  ``ce`` of every model; ``kld`` and ``dp`` of every
  candidate, and its KLD split by direction, ``DIRECTION_QUANTITIES``, and by the reference's confidence,
  ``confidence_quantity``); ``seq_ce: [M, B]`` each model's summed CE per window; ``seq_tokens: [B]`` scored tokens per
  window; ``moments``: ``Moments`` of ``[C]`` arrays; ``worst``: ``WorstTokens``; ``per_token: [C, 5, B, T-1]``
  (kld, ref_ce, cand_ce, Δp, ref_top1_prob) when dumped, else None; ``reference_topk``: the reference's top-K ids,
  log-probs
  and target log-prob when a cache is written, else None; ``routing``: MoE sums (``_routing_sums``); ``layers``:
  ``LayerSketches`` of each candidate whose layers line up with the reference model's (``lockstep.same_layout``)."""

  sketches: dict[str, dict[str, LogHistogram]]
  seq_ce: jax.Array
  seq_tokens: jax.Array
  moments: Moments
  worst: WorstTokens
  per_token: jax.Array | None
  reference_topk: tuple | None
  routing: dict[str, jax.Array]
  layers: dict[str, LayerSketches]


class StepOptions(NamedTuple):
  """The batch step's static arguments: ``labels`` (reference first), the sketches' ``spec``, the reference
  vocabulary, ``worst`` tokens kept per candidate, whether per-token values are ``dump``-ed, the top-K of a
  reference cache to write (0: none) and whether Jensen-Shannon is computed (a second vocabulary pass)."""

  labels: tuple[str, ...]
  spec: BucketSpec
  vocab_size: int
  worst: int = 20
  dump: bool = False
  cache_k: int = 0
  jensen_shannon: bool = False


def _token_stats(models: tuple, outputs: list, tokens: jax.Array, scored: jax.Array, stored, vocab_size: int,
                 cache_k: int, jensen_shannon: bool) -> head.CandidatesStats:
  """Per candidate, per-token values against the reference: a model (``stored`` None: one fused vocabulary
  pass for all, with the reference's top-``cache_k`` log-probs if asked) or stored values (``stored.token_stats``,
  ``tailjax.eval.references``). ``outputs`` are the models' ``DecoderOutput`` (None for a reference that is no
  model)."""
  reference, *candidates = models
  hidden = [None if out is None else out.hidden[:, :-1] for out in outputs]
  targets = tokens[:, 1:]
  if stored is None:
    pairs = [(h, cand.output_head()) for h, cand in zip(hidden[1:], candidates)]
    return head.candidates_token_stats(ref_hidden=hidden[0], ref_unembedding=reference.output_head(),
                                       candidates=pairs, targets=targets, where=scored, vocab_size=vocab_size,
                                       reference_topk=cache_k or None, jensen_shannon=jensen_shannon)
  return head.CandidatesStats([stored.token_stats(h, cand, targets, scored, vocab_size)
                               for h, cand in zip(hidden[1:], candidates)])


def _batch_stats(models: tuple, tokens: jax.Array, scored: jax.Array, stored, options: StepOptions) -> BatchStats:
  labels = options.labels
  finite = lambda x: scored & (jnp.abs(x) < jnp.inf)
  per_window = lambda spec: jax.vmap(lambda v, w: LogHistogram.empty(spec).add(v, w))
  sketch = lambda values, spec=options.spec, where=scored: per_window(spec)(values, where)  # counts [B, size]
  outputs, divergence = _forward(models, tokens)
  stats, ref_topk = _token_stats(models, outputs, tokens, scored, stored, options.vocab_size, options.cache_k,
                                 options.jensen_shannon)
  bands = list(zip(CONFIDENCE_BANDS[:-1], CONFIDENCE_BANDS[1:]))
  quantities = ("kld", "dp", *DIRECTION_QUANTITIES, *(confidence_quantity(*band) for band in bands))
  sketches = {"ce": {labels[0]: sketch(stats[0].ref_ce)}, **{q: {} for q in quantities}}
  if stats[0].ref_entropy is not None:  # a model reference: the values of its vocabulary pass
    sketches["entropy"] = {labels[0]: sketch(stats[0].ref_entropy)}
    sketches.update({q: {} for q in MODEL_REFERENCE_QUANTITIES})
  seq_ce = [jnp.sum(jnp.where(scored, stats[0].ref_ce, 0.0), axis=1)]  # NaN/inf stay: PPL undefined
  moments, top, per_token = [], [], []
  for label, s in zip(labels[1:], stats):
    dp = jnp.exp(-s.cand_ce) - jnp.exp(-s.ref_ce)
    sketches["ce"][label], sketches["kld"][label] = sketch(s.cand_ce), sketch(s.kld)
    sketches["dp"][label] = sketch(dp, DELTA_P_SPEC)
    # One rule for every per-token value of the pair: a token whose KLD is not finite (NaN logits, a ruled-out
    # reference token) is counted apart (NaN in a sketch, outside the moments), never as a miss or a match.
    defined = finite(s.kld)
    if s.reverse_kld is not None:
      sketches["reverse_kld"][label] = sketch(s.reverse_kld)
      for q in MODEL_REFERENCE_QUANTITIES[1:]:
        sketches[q][label] = sketch(jnp.where(defined, getattr(s, q), jnp.nan))
    if s.jensen_shannon is not None:
      sketches.setdefault("jensen_shannon", {})[label] = sketch(s.jensen_shannon)
    rose = s.logprob_delta > 0
    sketches["kld_rose"][label] = sketch(s.kld, where=scored & rose)
    sketches["kld_fell"][label] = sketch(s.kld, where=scored & ~rose)
    for i, (lo, hi) in enumerate(bands):
      inside = (s.ref_top1_prob >= lo) & ((s.ref_top1_prob < hi) | (i == len(bands) - 1))
      sketches[confidence_quantity(lo, hi)][label] = sketch(s.kld, where=scored & inside)
    seq_ce.append(jnp.sum(jnp.where(scored, s.cand_ce, 0.0), axis=1))
    both = defined & finite(s.ref_ce) & finite(s.cand_ce)
    a, b, d = (jnp.where(both, x, 0.0) for x in (s.ref_ce, s.cand_ce, dp))
    moments.append(Moments(jnp.sum(both), jnp.sum(jnp.where(both, s.top1_agreement, 0.0)), jnp.sum(d), jnp.sum(d * d),
                           jnp.sum(a), jnp.sum(b), jnp.sum(a * a), jnp.sum(b * b), jnp.sum(a * b)))
    # NaN sorts above +inf in top_k: non-finite tokens are the worst of all, as they should be.
    top.append(jax.lax.top_k(jnp.where(scored, s.kld, -jnp.inf).ravel(), options.worst))
    if options.dump:
      per_token.append(jnp.stack([s.kld, s.ref_ce, s.cand_ce, dp, s.ref_top1_prob]))
  cached = None if ref_topk is None else (ref_topk.ids, ref_topk.logprobs, -stats[0].ref_ce)
  by_layer = jax.vmap(lambda values: LogHistogram.empty(LAYER_SPEC).add(values, scored))  # [L, B, T-1] -> [L] sketches
  layers = {labels[i]: LayerSketches(by_layer(rel[:, :, :-1]), by_layer(dist[:, :, :-1]))
            for i, (rel, dist) in divergence.items()}
  return BatchStats(sketches, jnp.stack(seq_ce), jnp.sum(scored, axis=1), Moments(*map(jnp.stack, zip(*moments))),
                    WorstTokens(*map(jnp.stack, zip(*top))), jnp.stack(per_token) if options.dump else None, cached,
                    _routing_sums(models, outputs, scored), layers)


def _forward(models: tuple, tokens: jax.Array) -> tuple[list, dict[int, tuple[jax.Array, jax.Array]]]:
  """Every model's ``DecoderOutput`` (None for a reference that is no model), and of each candidate ``i`` whose
  layers line up with the reference model's, its ``[L, B, T]`` relative error and cosine distance per layer
  (the two run together: ``lockstep.forward_together``)."""
  reference = models[0]
  together = [] if reference is None else [i for i, m in enumerate(models) if i and lockstep.same_layout(
      reference.cfg, m.cfg)]
  outputs = [None if model is None or i in together else model.forward(tokens) for i, model in enumerate(models)]
  if not together:
    return outputs, {}
  joint, divergence = lockstep.forward_together([reference] + [models[i] for i in together], tokens)
  for i, out in zip([0, *together], joint):
    outputs[i] = out
  return outputs, {i: (divergence.rel_error[k], divergence.cos_distance[k]) for k, i in enumerate(together)}


def _routing_sums(models: tuple, outputs: list, scored: jax.Array) -> dict[str, jax.Array]:
  """Of every MoE model ``i``: ``load/i`` ``[MoE layers, E]`` how many scored tokens each expert got (a token
  counts once for each of its k experts); of a candidate with the reference's MoE layout, ``overlap/i``
  ``[MoE layers]`` the sum over scored tokens of ``|its experts ∩ the reference's| / k``."""
  sums = {}
  ref = outputs[0]
  for i, (model, out) in enumerate(zip(models, outputs)):
    if out is None or not out.experts:
      continue
    chosen = jnp.stack(out.experts)[:, :, :-1]  # [L, B, T-1, k]: the positions that predict a target
    weight = jnp.broadcast_to(scored[None, :, :, None], chosen.shape).astype(jnp.int32)
    count = jax.vmap(lambda e, w: jnp.bincount(e.ravel(), w.ravel(), length=model.cfg.num_experts))
    sums[f"load/{i}"] = count(chosen, weight)
    routed_alike = (ref is not None and models[0].cfg.num_experts == model.cfg.num_experts and
                    len(ref.experts) == len(out.experts) and ref.experts[0].shape == out.experts[0].shape)
    if i and routed_alike:
      theirs = jnp.stack(ref.experts)[:, :, :-1]
      shared = jnp.any(chosen[..., :, None] == theirs[..., None, :], axis=-1).sum(-1) / chosen.shape[-1]
      sums[f"overlap/{i}"] = jnp.sum(jnp.where(scored[None], shared, 0.0), axis=(1, 2))
  return sums


@functools.lru_cache(maxsize=None)
def batch_step(device_mesh: jax.sharding.Mesh | None = None):
  """The compiled batch step, ``step(models, tokens, scored, stored, options) -> BatchStats``: ``models`` the
  reference's model (None for a stored reference) then the candidates', ``tokens: [B, T]``, ``scored: [B, T-1]``,
  ``stored`` a stored reference's batch (``Reference.batch``, None for a model), ``options`` ``StepOptions``.
  The models are only read (``frozen_jit``: no second copy of their weights). On ``device_mesh`` it is
  partitioned over the mesh and its (small) outputs replicated, so every host has them."""
  options = {} if device_mesh is None else {"out_shardings": mesh.replicated(device_mesh)}
  return frozen_jit(_batch_stats, static_argnums=(4,), **options)


def step_temp_bytes(models: tuple, batch_size: int, seq_len: int, vocab_size: int,
                    device_mesh: jax.sharding.Mesh | None = None) -> int:
  """Temporary memory (per device) of the batch step compiled for ``models`` (real or ``nnx.eval_shape``
  abstract: nothing is allocated or run) on ``[batch_size, seq_len]`` windows, on ``device_mesh`` if any."""
  tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
  scored = jax.ShapeDtypeStruct((batch_size, seq_len - 1), jnp.bool_)
  if device_mesh is not None:
    graph, params = nnx.split(models)
    models = nnx.merge(graph, jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), params,
                                           mesh.parameter_shardings(params, device_mesh)))
    tokens, scored = (jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=mesh.batch_sharding(device_mesh, 2))
                      for x in (tokens, scored))
  options = StepOptions(tuple(str(i) for i in range(len(models))), spec_for(), vocab_size)
  lowered = batch_step(device_mesh).lower(models, tokens, scored, None, options)
  return lowered.compile().memory_analysis().temp_size_in_bytes


@dataclasses.dataclass
class TokenDump:
  """Opt-in per-token values of every scored prediction (they leave the device): tests, small runs."""

  rows: list[np.ndarray] = dataclasses.field(default_factory=list)  # [candidate, window, position, kld, ...]

  COLUMNS = ("candidate", "window", "position", "target", "kld", "ref_ce", "cand_ce", "delta_p", "ref_top1_prob")

  def add(self, values: np.ndarray, tokens: np.ndarray, scored: np.ndarray, first_window: int) -> None:
    """``values: [C, 5, B, T-1]`` (kld, ref_ce, cand_ce, Δp, the reference's top-1 probability) of one batch."""
    b, w, p = np.nonzero(np.broadcast_to(scored, values.shape[:1] + scored.shape))
    v = values.transpose(0, 2, 3, 1)[b, w, p]
    self.rows.append(np.column_stack([b, w + first_window, p, tokens[w, p + 1], v]))

  def table(self, labels: Sequence[str]):
    import pyarrow as pa

    data = np.concatenate(self.rows) if self.rows else np.zeros((0, len(self.COLUMNS)))
    columns = {name: data[:, i] for i, name in enumerate(self.COLUMNS)}
    columns["candidate"] = np.asarray(labels, object)[columns["candidate"].astype(int)]
    for name in ("window", "position", "target"):
      columns[name] = columns[name].astype(np.int64)
    return pa.table(columns)


@dataclasses.dataclass(frozen=True)
class EvalOptions:
  """How an ``Evaluator`` runs: ``labels`` name the reference then each candidate; ``batch_size`` windows per step;
  ``spike_thresholds`` (nats) and the sketches' resolution around them; ``worst`` highest-KLD tokens kept per
  candidate; ``jensen_shannon`` (a model reference only: a second vocabulary pass); ``dump``: every scored token's
  values collected (``Evaluator.dump``); ``cache_k``: the reference's top-K log-probs collected for a reference
  cache (``Evaluator.reference_topk``; 0: none); ``device_mesh``: models placed by their logical axes, each batch
  split over the data axes (the numbers do not depend on the mesh)."""

  labels: tuple[str, ...]
  batch_size: int = 4
  spike_thresholds: tuple[float, ...] = (0.5,)
  worst: int = 20
  jensen_shannon: bool = False
  dump: bool = False
  cache_k: int = 0
  device_mesh: jax.sharding.Mesh | None = None


class Evaluator:
  """A reference and its candidates, configured once (checked compatible, placed on the mesh, the step compiled at
  its first batch), then run over any number of windows: ``run(windows, state) -> EvalState``.

  ``reference`` (``tailjax.eval.references``): a model, a llama.cpp base file or a reference cache (whose windows
  are then its own).
  """

  def __init__(self, reference: Reference, candidates: Sequence[LoadedModel], options: EvalOptions):
    if not candidates:
      raise ValueError("an evaluation needs at least one candidate")
    if len(options.labels) != 1 + len(candidates):
      raise ValueError(f"{len(options.labels)} labels for {1 + len(candidates)} models")
    check_compatible(reference, candidates)
    what, self.vocab_size, _ = reference.describe()
    if options.jensen_shannon and reference.model is None:
      raise ValueError(f"Jensen-Shannon needs full reference distributions: a reference model, not {what}")
    if options.cache_k and not reference.writes_cache:
      raise ValueError(f"a reference cache is written from a reference model, not from {what}")
    self.reference, self.options = reference, options
    self.models = (reference.model, *(c.model for c in candidates))
    self.step, self.place = batch_step(options.device_mesh), jnp.asarray
    if options.device_mesh is not None:
      for model in self.models:
        if model is not None:
          mesh.shard_model(model, options.device_mesh)
      self.place = functools.partial(_place, device_mesh=options.device_mesh)
    self.dump = TokenDump() if options.dump else None
    self.reference_topk: dict[str, list[np.ndarray]] | None = {} if options.cache_k else None

  def new_state(self, block_budget: int = DEFAULT_BLOCK_BUDGET) -> EvalState:
    """An empty state for this evaluator's models (``block_budget`` bytes of blocks: ``EvalState``)."""
    state = EvalState(list(self.options.labels), block_budget=block_budget)
    for label, model in zip(state.labels, self.models):
      if model is not None and model.cfg.num_experts:
        state.routing[f"layers/{label}"] = np.asarray([i for i in range(model.cfg.num_layers)
                                                       if model.cfg.is_moe_layer(i)], np.int64)
    return state

  def run(self, windows: Windows, state: EvalState | None = None, *,
          on_batch: Callable[[EvalState, int], None] | None = None,
          stop: Callable[[EvalState], bool] | None = None) -> EvalState:
    """Run (or resume, given ``state``) over ``windows``; ``on_batch(state, scored_tokens)`` after every batch.
    ``stop(state)`` is asked before every batch (a resumed state included): True ends the run there
    (``tailjax.eval.stopping``: once the intervals are narrow enough)."""
    state = state or self.new_state()
    n, t = windows.tokens.shape
    o = self.options
    options = StepOptions(tuple(state.labels), spec_for(o.spike_thresholds), self.vocab_size,
                          max(1, min(o.worst, o.batch_size * (t - 1))), o.dump, o.cache_k, o.jensen_shannon)
    for start in range(state.windows_done, n, o.batch_size):
      if stop is not None and stop(state):
        break
      count = min(o.batch_size, n - start)
      self._batch(state, windows, start, count, options)
      state.windows_done = start + count
      if on_batch is not None:
        on_batch(state, int(windows.scored[start:start + count].sum()))
    return state

  def _batch(self, state: EvalState, windows: Windows, start: int, count: int, options: StepOptions) -> None:
    """One batch of ``windows`` from ``start`` (a short last batch padded with unscored rows) into ``state``."""
    size, t = self.options.batch_size, windows.tokens.shape[1]
    tokens = np.zeros((size, t), np.int32)
    scored = np.zeros((size, t - 1), bool)
    tokens[:count], scored[:count] = windows.tokens[start:start + count], windows.scored[start:start + count]
    stored = self.reference.batch(start, count, size)
    if stored is not None:
      stored = jax.tree.map(self.place, stored)
    out = jax.device_get(self.step(self.models, self.place(tokens), self.place(scored), stored, options))
    _accumulate(state, out, start, count, t, options.worst)
    if self.reference_topk is not None:
      for name, values in zip(("ids", "logprobs", "target_logprob"), out.reference_topk):
        self.reference_topk.setdefault(name, []).append(np.asarray(values[:count]))
    if self.dump is not None:
      self.dump.add(out.per_token[:, :, :count], tokens[:count], scored[:count], start)


def _accumulate(state: EvalState, out: BatchStats, start: int, count: int, t: int, worst: int) -> None:
  """One batch's ``BatchStats`` (on host) into ``state``: its windows' sketches as blocks, the sums added."""
  for key, value in out.routing.items():
    kind, index = key.split("/")
    name = f"{kind}/{state.labels[int(index)]}"
    state.routing[name] = state.routing.get(name, 0) + np.asarray(value, np.float64 if kind == "overlap" else np.int64)
  state.add_windows(out.sketches, count)
  for label, sketches in out.layers.items():
    state.add_layers(label, sketches)
  for i, label in enumerate(state.labels):
    state.seq_ce[label].extend(np.asarray(out.seq_ce[i, :count], np.float64).tolist())
  state.seq_tokens.extend(np.asarray(out.seq_tokens[:count]).tolist())
  for i, label in enumerate(state.labels[1:]):
    state.moments[label] = Moments(*(np.asarray(state.moments[label], np.float64) +
                                     np.asarray([m[i] for m in out.moments], np.float64)))
    row, position = np.divmod(out.worst.index[i], t - 1)
    found = [(float(v), start + int(r), int(p)) for v, r, p in zip(out.worst.values[i], row, position)
             if v != -np.inf]
    state.worst[label] = worst_first(state.worst.get(label, []) + found)[:worst]


def _place(array, device_mesh: jax.sharding.Mesh) -> jax.Array:
  return mesh.global_batch(np.asarray(array), device_mesh)

