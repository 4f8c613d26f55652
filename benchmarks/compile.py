"""Start-up cost of the eval step against model depth, with and without the persistent compilation cache.

For a SmolLM2-shaped random decoder (d=576, 9 heads, 3 KV heads, FFN 1536, V=49152) of 30 and 60
layers, reference + one candidate, batch 4 x 512: seconds to trace and lower ``tailjax.eval.step``'s
batch step, and to compile it, first with an empty cache directory and then in a second process
that finds the first one's executable there (``tailjax.compile_cache``). Each measurement runs in
its own process, so nothing is cached in memory.

  python benchmarks/compile.py                 # depths 30 and 60
  python benchmarks/compile.py --depths 30 60 80
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time


def measure(depth: int, cache: str, seq_len: int, batch: int) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from tailjax import compile_cache
  from tailjax.eval import step as eval_step
  from tailjax.models import Decoder, ModelConfig
  from tailjax.stats import spec_for

  compile_cache.enable(cache, min_compile_seconds=0.0)
  hits = []
  jax.monitoring.register_event_listener(lambda name, **_: hits.append(name) if "cache_hits" in name else None)
  cfg = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=depth, num_heads=9,
                    num_kv_heads=3, tie_word_embeddings=True, rope_theta=1e5)
  models = nnx.eval_shape(lambda: (Decoder(cfg, rngs=nnx.Rngs(0)), Decoder(cfg, rngs=nnx.Rngs(1))))
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  scored = jax.ShapeDtypeStruct((batch, seq_len - 1), jnp.bool_)
  start = time.perf_counter()
  options = eval_step.StepOptions(("reference", "candidate"), spec_for(), cfg.vocab_size)
  lowered = eval_step.batch_step().lower(models, tokens, scored, None, options)
  traced = time.perf_counter() - start
  start = time.perf_counter()
  lowered.compile()
  return {"trace_lower_s": traced, "compile_s": time.perf_counter() - start, "cache_hits": len(hits)}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--depths", type=int, nargs="+", default=[30, 60])
  parser.add_argument("--seq-len", type=int, default=512)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(measure(int(args.child[0]), args.child[1], args.seq_len, args.batch)))
    return
  from rich.console import Console
  from rich.table import Table

  table = Table(title=f"eval step start-up (reference + 1 candidate, {args.batch} x {args.seq_len}), separate "
                "processes")
  for col in ("layers", "trace + lower s", "compile s (empty cache)", "compile s (warm cache)",
              "start-up cold / warm", "warm cache hits"):
    table.add_column(col, justify="right")
  for depth in args.depths:
    with tempfile.TemporaryDirectory() as cache:
      run = lambda: json.loads(subprocess.run(
          [sys.executable, __file__, "--child", str(depth), cache, "--seq-len", str(args.seq_len), "--batch",
           str(args.batch)], capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
      cold, warm = run(), run()
    total = lambda r: r["trace_lower_s"] + r["compile_s"]
    table.add_row(str(depth), f"{cold['trace_lower_s']:.1f}", f"{cold['compile_s']:.1f}", f"{warm['compile_s']:.2f}",
                  f"{total(cold):.1f} / {total(warm):.1f} s", str(warm["cache_hits"]))
  Console(width=160).print(table)


if __name__ == "__main__":
  main()
