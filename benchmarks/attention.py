"""tailjax's causal attention (query chunks against the keys the mask shows) vs JAX's own kernels.

Times forward + backward of ``tailjax.models.attention.causal_attention`` against
``jax.nn.dot_product_attention`` with ``implementation=None`` (XLA's full square) and, on a GPU,
``"cudnn"`` (flash attention), on one causal batch in bf16 (float32 on a CPU), and prints the
largest difference of each from tailjax's output. Keep cuDNN for the eval and distill paths only
if it is faster there.

  python benchmarks/attention.py                       # Qwen2-0.5B heads: B=8, T=2048, 14 / 2 heads, hd 64
  python benchmarks/attention.py --batch 1 --seq-len 512
"""

from __future__ import annotations

import argparse
import statistics
import time


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=2048)
  parser.add_argument("--heads", type=int, default=14)
  parser.add_argument("--kv-heads", type=int, default=2)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  from rich.console import Console
  from rich.table import Table

  from tailjax.models.attention import causal_attention

  gpu = jax.default_backend() == "gpu"
  dtype = jnp.bfloat16 if gpu else jnp.float32
  b, t, h, kv, d = args.batch, args.seq_len, args.heads, args.kv_heads, args.head_dim
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (b, t, n, d), dtype) for key, n in zip(keys, (h, kv, kv)))
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
  ours = lambda q, k, v: causal_attention(q, k, v, mask)
  variants = {"tailjax chunks": ours,
              "jax xla (full square)": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)}
  if gpu:
    variants["jax cudnn (flash)"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                                   implementation="cudnn")
  reference = np.asarray(jax.jit(ours)(q, k, v), np.float32)
  table = Table(title=f"causal attention fwd + bwd, B={b} T={t} heads={h}/{kv} hd={d} {jnp.dtype(dtype).name} "
                f"on {jax.devices()[0].device_kind}")
  for col in ("variant", "fwd ms", "fwd + bwd ms", "max |diff| vs tailjax"):
    table.add_column(col, justify="right")
  for name, fn in variants.items():
    try:
      fwd = jax.jit(fn)
      both = jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
      times = {}
      for label, f in (("fwd", fwd), ("both", both)):
        jax.block_until_ready(f(q, k, v))
        runs = []
        for _ in range(args.repeats):
          start = time.perf_counter()
          jax.block_until_ready(f(q, k, v))
          runs.append(time.perf_counter() - start)
        times[label] = statistics.median(runs) * 1e3
      diff = float(np.abs(np.asarray(fwd(q, k, v), np.float32) - reference).max())
      table.add_row(name, f"{times['fwd']:.2f}", f"{times['both']:.2f}", f"{diff:.2e}")
    except Exception as err:  # a kernel this backend does not have: say so, keep the others
      table.add_row(name, "n/a", "n/a", f"{type(err).__name__}: {str(err)[:60]}")
  Console(width=160).print(table)


if __name__ == "__main__":
  main()
