"""Fused vocabulary head vs materialized logits: time and compiled temporary memory.

Two workloads, each written both ways with the same math:
  eval   KLD(ref || cand), both CEs, top-1 agreement, log-prob delta (``head.token_stats``
         vs ``hidden @ unembedding`` then ``tailjax.losses``);
  train  value and gradient of the top-K KL of a student (``head.topk_kl_divergence``
         vs ``losses.topk_kl_divergence`` on materialized logits).

The baseline ("naive") is measured in the same run. Ratios: time fused/naive (target
<= 1.5 on CPU) and temp memory naive/fused (target >= 10 at V = 256k).

  python benchmarks/head.py                 # CPU table, V in {32k, 128k, 256k}
  python benchmarks/head.py --quick         # one small V, seconds
  python benchmarks/head.py --preset h100   # T=8192, d=1536, V=151936, bfloat16
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
from rich.console import Console
from rich.table import Table

from tailjax import head, losses

PRESETS = {
    "cpu": dict(tokens=512, dim=256, vocabs=(32768, 131072, 262144), dtype="float32", block=4096),
    "quick": dict(tokens=256, dim=128, vocabs=(32768,), dtype="float32", block=4096),
    "h100": dict(tokens=8192, dim=1536, vocabs=(151936,), dtype="bfloat16", block=8192),
}
TOP_K = 40


def naive_eval(h_ref, w_ref, h_cand, w_cand, targets):
  a = jnp.dot(h_ref, w_ref, preferred_element_type=jnp.float32)
  c = jnp.dot(h_cand, w_cand, preferred_element_type=jnp.float32)
  return (losses.kl_divergence(ref_logits=a, cand_logits=c), losses.cross_entropy(a, targets),
          losses.cross_entropy(c, targets),
          losses.top1_agreement(ref_logits=a, cand_logits=c),
          losses.target_logprob_delta(ref_logits=a, cand_logits=c, targets=targets))


def fused_eval(h_ref, w_ref, h_cand, w_cand, targets, block):
  return head.token_stats(ref_hidden=h_ref, ref_unembedding=w_ref, cand_hidden=h_cand, cand_unembedding=w_cand,
                          targets=targets, block_size=block)


def naive_train(h, w, ids, logprobs):
  loss = lambda h, w: losses.topk_kl_divergence(student_logits=jnp.dot(h, w, preferred_element_type=jnp.float32),
                                                teacher=losses.TopK(ids, logprobs)).mean()
  return jax.value_and_grad(loss, (0, 1))(h, w)


def fused_train(h, w, ids, logprobs, block):
  loss = lambda h, w: head.topk_kl_divergence(student_hidden=h, student_unembedding=w,
                                              teacher=losses.TopK(ids, logprobs), block_size=block).mean()
  return jax.value_and_grad(loss, (0, 1))(h, w)


def measure(fn, args, repeats: int) -> tuple[float, int]:
  """(median seconds per call, compiled temp bytes) of ``jit(fn)(*args)``."""
  compiled = jax.jit(fn).lower(*args).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times), temp


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=PRESETS, default="cpu")
  parser.add_argument("--quick", action="store_true", help="same as --preset quick")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  cfg = PRESETS["quick" if args.quick else args.preset]
  dtype = jnp.dtype(cfg["dtype"])
  n, d = cfg["tokens"], cfg["dim"]
  key = jax.random.key(0)

  table = Table(title=f"fused head vs materialized logits on {jax.devices()[0].device_kind} "
                f"(T={n}, d={d}, {dtype.name}, block={cfg['block']}, top-K={TOP_K})")
  for col in ("workload", "V", "naive ms", "fused ms", "time fused/naive", "naive temp MB", "fused temp MB",
              "memory naive/fused"):
    table.add_column(col, justify="right")
  for v in cfg["vocabs"]:
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.fold_in(key, v), 5)
    h_ref = jax.random.normal(k1, (n, d), dtype)
    w_ref = (jax.random.normal(k2, (d, v)) * d**-0.5 * 4).astype(dtype)
    h_cand = (h_ref + 0.05 * jax.random.normal(k3, (n, d))).astype(dtype)
    w_cand = (w_ref + 0.05 * d**-0.5 * jax.random.normal(k4, (d, v))).astype(dtype)
    targets = jax.random.randint(k5, (n,), 0, v)
    teacher = jax.jit(functools.partial(head.teacher_topk, k=TOP_K, block_size=cfg["block"]))(h_ref, w_ref)
    workloads = {
        "eval": (naive_eval, functools.partial(fused_eval, block=cfg["block"]),
                 (h_ref, w_ref, h_cand, w_cand, targets)),
        "train": (naive_train, functools.partial(fused_train, block=cfg["block"]),
                  (h_cand, w_cand, teacher.ids, teacher.logprobs)),
    }
    for name, (naive, fused, inputs) in workloads.items():
      t_naive, m_naive = measure(naive, inputs, args.repeats)
      t_fused, m_fused = measure(fused, inputs, args.repeats)
      table.add_row(name, str(v), f"{t_naive * 1e3:.1f}", f"{t_fused * 1e3:.1f}", f"{t_fused / t_naive:.2f}x",
                    f"{m_naive / 2**20:.1f}", f"{m_fused / 2**20:.1f}", f"{m_naive / max(m_fused, 1):.1f}x")
  Console().print(table)


if __name__ == "__main__":
  main()
