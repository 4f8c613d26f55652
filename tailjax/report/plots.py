"""The figures of an eval report (``report.html``), from the report dictionary alone: KLD CDF and tail, per-sequence
perplexity against the reference, CE percentile profile, residual stream per layer."""

from __future__ import annotations

from typing import Any

import numpy as np

from tailjax.report import pages
from tailjax.stats import HostHistogram


def plots(report: dict[str, Any]) -> dict[str, str]:
  """Base64 PNGs: KLD CDF (log axis), the KLD tail as a survival curve (share of tokens above x, both axes log: the
  rare catastrophic tokens a CDF flattens), per-sequence PPL candidate vs reference against the line y = x, CE
  percentile profile, and (when candidates share the reference's layers) their residual streams' relative error
  per layer. One colour per model in every plot."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  color = pages.colors(report["models"])
  figures = {"kld_cdf": _kld_cdf, "kld_survival": _kld_survival, "sequence_ppl": _sequence_ppl,
             "ce_profile": _ce_profile}
  if any("layers" in c for c in report["candidates"].values()):
    figures["layers"] = _layers
  out = {}
  for name, draw in figures.items():
    fig, ax = plt.subplots(figsize=(6.4, 4))
    draw(ax, report, color)
    ax.legend(fontsize=8)
    out[name] = pages.png(fig)
    plt.close(fig)
  return out


def _kld_steps(report: dict[str, Any]):
  """Per candidate: its KLD sketch's bucket values and the share of finite tokens at or below each."""
  for name, c in report["candidates"].items():
    sketch = HostHistogram.from_dict(c["kld"]["sketch"])
    values = sketch.spec.representative()
    cdf = np.cumsum(sketch.counts) / max(sketch.n - sketch.nan, 1)
    yield name, values, cdf, (sketch.counts > 0) & (values > 0) & np.isfinite(values)


def _kld_cdf(ax, report: dict[str, Any], color: dict[str, str]) -> None:
  for name, values, cdf, keep in _kld_steps(report):
    ax.step(values[keep], cdf[keep], where="post", label=name, color=color[name])
  ax.set(xscale="log", xlabel="per-token KLD (nats)", ylabel="share of tokens ≤ x", title="KLD CDF")
  ax.grid(alpha=0.3)


def _kld_survival(ax, report: dict[str, Any], color: dict[str, str]) -> None:
  for name, values, cdf, keep in _kld_steps(report):
    above = 1 - cdf  # share of tokens above each bucket
    keep &= above > 0
    ax.step(values[keep], above[keep], where="post", label=name, color=color[name])
  ax.set(xscale="log", yscale="log", xlabel="per-token KLD (nats)", ylabel="share of tokens > x",
         title="KLD tail (1 − CDF)")
  ax.grid(alpha=0.3, which="both")


def _sequence_ppl(ax, report: dict[str, Any], color: dict[str, str]) -> None:
  import matplotlib.ticker

  ppl = lambda name: np.asarray([np.nan if p is None else p for p in report["models"][name]["sequences"]["ppl"]])
  ref = ppl(report["reference"])
  for name in report["candidates"]:
    ax.scatter(ref, ppl(name), s=10, label=name, alpha=0.7, color=color[name])
  finite = ref[np.isfinite(ref)]
  if finite.size:
    ax.plot([finite.min(), finite.max()], [finite.min(), finite.max()], color="gray", lw=0.8,
            label="y = x (as the reference)")
  ax.set(xscale="log", yscale="log", xlabel="reference PPL per sequence", ylabel="candidate PPL per sequence",
         title="per-sequence perplexity (above the line: worse)")
  for axis in (ax.xaxis, ax.yaxis):  # plain numbers, not 10^x, and a few in between on a narrow range
    axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2.0, 5.0)))
    axis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  ax.tick_params(which="minor", labelsize=7)


def _ce_profile(ax, report: dict[str, Any], color: dict[str, str]) -> None:
  for name, m in report["models"].items():
    pct = m["ce"]["percentiles"]
    ax.plot([float(k[1:]) for k in pct], [np.nan if v is None else v for v in pct.values()], marker=".", label=name,
            color=color[name])
  ax.set(yscale="log", xlabel="percentile", ylabel="per-token CE (nats)", title="CE percentile profile")
  ax.grid(alpha=0.3)


def _layers(ax, report: dict[str, Any], color: dict[str, str]) -> None:
  for name, c in report["candidates"].items():
    if "layers" in c:
      rel = c["layers"]["rel_error"]
      ax.plot(rel["median"], marker=".", label=f"{name} median", color=color[name])
      ax.plot(rel["p99"], ls="--", label=f"{name} p99", color=color[name], alpha=0.6)
  ax.set(yscale="log", xlabel="layer", ylabel="||h_cand - h_ref|| / ||h_ref||",
         title="residual stream vs the reference, per layer")
  ax.grid(alpha=0.3)
