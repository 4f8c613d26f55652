"""tailjax's LogHistogram vs exact NumPy and library sketches on heavy-tailed values.

Data: 10M KLD-like values, a lognormal bulk around 1e-3 and a 1% tail around 10
(four orders of magnitude above the median), float32. Each method ingests all values;
accuracy is the relative error of its quantiles against exact ``numpy.quantile``
(``method="lower"``) at p1..p99.9. Ratios are ingest throughput relative to tailjax,
measured in the same run. Targets: >= 1e8 values/s, <= 0.5% at p99.9, <= 64 KB state.

  python benchmarks/sketch.py            # 10M values
  python benchmarks/sketch.py --n 1e6    # quicker
"""

from __future__ import annotations

import argparse
import pickle
import time

import datasketches
import jax
import numpy as np
from ddsketch import DDSketch
from rich.console import Console
from rich.table import Table

from tailjax.stats import BucketSpec, LogHistogram

QS = np.array([0.01, 0.1, 0.5, 0.9, 0.95, 0.99, 0.999])


def data(n: int) -> np.ndarray:
  rng = np.random.default_rng(0)
  bulk = rng.lognormal(np.log(1e-3), 1.5, n - n // 100)
  tail = rng.lognormal(np.log(10.0), 1.0, n // 100)
  return rng.permutation(np.concatenate([bulk, tail])).astype(np.float32)


def timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def run_tailjax(x: np.ndarray, batch: int):
  spec = BucketSpec(thresholds=(0.5,))
  add = jax.jit(lambda s, v: s.add(v))
  batches = [jax.device_put(x[i:i + batch]) for i in range(0, x.size, batch)]
  jax.block_until_ready(add(LogHistogram.empty(spec), batches[0]))  # compile outside the timing

  def ingest():
    sketch = LogHistogram.empty(spec)
    for b in batches:
      sketch = add(sketch, b)
    return jax.block_until_ready(sketch)

  ingest()
  sketch, seconds = timed(ingest)
  host = sketch.host()
  state = sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(sketch))
  return host.quantiles(QS), seconds, state


def run_numpy(x: np.ndarray):
  q, seconds = timed(lambda: np.quantile(x, QS, method="lower"))
  return q, seconds, x.nbytes


def run_ddsketch(x: np.ndarray):
  sketch = DDSketch(relative_accuracy=0.005)
  values = x.astype(np.float64).tolist()

  def ingest():
    for v in values:
      sketch.add(v)

  _, seconds = timed(ingest)
  return np.array([sketch.get_quantile_value(q) for q in QS]), seconds, len(pickle.dumps(sketch))


def run_datasketches(x: np.ndarray, kind: str):
  sketch = datasketches.kll_floats_sketch(200) if kind == "kll" else datasketches.req_floats_sketch(12, True)
  _, seconds = timed(lambda: sketch.update(x))
  return np.array([sketch.get_quantile(q) for q in QS]), seconds, len(sketch.serialize())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--n", type=float, default=1e7)
  parser.add_argument("--batch", type=int, default=1 << 20, help="tailjax values per jitted update")
  args = parser.parse_args()
  x = data(int(args.n))
  exact = np.quantile(x.astype(np.float64), QS, method="lower")
  results = {
      "tailjax LogHistogram (jit)": run_tailjax(x, args.batch),
      "numpy.quantile (exact)": run_numpy(x),
      "ddsketch 3 (0.5%)": run_ddsketch(x),
      "datasketches KLL k=200": run_datasketches(x, "kll"),
      "datasketches REQ k=12 (high ranks)": run_datasketches(x, "req"),
  }
  base_rate = x.size / results["tailjax LogHistogram (jit)"][1]
  table = Table(title=f"quantile sketches on {x.size:,} heavy-tailed float32 values ({jax.devices()[0].device_kind})")
  for col in ("method", "values/s", "vs tailjax", "state", "max rel err p1..p99.9", "rel err p99.9"):
    table.add_column(col, justify="right")
  for name, (q, seconds, state) in results.items():
    err = np.abs(q / exact - 1)
    rate = x.size / seconds
    table.add_row(name, f"{rate:.3g}", f"{rate / base_rate:.3f}x", f"{state / 1024:.1f} KB", f"{err.max():.3%}",
                  f"{err[-1]:.3%}")
  Console().print(table)


if __name__ == "__main__":
  main()
