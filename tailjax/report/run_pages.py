"""``report.json`` as people read it: the terminal tables, ``report.md`` and a self-contained ``report.html``.

Everything here reads the report dictionary (``tailjax.eval.summaries.build_report``, or a saved
``report.json``), never the run's state, so a saved report renders the same way as a fresh one.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tailjax.report import pages, plots
from tailjax.stats.numbers import error, figure, ratio, share



# What every column and figure of the pages means: report.md and report.html print it as "How to read this", the
# terminal points there.
GLOSSARY = {
    "KLD": "KL(reference || candidate) per scored token, in nats: how far the candidate's next-token distribution is "
           "from the reference's (0: the same). Mean, median and percentiles (p90 ... p99.9) are over tokens; a few "
           "catastrophic tokens move the mean and the tail percentiles, not the median.",
    "spike": "share of tokens whose KLD is above the threshold (nats).",
    "tail share": "share of the total KLD carried by the worst 1% of tokens (1%: spread evenly; near 100%: a few "
                  "tokens make the mean).",
    "top-1": "share of tokens on which both models' most likely next token is the same.",
    "PPL ratio": "candidate perplexity / reference perplexity over all scored tokens (1: the same; llama.cpp's "
                 "'Mean PPL(Q)/PPL(base)').",
    "non-finite": "tokens whose KLD is NaN or infinite (NaN logits, a token the candidate rules out): counted "
                  "apart, never averaged in; every other per-token figure leaves them out too.",
    "CE, PPL": "cross-entropy of the actual next token per token (nats), and exp(mean CE), the perplexity.",
    "seq PPL": "perplexity of each window (sequence) on its own: median, P95, P99 over windows; outliers: windows "
               "above the threshold.",
    "95% CI": "block-bootstrap interval: windows resampled whole, so the tokens of one window are not taken as "
              "independent.",
    "Δp": "candidate's minus reference's probability of the actual next token (mean; RMS).",
    "Cor(ln PPL)": "correlation of the two models' per-token CE.",
    "displacement": "KLD on tokens where the candidate made the actual next token more likely (mass moved towards "
                    "what came) vs less likely.",
    "verdicts": "A dominates B when its median and p99 KLD are both no higher; otherwise a trade-off. The share of "
                "paired block resamples in which it holds says whether it is beyond noise.",
    "numbers": "values have 4 significant digits, shares (%) 3, PPL ratio and cosine 5, a ± 2; n/a: not measured "
               "(no finite token).",
    "figures": "KLD CDF and its tail (1 − CDF, log scale: the rare bad tokens), per-sequence PPL against the "
               "reference (y = x: as good), CE percentile profile, residual stream error per layer.",
}
HOW_TO_READ = "How to read this: report.md and report.html end with a glossary of every column (tailjax report DIR)"


def _rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
  thresholds = [list(c["kld"].get("spike_thresholds") or [0.5]) for c in report["candidates"].values()]
  spike = f"spike>{thresholds[0][0]:g}" if thresholds and all(t[0] == thresholds[0][0] for t in thresholds) else \
      "spike rate"
  kld_head = ["candidate", "KLD mean", "median", "p90", "p95", "p99", "p99.9", spike, "tail share", "top-1",
              "PPL ratio", "non-finite"]
  kld_rows = []
  for name, c in report["candidates"].items():
    k = c["kld"]
    kld_rows.append([name, *(figure(k[key]) for key in ("mean", "median", "p90", "p95", "p99", "p99.9")),
                     share(k["spike_rate"]), share(k["tail_share"]), share(c["top1_agreement"]),
                     ratio(c["ppl_ratio"]), str(k["nonfinite"])])
  ce_head = ["model", "CE mean", "median", "p99", "PPL", "seq PPL median", "P95", "P99", "outliers"]
  ce_rows = []
  for name, m in report["models"].items():
    ce, s = m["ce"], m["sequences"]
    ce_rows.append([f"{name} ({m['role']})", figure(ce["mean"]), figure(ce["median"]), figure(ce["p99"]), figure(ce["ppl"]),
                    figure(s["median_ppl"]), figure(s["p95_ppl"]), figure(s["p99_ppl"]),
                    f"{s['outliers']} > {s['outlier_threshold']:g}"])
  return kld_head, kld_rows, ce_head, ce_rows


def corpus_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
  """With several corpora: per corpus and candidate, its KLD summary there and its PPL ratio."""
  head = ["corpus", "candidate", "windows", "KLD mean", "median", "p99", "top-1", "PPL ratio"]
  rows = [[corpus, name, str(part["windows"]), figure(c["kld"]["mean"]), figure(c["kld"]["median"]), figure(c["kld"]["p99"]),
           share(c["top1_agreement"]), ratio(c["ppl_ratio"])]
          for corpus, part in report.get("corpora", {}).items() for name, c in part["candidates"].items()]
  return head, rows


def notes(report: dict[str, Any]) -> list[str]:
  notes = []
  until = report["run"].get("until_ci")
  if until:
    how = (f"stopped after {until['windows_used']} of {report['run']['windows']} windows (scored in a random order)"
           if until["met"] else f"never met, all {until['windows_used']} windows scored")
    widths = until.get("widths", {})
    by_corpus = widths if report.get("corpora") else {"": widths}
    checked = "; ".join(f"{corpus + ' ' if corpus else ''}{name} {summary} {share(w)}"
                        for corpus, by_name in by_corpus.items() for name, by_summary in by_name.items()
                        for summary, w in by_summary.items())
    notes.append(f"until-ci: full width (high − low) of the 95% interval of KLD {', '.join(until['summaries'])} "
                 f"at most {share(until['relative_width'])} of the value: {how}"
                 + (f"; widths at the end: {checked}" if checked else ""))
  for name, c in report["candidates"].items():
    ci = c["kld"]["ci95"]
    interval = lambda key: f"[{figure(ci[key][0])}, {figure(ci[key][1])}]"
    intervals = (f"KLD mean 95% CI {interval('mean')}, median {interval('median')}, p99 {interval('p99')} (block "
                 "bootstrap)") if ci["mean"][0] is not None and math.isfinite(ci["mean"][0]) else "KLD 95% CI: none"
    if "ci95_note" in c["kld"]:
      intervals += f" ({c['kld']['ci95_note']})"
    notes.append(f"{name}: {intervals}; Cor(ln PPL) {share(c['ce_correlation'])}; "
                 f"mean ln(PPL ratio) {figure(c['ln_ppl_ratio']['mean'])} ± {error(c['ln_ppl_ratio']['stderr'])}; "
                 f"Δp mean {share(c['delta_p']['mean'])}, RMS {share(c['delta_p']['rms'])}")
  for name, c in report["candidates"].items():
    notes.append(f"{name}: {llamacpp_lines(c)}")
  for name, c in report["candidates"].items():
    if "top_k" in c:
      t = c["top_k"]
      notes.append(f"{name}: KL(cand || ref) median {figure(c['reverse_kld']['median'])}, p99 "
                   f"{figure(c['reverse_kld']['p99'])}; top-5 overlap {share(t['top5_overlap'])}, top-10 "
                   f"{share(t['top10_overlap'])}; the reference's top-1 in its top 5: "
                   f"{share(t['top1_in_top5'])}")
    if "jensen_shannon" in c:
      js = c["jensen_shannon"]
      notes.append(f"{name}: Jensen-Shannon (nats, at most ln 2) mean {figure(js['mean'])}, median {figure(js['median'])}, "
                   f"p99 {figure(js['p99'])}")
    if "direction" in c:
      rose, fell = c["direction"]["rose"], c["direction"]["fell"]
      notes.append(f"{name}: {share(rose['kld_share'])} of its KLD mass is displacement on tokens whose target "
                   f"it made more likely ({share(rose['token_share'])} of tokens, median KLD "
                   f"{figure(rose['median'])}); {share(fell['kld_share'])} on tokens it made less likely (median "
                   f"{figure(fell['median'])})")
    if "layers" in c:
      layers = c["layers"]
      rel, at = layers["rel_error"], layers["breaks_at"]
      notes.append(f"{name} residual stream vs the reference's: relative error median {figure(rel['median'][0])} "
                   f"after layer 0, {figure(rel['median'][-1])} after layer {len(rel['median']) - 1} (p99 "
                   f"{figure(rel['p99'][-1])}); cosine median {ratio(layers['cosine']['median'][-1])}; the largest "
                   f"rise is at layer {at}" if at is not None else f"{name}: no per-layer figures (no finite value)")
    if "by_confidence" in c:
      worst = max(c["by_confidence"], key=lambda b: b["median"] if b["tokens"] else -math.inf)
      bands = ", ".join(f"p_ref(top-1) {b['band'][0]:g}-{b['band'][1]:g}: {share(b['token_share'])} of tokens, "
                        f"{share(b['kld_share'])} of KLD" for b in c["by_confidence"])
      notes.append(f"{name} by reference confidence: {bands} (highest median KLD where p_ref(top-1) is "
                   f"{worst['band'][0]:g}-{worst['band'][1]:g})")
  nonfinite = {name: m["ce"]["nonfinite"] for name, m in report["models"].items() if m["ce"]["nonfinite"]}
  if nonfinite:
    notes.append(f"non-finite CE values (NaN/Inf logits), counted apart and never averaged in: {nonfinite}")
  for name, r in report.get("routing", {}).items():
    busiest = int(np.argmax(r["max_share"]))
    note = (f"{name} router: busiest expert takes {share(r['max_share'][busiest])} of assignments in layer "
            f"{r['layers'][busiest]} (uniform: {share(1 / r['experts'])})")
    if "overlap_with_reference" in r:
      worst = int(np.argmin(r["overlap_with_reference"]))
      note += (f"; {share(r['mean_overlap'])} of its top-k experts are the reference's (layer "
               f"{r['layers'][worst]}: {share(r['overlap_with_reference'][worst])})")
    notes.append(note)
  comparison = report["comparison"]
  notes.extend(comparison["verdicts"])
  if comparison["mean_median_disagree"]:
    notes.append(comparison["mean_median_disagree"])
  return notes


def llamacpp_lines(candidate: dict[str, Any]) -> str:
  """The figures llama.cpp's ``--kl-divergence`` prints, to check one tool against the other: the PPL ratio with
  its uncertainty (exp of the mean per-token log ratio ± its standard error, carried through), KLD max, its
  quantiles from 99.9% down to 0.1%, and min."""
  k, ln = candidate["kld"], candidate["ln_ppl_ratio"]
  value = math.exp(ln["mean"]) if ln["mean"] is not None else None
  spread = None if value is None or ln["stderr"] is None else value * ln["stderr"]
  quantiles = ", ".join(f"{q} {figure(v)}" for q, v in reversed(list(k.get("quantiles", {}).items())))
  return (f"as llama.cpp prints it: Mean PPL(Q)/PPL(base) {ratio(value)} ± {error(spread)}; KLD max "
          f"{figure(k['max'])}, {quantiles}, min {figure(k['min'])}")


def _title(report: dict[str, Any]) -> str:
  run = report["run"]
  scoring = f", {run['scoring']}" if run.get("scoring") else ""
  if run.get("dropped_records"):
    scoring += f"; {len(run['dropped_records'])} records with nothing to score left out"
  if run.get("truncated_records"):
    scoring += f"; {run['truncated_records']} records cut at the window length"
  storage = f" [{run['reference_storage']}]" if run.get("reference_storage") else ""
  return (f"reference {report['reference']}{storage} on {run['corpus']} ({run['protocol']}: {run['windows']} "
          f"windows of {run['seq_len']} tokens, {run['scored_tokens']} scored{scoring})")


def render(report: dict[str, Any], console) -> None:
  from rich.table import Table

  kld_head, kld_rows, ce_head, ce_rows = _rows(report)
  tables = [(f"Per-token KLD(reference || candidate) — {_title(report)}", kld_head, kld_rows),
            ("Per-token cross-entropy (nats) and perplexity", ce_head, ce_rows)]
  if report.get("corpora"):
    tables.append(("Per corpus", *corpus_rows(report)))
  for title, head, rows in tables:
    table = Table(title=title, title_justify="left")
    for i, col in enumerate(head):
      table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
      table.add_row(*row)
    console.print(table)
  for note in notes(report):
    console.print(f"• {note}", highlight=False)
  console.print(HOW_TO_READ, style="dim", highlight=False)


def to_markdown(report: dict[str, Any]) -> str:
  kld_head, kld_rows, ce_head, ce_rows = _rows(report)
  lines = ["# tailjax eval", "", _title(report), ""]
  for head, rows in ((kld_head, kld_rows), (ce_head, ce_rows)):
    lines += [*pages.markdown_table(head, rows), ""]
  if report.get("corpora"):
    lines += ["## Per corpus", "", *pages.markdown_table(*corpus_rows(report)), ""]
  lines += [f"- {note}" for note in notes(report)]
  for name, (head, rows) in _worst_rows(report).items():
    lines += ["", f"## Highest-KLD tokens: {name}", "", *pages.markdown_table(head, [
        [kld, window, position, f"{_quote(context)} → {_quote(target)}"] for kld, window, position, context, target
        in rows])]
  lines += ["", "## How to read this", "", *(f"- **{term}**: {meaning}" for term, meaning in GLOSSARY.items())]
  return "\n".join(lines) + "\n"


WORST_SHOWN = 10  # highest-KLD tokens per candidate on the pages (report.json keeps all it has)


def _worst_rows(report: dict[str, Any]) -> dict[str, tuple[list[str], list[list[str]]]]:
  """Per candidate, the table of its highest-KLD tokens: KLD, window, position, context, target."""
  head = ["KLD", "window", "position", "context → target"]
  return {name: (head, [[figure(r["kld"]), str(r["window"]), str(r["position"]), r["context"], r["target"]]
                        for r in rows[:WORST_SHOWN]])
          for name, rows in report.get("worst_tokens", {}).items()}


def visible(text: str) -> str:
  """Decoded tokens as a person should see them: newlines as ⏎, tabs as ⇥ (special tokens stay as spelled)."""
  return text.replace("\n", "⏎").replace("\t", "⇥")


def _quote(text: str) -> str:
  """Decoded tokens inside a Markdown table cell: visible whitespace, no column breaks."""
  return "`" + visible(text).replace("|", "\\|").replace("`", "'") + "`"


def to_html(report: dict[str, Any]) -> str:
  kld_head, kld_rows, ce_head, ce_rows = _rows(report)
  worst = [(f"Highest-KLD tokens: {name}", pages.html_table(head, [
      [kld, window, position, f"{visible(context)} → {visible(target)}"] for kld, window, position, context, target
      in rows], left=(3,))) for name, (head, rows) in _worst_rows(report).items()]
  if report.get("corpora"):
    worst.insert(0, ("Per corpus", pages.html_table(*corpus_rows(report))))
  worst.append(("How to read this", pages.html_table(["term", "meaning"], list(GLOSSARY.items()), left=(1,))))
  return pages.html_page("tailjax eval", _title(report),
                         [pages.html_table(kld_head, kld_rows), pages.html_table(ce_head, ce_rows)], notes(report),
                         plots.plots(report), sections=worst)
