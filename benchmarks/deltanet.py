"""Gated DeltaNet's chunked rule grows linearly with the window; softmax attention, the baseline, does not.

Times the forward pass (and forward + backward, what distillation runs) of
``tailjax.models.deltanet.gated_delta_rule`` at each ``--seq-lens`` against
``tailjax.models.attention.causal_attention`` on the same batch, and prints per window length the
milliseconds and the cost per token relative to the shortest window (1.00 = linear; tests/test_deltanet.py
checks the chunked form against the token-by-token recurrence). Heads are Qwen3.5-27B's linear layers scaled down for a CPU: 4 key heads, 8 value
heads, 128 x 128 state per value head (``--heads 16 48`` for the real ones on an accelerator).

  python benchmarks/deltanet.py                          # B=1, T = 2048 and 8192
  python benchmarks/deltanet.py --seq-lens 2048 4096 8192 --heads 16 48
"""

from __future__ import annotations

import argparse
import statistics
import time


def timed(fn, *args, repeats: int) -> float:
  import jax

  jax.block_until_ready(fn(*args))
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    runs.append(time.perf_counter() - start)
  return statistics.median(runs) * 1e3


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192])
  parser.add_argument("--heads", type=int, nargs=2, default=[4, 8], metavar=("KEY", "VALUE"))
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--softmax-max-len", type=int, default=None,
                      help="time the softmax baseline only up to this window (its quadratic cost: a CPU cannot)")
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  from rich.console import Console
  from rich.table import Table

  from tailjax.models.attention import causal_attention
  from tailjax.models.deltanet import gated_delta_rule

  hk, hv, d, b = *args.heads, args.head_dim, args.batch

  def inputs(t):
    keys = jax.random.split(jax.random.key(t), 5)
    q, k = (jax.random.normal(key, (b, t, hk, d)) for key in keys[:2])
    v = jax.random.normal(keys[2], (b, t, hv, d))
    g = -jax.random.uniform(keys[3], (b, t, hv)) * 0.5
    beta = jax.random.uniform(keys[4], (b, t, hv))
    return q, k, v, g, beta

  rule = jax.jit(lambda *x: gated_delta_rule(*x).out)
  rule_grad = jax.jit(jax.grad(lambda *x: gated_delta_rule(*x).out.sum(), argnums=(0, 1, 2)))
  softmax = jax.jit(lambda q, k, v: causal_attention(q, k, v, jnp.tril(jnp.ones((q.shape[1],) * 2, bool))[None]))
  softmax_grad = jax.jit(jax.grad(lambda q, k, v: softmax(q, k, v).sum(), argnums=(0, 1, 2)))
  table = Table(title=f"Gated DeltaNet vs softmax attention, B={b}, heads {hk}/{hv}, {d} x {d} state, float32 on "
                f"{jax.devices()[0].device_kind}")
  for col in ("T", "DeltaNet fwd ms", "fwd+bwd ms", "per token vs first", "softmax fwd ms", "fwd+bwd ms",
              "per token vs first"):
    table.add_column(col, justify="right")
  first = None
  for t in args.seq_lens:
    q, k, v, g, beta = inputs(t)
    qa, ka = (jnp.repeat(x, hv // hk, axis=2) for x in (q, k))
    va = v
    row = {"delta": timed(rule, q, k, v, g, beta, repeats=args.repeats),
           "delta_grad": timed(rule_grad, q, k, v, g, beta, repeats=args.repeats)}
    if args.softmax_max_len is None or t <= args.softmax_max_len:
      row.update(softmax=timed(softmax, qa, ka, va, repeats=args.repeats),
                 softmax_grad=timed(softmax_grad, qa, ka, va, repeats=args.repeats))
    first = first or {key: value / t for key, value in row.items()}
    per_token = lambda key: f"{row[key] / t / first[key]:.2f}x" if key in row else "-"
    ms = lambda key: f"{row[key]:.1f}" if key in row else "not run"
    table.add_row(str(t), ms("delta"), ms("delta_grad"), per_token("delta_grad"), ms("softmax"), ms("softmax_grad"),
                  per_token("softmax_grad"))
  Console(width=160).print(table)

if __name__ == "__main__":
  main()
