"""The figures of an eval report (``report.html``), from the report dictionary alone: KLD CDF and tail, per-sequence
perplexity against the reference, CE percentile profile, residual stream per layer."""

from __future__ import annotations

from typing import Any

import numpy as np

from tailjax import pages
from tailjax.stats import HostHistogram


def plots(report: dict[str, Any]) -> dict[str, str]:
  """Base64 PNGs: KLD CDF (log axis), the KLD tail as a survival curve (share of tokens above x, both axes log: the
  rare catastrophic tokens a CDF flattens), per-sequence PPL candidate vs reference against the line y = x, CE
  percentile profile, and (when candidates share the reference's layers) their residual streams' relative error
  per layer."""
  import matplotlib
  import matplotlib.ticker

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
  for name, c in report["candidates"].items():
    sketch = HostHistogram.from_dict(c["kld"]["sketch"])
    values = sketch.spec.representative()
    above = 1 - np.cumsum(sketch.counts) / max(sketch.n - sketch.nan, 1)  # share of tokens above each bucket
    keep = (sketch.counts > 0) & (values > 0) & np.isfinite(values) & (above > 0)
    ax.step(values[keep], above[keep], where="post", label=name, color=color[name])
  ax.set(xscale="log", yscale="log", xlabel="per-token KLD (nats)", ylabel="share of tokens > x",
         title="KLD tail (1 − CDF)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  out["kld_survival"] = pages.png(fig)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6.4, 4))
  ref = np.asarray([np.nan if p is None else p for p in report["models"][report["reference"]]["sequences"]["ppl"]])
  for name in report["candidates"]:
    cand = np.asarray([np.nan if p is None else p for p in report["models"][name]["sequences"]["ppl"]])
    ax.scatter(ref, cand, s=10, label=name, alpha=0.7, color=color[name])
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

  layered = {name: c["layers"] for name, c in report["candidates"].items() if "layers" in c}
  if layered:
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, layers in layered.items():
      rel = layers["rel_error"]
      ax.plot(rel["median"], marker=".", label=f"{name} median", color=color[name])
      ax.plot(rel["p99"], ls="--", label=f"{name} p99", color=color[name], alpha=0.6)
    ax.set(yscale="log", xlabel="layer", ylabel="||h_cand - h_ref|| / ||h_ref||",
           title="residual stream vs the reference, per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out["layers"] = pages.png(fig)
    plt.close(fig)
  return out
