"""Evaluation state -> ``report.json`` -> terminal table, Markdown and a self-contained HTML page.

``report.json`` is the public contract (other tools read it): per candidate a ``kld``
summary with ``mean``, ``median``, ``p90``, ``p95``, ``p99``, ``p99.9``, ``spike_rate`` and
``top1_agreement``; per model a ``ce`` summary with the same keys and ``ppl``. Every
summary carries its serialized sketch, so a saved report can be re-rendered, merged and
compared (``tailjax report``) without the models.
"""

from __future__ import annotations

import json
import math
from typing import Any, NamedTuple

import numpy as np

from tailjax import __version__, files, pages
from tailjax.eval_state import EvalState, Moments
from tailjax.evaluate import CONFIDENCE_BANDS, DIRECTION_QUANTITIES, MODEL_REFERENCE_QUANTITIES, confidence_quantity
from tailjax.stats import HostHistogram, SequenceSummary, Summary, compare
from tailjax.stats.blocks import Blocks
from tailjax.stats.bootstrap import MIN_RELIABLE_BLOCKS, block_bootstrap, paired_resamples

# llama.cpp's KLD and Δp quantile lines, so users can check one tool against the other.
KLD_QUANTILES = (0.001, 0.01, 0.05, 0.1, 0.5, 0.9, 0.95, 0.99, 0.999)
DELTA_P_QUANTILES = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999)
HEADLINE = ("mean", "median", "p90", "p95", "p99", "p99.9", "spike_rate")
_CI_STATISTICS = {
    "mean": lambda s: s.mean, "median": lambda s: s.quantile(0.5), "p99": lambda s: s.quantile(0.99),
}


def _quantile_table(sketch: HostHistogram, qs) -> dict[str, float]:
  return {f"{100 * q:g}%": float(v) for q, v in zip(qs, sketch.quantiles(qs))}


def _summary(blocks: Blocks, merged: HostHistogram, spike_thresholds, replicates: int) -> dict:
  summary = Summary.from_sketch(merged, spike_thresholds=spike_thresholds).to_dict()
  statistics = dict(_CI_STATISTICS)
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
                 outlier_ppl: float = 100.0, replicates: int = 1000, windows=None, tokenizer=None) -> dict[str, Any]:
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
  for label in candidates:
    whole = state.merged("kld", label)
    kld = _summary(state.sketches("kld", label), whole, spike_thresholds, replicates)
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
  report["comparison"] = compare_candidates(report, _paired_shares(state, candidates, replicates))
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
  if set(DIRECTION_QUANTITIES) <= present:
    out["direction"] = {q.removeprefix("kld_"): _part(state.merged(q, label), whole) for q in DIRECTION_QUANTITIES}
  bands = list(zip(CONFIDENCE_BANDS[:-1], CONFIDENCE_BANDS[1:]))
  if all(confidence_quantity(*band) in present for band in bands):
    out["by_confidence"] = [{"band": [lo, hi], **_part(state.merged(confidence_quantity(lo, hi), label), whole)}
                            for lo, hi in bands]
  return out


def worst_tokens(state: EvalState, windows, tokenizer, context: int = 12) -> dict[str, list[dict[str, Any]]]:
  """The highest-KLD predictions with the text around them, so a person can see where a candidate breaks."""
  out = {}
  for label, entries in state.worst.items():
    rows = []
    for value, window, position in entries:
      ids = windows.tokens[window]
      rows.append({"kld": value, "window": window, "position": position,
                   "context": tokenizer.decode(ids[max(0, position + 1 - context):position + 1].tolist()),
                   "target": tokenizer.decode([int(ids[position + 1])])})
    out[label] = rows
  return out


def write(report: dict[str, Any], output) -> None:
  """``report.json``, ``report.md`` and ``report.html`` into the directory ``output``."""
  from pathlib import Path

  output = Path(output)
  output.mkdir(parents=True, exist_ok=True)
  (output / "report.json").write_text(files.json_text(report))
  (output / "report.md").write_text(to_markdown(report))
  (output / "report.html").write_text(to_html(report))


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


def read(path) -> dict[str, Any]:
  """A saved run: a directory holding ``report.json``, or the file itself."""
  from pathlib import Path

  path = Path(path)
  file = path / "report.json" if path.is_dir() else path
  try:
    result = json.loads(file.read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f"{file}: no such report (run tailjax eval --output {path} first)") from None
  except json.JSONDecodeError as err:
    raise ValueError(f"{file}: not a tailjax eval report ({err})") from err
  missing = {"run", "models", "candidates"} - set(result if isinstance(result, dict) else ())
  if missing:
    raise ValueError(f"{file}: not a tailjax eval report (no {sorted(missing)})")
  return result


def combine(reports: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
  """Several runs as one report: every model and candidate prefixed by its run's name."""
  combined: dict[str, Any] = {"tailjax_version": __version__, "reference": f"{names[0]}:{reports[0]['reference']}",
                              "run": {**reports[0]["run"], "corpus": ", ".join(r["run"]["corpus"] for r in reports)},
                              "models": {}, "candidates": {}}
  for name, r in zip(names, reports):
    if r["run"].get("fingerprint") != reports[0]["run"].get("fingerprint"):
      combined["run"]["note"] = "the runs scored different windows: compare their numbers with care"
    combined["models"].update({f"{name}:{k}": v for k, v in r["models"].items()})
    combined["candidates"].update({f"{name}:{k}": v for k, v in r["candidates"].items()})
  combined["comparison"] = compare_candidates(combined)
  return combined


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


class PairedShares(NamedTuple):
  """Shares of paired block resamples (``stats.bootstrap.paired_resamples``) over candidates ``(a, b)``:
  ``dominates[(a, b)]`` where ``a``'s median and p99 KLD are both no higher than ``b``'s, ``split[(a, b)]``
  (``a`` before ``b`` in candidate order) where mean and median order the pair differently."""

  dominates: dict[tuple[str, str], float]
  split: dict[tuple[str, str], float]


def _paired_shares(state: EvalState, candidates: list[str], replicates: int) -> PairedShares | None:
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


def compare_candidates(report: dict[str, Any], shares: PairedShares | None = None) -> dict[str, Any]:
  """Dominance verdicts (median and p99 KLD, ``stats.compare``) and whether mean and median rank alike.

  With ``shares`` (``_paired_shares``: the run's blocks are at hand) each dominance verdict, and a mean/median
  disagreement, says in what share of paired block resamples it holds. A candidate with non-finite KLD tokens
  is ranked after every finite one (fewest non-finite first) and gets no dominance verdict: its finite part's
  figures say nothing about the tokens it lost."""
  cands = report["candidates"]
  names = list(cands)
  summaries = {name: Summary.from_dict(cands[name]["kld"]) for name in names}
  verdicts = []
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      verdict = compare(summaries[a], summaries[b], (a, b))
      text = verdict.text
      share = None if shares is None or verdict.winner is None else \
          shares.dominates[(verdict.winner, b if verdict.winner == a else a)]
      if share is not None and math.isfinite(share):
        text += f"; median and p99 no higher in {100 * share:.1f}% of paired block resamples"
      verdicts.append(text)
  nonfinite = {n: summaries[n].nonfinite for n in names if summaries[n].nonfinite}
  value = lambda x: math.inf if x is None or math.isnan(x) else x  # null in a re-read report.json
  rank = lambda stat: sorted(names, key=lambda n: (nonfinite.get(n, 0), value(cands[n]["kld"][stat])))
  by_mean, by_median = rank("mean"), rank("median")
  note = None
  if by_mean != by_median:
    note = (f"mean and median KLD rank the candidates differently: by mean {' < '.join(by_mean)}, "
            f"by median {' < '.join(by_median)}")
    split = [(a, b, share) for (a, b), share in (shares.split if shares else {}).items()
             if (by_mean.index(a) < by_mean.index(b)) != (by_median.index(a) < by_median.index(b))]
    if split:
      note += "; the split persists in " + ", ".join(f"{100 * share:.0f}% of paired block resamples for {a} vs {b}"
                                                     for a, b, share in split)
      note += " (near 100%: beyond noise; near 50% or below: within it)"
  return {"verdicts": verdicts, "rank_by_mean": by_mean, "rank_by_median": by_median, "mean_median_disagree": note,
          "nonfinite": nonfinite}


# ---------------------------------------------------------------------------------------------
# Views.


def _fmt(x, digits: int = 4) -> str:
  """A figure for people; ``n/a`` for a missing or NaN one (report.json stores those as null)."""
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "n/a"
  return f"{x:.{digits}g}"


def _percent(x, digits: int) -> str:
  return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:.{digits}f}%"


def _rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
  thresholds = [list(c["kld"].get("spike_thresholds") or [0.5]) for c in report["candidates"].values()]
  spike = f"spike>{thresholds[0][0]:g}" if thresholds and all(t[0] == thresholds[0][0] for t in thresholds) else \
      "spike rate"
  kld_head = ["candidate", "KLD mean", "median", "p90", "p95", "p99", "p99.9", spike, "tail share", "top-1",
              "PPL ratio", "non-finite"]
  kld_rows = []
  for name, c in report["candidates"].items():
    k = c["kld"]
    kld_rows.append([name, *(_fmt(k[key]) for key in ("mean", "median", "p90", "p95", "p99", "p99.9")),
                     _percent(k["spike_rate"], 2), _percent(k["tail_share"], 1), _percent(c["top1_agreement"], 2),
                     _fmt(c["ppl_ratio"], 5), str(k["nonfinite"])])
  ce_head = ["model", "CE mean", "median", "p99", "PPL", "seq PPL median", "P95", "P99", "outliers"]
  ce_rows = []
  for name, m in report["models"].items():
    ce, s = m["ce"], m["sequences"]
    ce_rows.append([f"{name} ({m['role']})", _fmt(ce["mean"]), _fmt(ce["median"]), _fmt(ce["p99"]), _fmt(ce["ppl"], 5),
                    _fmt(s["median_ppl"], 5), _fmt(s["p95_ppl"], 5), _fmt(s["p99_ppl"], 5),
                    f"{s['outliers']} > {s['outlier_threshold']:g}"])
  return kld_head, kld_rows, ce_head, ce_rows


def _notes(report: dict[str, Any]) -> list[str]:
  notes = []
  until = report["run"].get("until_ci")
  if until:
    how = (f"stopped after {until['windows_used']} of {report['run']['windows']} windows (scored in a random order)"
           if until["met"] else f"never met, all {until['windows_used']} windows scored")
    notes.append(f"until-ci: 95% intervals of KLD {', '.join(until['summaries'])} within "
                 f"{_percent(until['relative_width'], 1)} of the value: {how}")
  for name, c in report["candidates"].items():
    ci = c["kld"]["ci95"]
    interval = lambda key: f"[{_fmt(ci[key][0])}, {_fmt(ci[key][1])}]"
    intervals = (f"KLD mean 95% CI {interval('mean')}, median {interval('median')}, p99 {interval('p99')} (block "
                 "bootstrap)") if ci["mean"][0] is not None and math.isfinite(ci["mean"][0]) else "KLD 95% CI: none"
    if "ci95_note" in c["kld"]:
      intervals += f" ({c['kld']['ci95_note']})"
    notes.append(f"{name}: {intervals}; Cor(ln PPL) {_percent(c['ce_correlation'], 2)}; "
                 f"mean ln(PPL ratio) {_fmt(c['ln_ppl_ratio']['mean'], 5)} ± {_fmt(c['ln_ppl_ratio']['stderr'], 5)}; "
                 f"Δp mean {_percent(c['delta_p']['mean'], 3)}, RMS {_percent(c['delta_p']['rms'], 3)}")
  for name, c in report["candidates"].items():
    if "top_k" in c:
      t = c["top_k"]
      notes.append(f"{name}: KL(cand || ref) median {_fmt(c['reverse_kld']['median'])}, p99 "
                   f"{_fmt(c['reverse_kld']['p99'])}; top-5 overlap {_percent(t['top5_overlap'], 1)}, top-10 "
                   f"{_percent(t['top10_overlap'], 1)}; the reference's top-1 in its top 5: "
                   f"{_percent(t['top1_in_top5'], 2)}")
    if "direction" in c:
      rose, fell = c["direction"]["rose"], c["direction"]["fell"]
      notes.append(f"{name}: {_percent(rose['kld_share'], 1)} of its KLD mass is displacement on tokens whose target "
                   f"it made more likely ({_percent(rose['token_share'], 1)} of tokens, median KLD "
                   f"{_fmt(rose['median'])}); {_percent(fell['kld_share'], 1)} on tokens it made less likely (median "
                   f"{_fmt(fell['median'])})")
    if "by_confidence" in c:
      worst = max(c["by_confidence"], key=lambda b: b["median"] if b["tokens"] else -math.inf)
      bands = ", ".join(f"p_ref(top-1) {b['band'][0]:g}-{b['band'][1]:g}: {_percent(b['token_share'], 0)} of tokens, "
                        f"{_percent(b['kld_share'], 0)} of KLD" for b in c["by_confidence"])
      notes.append(f"{name} by reference confidence: {bands} (highest median KLD where p_ref(top-1) is "
                   f"{worst['band'][0]:g}-{worst['band'][1]:g})")
  nonfinite = {name: m["ce"]["nonfinite"] for name, m in report["models"].items() if m["ce"]["nonfinite"]}
  if nonfinite:
    notes.append(f"non-finite CE values (NaN/Inf logits), counted apart and never averaged in: {nonfinite}")
  for name, r in report.get("routing", {}).items():
    busiest = int(np.argmax(r["max_share"]))
    note = (f"{name} router: busiest expert takes {100 * r['max_share'][busiest]:.1f}% of assignments in layer "
            f"{r['layers'][busiest]} (uniform: {100 / r['experts']:.1f}%)")
    if "overlap_with_reference" in r:
      worst = int(np.argmin(r["overlap_with_reference"]))
      note += (f"; {100 * r['mean_overlap']:.2f}% of its top-k experts are the reference's (layer "
               f"{r['layers'][worst]}: {100 * r['overlap_with_reference'][worst]:.2f}%)")
    notes.append(note)
  comparison = report["comparison"]
  notes.extend(comparison["verdicts"])
  if comparison["mean_median_disagree"]:
    notes.append(comparison["mean_median_disagree"])
  return notes


def _title(report: dict[str, Any]) -> str:
  run = report["run"]
  return (f"reference {report['reference']} on {run['corpus']} ({run['protocol']}: {run['windows']} windows of "
          f"{run['seq_len']} tokens, {run['scored_tokens']} scored)")


def render(report: dict[str, Any], console) -> None:
  from rich.table import Table

  kld_head, kld_rows, ce_head, ce_rows = _rows(report)
  for title, head, rows in ((f"Per-token KLD(reference || candidate) — {_title(report)}", kld_head, kld_rows),
                            ("Per-token cross-entropy (nats) and perplexity", ce_head, ce_rows)):
    table = Table(title=title, title_justify="left")
    for i, col in enumerate(head):
      table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
      table.add_row(*row)
    console.print(table)
  for note in _notes(report):
    console.print(f"• {note}", highlight=False)


def to_markdown(report: dict[str, Any]) -> str:
  kld_head, kld_rows, ce_head, ce_rows = _rows(report)
  lines = ["# tailjax eval", "", _title(report), ""]
  for head, rows in ((kld_head, kld_rows), (ce_head, ce_rows)):
    lines += [*pages.markdown_table(head, rows), ""]
  lines += [f"- {note}" for note in _notes(report)]
  for name, (head, rows) in _worst_rows(report).items():
    lines += ["", f"## Highest-KLD tokens: {name}", "", *pages.markdown_table(head, [
        [kld, window, position, f"{_quote(context)} → {_quote(target)}"] for kld, window, position, context, target
        in rows])]
  return "\n".join(lines) + "\n"


WORST_SHOWN = 10  # highest-KLD tokens per candidate on the pages (report.json keeps all it has)


def _worst_rows(report: dict[str, Any]) -> dict[str, tuple[list[str], list[list[str]]]]:
  """Per candidate, the table of its highest-KLD tokens: KLD, window, position, context, target."""
  head = ["KLD", "window", "position", "context → target"]
  return {name: (head, [[_fmt(r["kld"]), str(r["window"]), str(r["position"]), r["context"], r["target"]]
                        for r in rows[:WORST_SHOWN]])
          for name, rows in report.get("worst_tokens", {}).items()}


def _quote(text: str) -> str:
  """Decoded tokens inside a Markdown table cell: visible whitespace, no column breaks."""
  return "`" + text.replace("\n", "⏎").replace("|", "\\|").replace("`", "'") + "`"


def plots(report: dict[str, Any]) -> dict[str, str]:
  """Base64 PNGs: KLD CDF (log axis), per-sequence PPL candidate vs reference, CE percentile profile."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  out = {}
  color = pages.colors(report["models"])  # one colour per model in every plot
  fig, ax = plt.subplots(figsize=(6.4, 4))
  for name, c in report["candidates"].items():
    sketch = HostHistogram.from_dict(c["kld"]["sketch"])
    values = sketch.spec.representative()
    keep = (sketch.counts > 0) & (values > 0) & np.isfinite(values)
    cdf = np.cumsum(sketch.counts) / max(sketch.n - sketch.nan, 1)
    ax.step(values[keep], cdf[keep], where="post", label=name, color=color[name])
  ax.set(xscale="log", xlabel="per-token KLD (nats)", ylabel="share of tokens ≤ x", title="KLD CDF")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  out["kld_cdf"] = pages.png(fig)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6.4, 4))
  ref = np.asarray([np.nan if p is None else p for p in report["models"][report["reference"]]["sequences"]["ppl"]])
  for name in report["candidates"]:
    cand = np.asarray([np.nan if p is None else p for p in report["models"][name]["sequences"]["ppl"]])
    ax.scatter(ref, cand, s=10, label=name, alpha=0.7, color=color[name])
  finite = ref[np.isfinite(ref)]
  if finite.size:
    ax.plot([finite.min(), finite.max()], [finite.min(), finite.max()], color="gray", lw=0.8)
  ax.set(xscale="log", yscale="log", xlabel="reference PPL per sequence", ylabel="candidate PPL per sequence",
         title="per-sequence perplexity")
  ax.legend(fontsize=8)
  out["sequence_ppl"] = pages.png(fig)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6.4, 4))
  for name, m in report["models"].items():
    pct = m["ce"]["percentiles"]
    ax.plot([float(k[1:]) for k in pct], [np.nan if v is None else v for v in pct.values()], marker=".", label=name,
            color=color[name])
  ax.set(yscale="log", xlabel="percentile", ylabel="per-token CE (nats)", title="CE percentile profile")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  out["ce_profile"] = pages.png(fig)
  plt.close(fig)
  return out


def to_html(report: dict[str, Any]) -> str:
  kld_head, kld_rows, ce_head, ce_rows = _rows(report)
  worst = [(f"Highest-KLD tokens: {name}", pages.html_table(head, [
      [kld, window, position, f"{context} → {target}"] for kld, window, position, context, target in rows]))
      for name, (head, rows) in _worst_rows(report).items()]
  return pages.html_page("tailjax eval", _title(report),
                         [pages.html_table(kld_head, kld_rows), pages.html_table(ce_head, ce_rows)], _notes(report),
                         plots(report), sections=worst)
