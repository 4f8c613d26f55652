"""Evaluation state -> the ``report.json`` dictionary (``tailjax.report``: its contract, pages, reading back).

From a run's ``EvalState`` (per-window sketches, moment sums, worst tokens, routing counts): per candidate the KLD
``Summary`` with block-bootstrap intervals, its splits (direction, the reference's confidence, top-K overlaps),
llama.cpp's paired figures and quantile lines; per model CE and per-sequence perplexity; verdicts between
candidates (``tailjax.report.verdicts``) with their shares of paired block resamples.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tailjax import __version__
from tailjax.eval import stopping
from tailjax.eval.state import EvalState, Moments
from tailjax.eval.step import CONFIDENCE_BANDS, DIRECTION_QUANTITIES, MODEL_REFERENCE_QUANTITIES, confidence_quantity
from tailjax.report.verdicts import PairedShares, compare_candidates
from tailjax.stats import HostHistogram, SequenceSummary, Summary
from tailjax.stats.blocks import Blocks
from tailjax.stats.bootstrap import MIN_RELIABLE_BLOCKS, REPLICATES, block_bootstrap, paired_resamples

# llama.cpp's KLD and Δp quantile lines, so users can check one tool against the other.
KLD_QUANTILES = (0.001, 0.01, 0.05, 0.1, 0.5, 0.9, 0.95, 0.99, 0.999)
DELTA_P_QUANTILES = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999)
HEADLINE = ("mean", "median", "p90", "p95", "p99", "p99.9", "spike_rate")
_CI_STATISTICS = {name: stopping.STATISTICS[name] for name in ("mean", "median", "p99")}


def _quantile_table(sketch: HostHistogram, qs) -> dict[str, float]:
  return {f"{100 * q:g}%": float(v) for q, v in zip(qs, sketch.quantiles(qs))}


def _summary(blocks: Blocks, merged: HostHistogram, spike_thresholds, replicates: int,
             also: tuple[str, ...] = ()) -> dict:
  """A ``Summary``'s dictionary with 95% block-bootstrap intervals of mean, median, p99, the spike rate and the
  summaries named in ``also`` (those ``--until-ci`` waited for: the same resamples, so the same intervals)."""
  summary = Summary.from_sketch(merged, spike_thresholds=spike_thresholds).to_dict()
  statistics = {**_CI_STATISTICS, **{name: stopping.STATISTICS[name] for name in also}}
  if spike_thresholds:
    statistics["spike_rate"] = lambda s: s.fraction_above(spike_thresholds[0])
  summary["ci95"] = {k: list(v) for k, v in block_bootstrap(blocks, statistics, replicates).items()}
  if len(blocks) < 2:
    summary["ci95_note"] = f"no interval: {len(blocks)} block (window) cannot be bootstrapped; use more windows"
  elif len(blocks) < MIN_RELIABLE_BLOCKS:
    summary["ci95_note"] = (f"interval from {len(blocks)} blocks (windows) is unreliable: below "
                            f"{MIN_RELIABLE_BLOCKS} a nominal 95% block-bootstrap interval covers far less (74% "
                            "measured at 3 blocks); use more windows")
  return summary


def build_report(state: EvalState, run: dict[str, Any], sources: dict[str, str], *, spike_thresholds=(0.5,),
                 outlier_ppl: float = 100.0, replicates: int = REPLICATES, windows=None, tokenizer=None) -> dict[str, Any]:
  """The ``report.json`` dictionary of a finished (or partial) run; with the run's ``windows`` and ``tokenizer``
  its highest-KLD tokens are listed with the text around them (``worst_tokens``)."""
  reference, candidates = state.labels[0], state.labels[1:]
  report: dict[str, Any] = {"tailjax_version": __version__, "run": {**run, "windows_done": state.windows_done},
                            "reference": reference, "models": {}, "candidates": {}}
  tokens = np.asarray(state.seq_tokens)
  for label in state.labels:
    ce = _summary(state.sketches("ce", label), state.merged("ce", label), spike_thresholds, replicates)
    sequences = SequenceSummary(np.asarray(state.seq_ce[label]), tokens, outlier_ppl)
    ce["ppl"] = sequences.corpus_ppl
    report["models"][label] = {
        "source": sources[label], "role": "reference" if label == reference else "candidate", "ce": ce,
        "sequences": {**sequences.to_dict(), "ppl": [None if math.isnan(p) else p for p in sequences.ppl.tolist()]},
    }
  if "entropy" in state.quantities:  # H(p_ref) per token, a model reference's
    entropy = Summary.from_sketch(state.merged("entropy", reference), spike_thresholds=()).to_dict()
    report["models"][reference]["entropy"] = entropy
  summaries = {}  # each candidate's KLD Summary, for the verdicts
  for label in candidates:
    whole = state.merged("kld", label)
    summaries[label] = Summary.from_sketch(whole, spike_thresholds=spike_thresholds)
    kld = _summary(state.sketches("kld", label), whole, spike_thresholds, replicates,
                   tuple((run.get("until_ci") or {}).get("summaries", ())))
    kld["quantiles"] = _quantile_table(whole, KLD_QUANTILES)
    dp = state.merged("dp", label)
    report["candidates"][label] = {
        "kld": kld,
        "ppl_ratio": report["models"][label]["ce"]["ppl"] / report["models"][reference]["ce"]["ppl"],
        **_pair_statistics(state.moments[label]),
    }
    report["candidates"][label]["delta_p"].update(min=dp.min, max=dp.max, sketch=dp.to_dict(),
                                                  quantiles=_quantile_table(dp, DELTA_P_QUANTILES))
    report["candidates"][label].update(_splits(state, label, whole))
    if label in state.layers:
      report["candidates"][label]["layers"] = layer_report(state.layers[label])
  report["comparison"] = compare_candidates(summaries, paired_shares(state, candidates, replicates))
  if windows is not None and tokenizer is not None:
    report["worst_tokens"] = worst_tokens(state, windows, tokenizer)
  if state.routing:
    report["routing"] = routing_report(state.routing, reference, int(tokens.sum()))
  return report


def _part(part: HostHistogram, whole: HostHistogram) -> dict[str, Any]:
  """A subset of a candidate's tokens: its share of the tokens and of the KLD mass, and its KLD summary."""
  return {"tokens": part.n, "token_share": part.n / whole.n if whole.n else math.nan,
          "kld_share": part.total / whole.total if whole.total > 0 else math.nan, "mean": part.mean,
          "median": float(part.quantile(0.5)), "p99": float(part.quantile(0.99))}


def _splits(state: EvalState, label: str, whole: HostHistogram) -> dict[str, Any]:
  """A candidate's KLD by direction (``rose``: it made the target more likely, ``fell``: it did not; their KLD
  masses sum to ``whole``, its merged KLD) and by the reference's confidence (its top-1 probability,
  ``CONFIDENCE_BANDS``). Runs saved before these sketches existed have none: nothing is reported then."""
  present = state.quantities
  out: dict[str, Any] = {}
  if set(MODEL_REFERENCE_QUANTITIES) <= present:
    reverse = state.merged("reverse_kld", label)
    out["reverse_kld"] = Summary.from_sketch(reverse, spike_thresholds=()).to_dict()
    out["top_k"] = {q: state.merged(q, label).mean for q in MODEL_REFERENCE_QUANTITIES[1:]}
  if "jensen_shannon" in present:
    out["jensen_shannon"] = Summary.from_sketch(state.merged("jensen_shannon", label), spike_thresholds=()).to_dict()
  if set(DIRECTION_QUANTITIES) <= present:
    out["direction"] = {q.removeprefix("kld_"): _part(state.merged(q, label), whole) for q in DIRECTION_QUANTITIES}
  bands = list(zip(CONFIDENCE_BANDS[:-1], CONFIDENCE_BANDS[1:]))
  if all(confidence_quantity(*band) in present for band in bands):
    out["by_confidence"] = [{"band": [lo, hi], **_part(state.merged(confidence_quantity(lo, hi), label), whole)}
                            for lo, hi in bands]
  return out


def corpus_report(state: EvalState, spike_thresholds=(0.5,), run: dict[str, Any] | None = None) -> dict[str, Any]:
  """One corpus of a several-corpus run (``tailjax.eval.run``): its own windows' KLD and CE summaries (with their
  intervals, those ``run["until_ci"]`` checked per corpus among them), PPL ratio, top-1 agreement and verdicts."""
  part = build_report(state, {"until_ci": (run or {}).get("until_ci")}, {label: "" for label in state.labels},
                      spike_thresholds=spike_thresholds)
  return {"windows": state.windows_done, "scored_tokens": int(sum(state.seq_tokens)),
          "candidates": {label: {key: c[key] for key in ("kld", "ppl_ratio", "top1_agreement")}
                         for label, c in part["candidates"].items()},
          "models": {label: {"ce": m["ce"]} for label, m in part["models"].items()},
          "comparison": part["comparison"]}


def layer_report(layers: dict[str, list[HostHistogram]]) -> dict[str, Any]:
  """A candidate's residual stream after each layer against the reference's, over every scored token
  (``tailjax.models.lockstep``): relative error median and p99, cosine similarity median and p1 (its worst 1%),
  and ``breaks_at``: the layer whose median relative error rises most over the layer before (0: the first)."""
  rel, dist = layers["rel_error"], layers["cos_distance"]
  median, p99 = (np.array([s.quantile(q) for s in rel]) for q in (0.5, 0.99))
  rise = np.diff(median, prepend=0.0)
  return {"rel_error": {"median": median.tolist(), "p99": p99.tolist()},
          "cosine": {"median": [1 - s.quantile(0.5) for s in dist], "p1": [1 - s.quantile(0.99) for s in dist]},
          "breaks_at": int(np.nanargmax(rise)) if np.isfinite(rise).any() else None}


def worst_tokens(state: EvalState, windows, tokenizer, context: int = 12) -> dict[str, list[dict[str, Any]]]:
  """The highest-KLD predictions with the text around them, so a person can see where a candidate breaks."""
  out = {}
  for label, entries in state.worst.items():
    rows = []
    for value, window, position in entries:
      ids = windows.tokens[window]
      rows.append({"kld": value, "window": window, "position": position,
                   "context": tokenizer.decode(ids[max(0, position + 1 - context):position + 1].tolist(), specials=True),
                   "target": tokenizer.decode([int(ids[position + 1])], specials=True)})
    out[label] = rows
  return out




def routing_report(routing: dict[str, np.ndarray], reference: str, scored_tokens: int) -> dict[str, Any]:
  """Per MoE model: each MoE layer's share of expert assignments per expert, its busiest and idlest expert,
  and for a candidate routed like the reference the mean share of its top-k experts that are the reference's."""
  out = {}
  for key, layers in routing.items():
    if not key.startswith("layers/"):
      continue
    label = key.split("/", 1)[1]
    load = np.asarray(routing[f"load/{label}"], np.float64)
    share = load / np.maximum(load.sum(axis=1, keepdims=True), 1)
    entry = {"layers": [int(i) for i in layers], "experts": int(share.shape[1]), "share": share.tolist(),
             "max_share": share.max(axis=1).tolist(), "min_share": share.min(axis=1).tolist(),
             "imbalance": float(share.max() * share.shape[1])}  # 1.0: every expert equally busy
    if f"overlap/{label}" in routing and label != reference:
      overlap = np.asarray(routing[f"overlap/{label}"], np.float64) / max(scored_tokens, 1)
      entry["overlap_with_reference"] = overlap.tolist()
      entry["mean_overlap"] = float(overlap.mean())
    out[label] = entry
  return out






def _pair_statistics(m: Moments) -> dict[str, Any]:
  """llama.cpp's paired figures from moment sums over tokens where both CEs are finite."""
  n = m.tokens
  if n == 0:
    nan = math.nan
    return {"top1_agreement": nan, "delta_p": {"mean": nan, "rms": nan}, "ln_ppl_ratio": {"mean": nan, "stderr": nan},
            "ce_correlation": nan}
  mean_d = (m.cand_ce - m.ref_ce) / n  # per-token ln(PPL_cand / PPL_ref)
  var_d = (m.cand_ce2 - 2 * m.ref_cand_ce + m.ref_ce2) / n - mean_d**2
  var_a, var_b = m.ref_ce2 / n - (m.ref_ce / n)**2, m.cand_ce2 / n - (m.cand_ce / n)**2
  cov = m.ref_cand_ce / n - m.ref_ce * m.cand_ce / n**2
  return {
      "top1_agreement": m.top1 / n,
      "delta_p": {"mean": m.dp / n, "rms": math.sqrt(m.dp2 / n)},
      "ln_ppl_ratio": {"mean": mean_d, "stderr": math.sqrt(max(var_d, 0) / max(n - 1, 1))},
      "ce_correlation": cov / math.sqrt(var_a * var_b) if var_a > 0 and var_b > 0 else math.nan,
  }




def paired_shares(state: EvalState, candidates: list[str], replicates: int) -> PairedShares | None:
  """``PairedShares`` of the run's KLD blocks: each candidate resampled once, its mean, median and p99 read once
  per resample; None with fewer than two blocks."""
  resampled = paired_resamples({label: state.sketches("kld", label) for label in candidates}, replicates)
  if resampled is None:
    return None
  mean, median, p99 = {}, {}, {}
  for label, sketches in resampled.items():
    mean[label] = np.array([s.mean for s in sketches])
    median[label], p99[label] = np.array([s.quantiles([0.5, 0.99]) for s in sketches]).T
  pairs = [(a, b) for a in candidates for b in candidates if a != b]
  dominates = {(a, b): float(np.mean((median[a] <= median[b]) & (p99[a] <= p99[b]))) for a, b in pairs}
  split = {(a, b): float(np.mean((mean[a] < mean[b]) != (median[a] < median[b])))
           for i, a in enumerate(candidates) for b in candidates[i + 1:]}
  return PairedShares(dominates, split)


