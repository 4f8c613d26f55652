"""Peak host memory of ``tailjax eval`` on a CPU, by dtype: a ~0.85B bfloat16 Llama against its ``@int4``.

Writes a random Llama-shaped bfloat16 checkpoint (``benchmarks/load.py``'s shape, 19 layers and an
8,192-token byte-level BPE tokenizer trained on CPython's docs: 0.87B parameters, 1.6 GiB), then runs
``tailjax eval --reference DIR --candidate @int4 --dtype D`` for each dtype in a fresh process and
reports its resident high-water mark (``VmHWM``). The pair's weights are what the run must hold:
2 x 1.6 GiB in bfloat16, 2 x 3.2 GiB in float32.

Issue 32: XLA:CPU computes half-precision ops in float32, the layer scan's row slicing included, so a
bfloat16 run used to convert every stacked weight to float32 before the loop (weights x 3 in all).

  python benchmarks/cpu_memory.py                  # both dtypes
  python benchmarks/cpu_memory.py --dtypes bfloat16 --layers 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from load import peak_rss, shape, write_safetensors  # noqa: E402 (the benchmark beside this one)

VOCAB = 8192


def write_tokenizer(directory: Path, vocab_size: int) -> None:
  """A byte-level BPE tokenizer of ``vocab_size`` ids trained on CPython's documentation (present offline)."""
  import transformers
  from pydoc_data.topics import topics
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  backend = Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  backend.train_from_iterator(list(topics.values()), trainer)
  if backend.get_vocab_size() != vocab_size:
    raise RuntimeError(f"the tokenizer reached {backend.get_vocab_size()} ids, not {vocab_size}")
  transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(directory)


def child(directory: str, dtype: str, output: str, sequences: int) -> dict:
  """In a fresh process: the eval, then this process's peak RSS."""
  from tailjax import cli

  start = time.perf_counter()
  cli.main(["--no-compile-cache", "eval", "--reference", directory, "--candidate", "@int4", "--dtype", dtype,
            "--num-sequences", str(sequences), "--seq-len", "512", "--output", output], standalone_mode=False)
  return {"seconds": time.perf_counter() - start, "peak_rss": peak_rss()}


def measure(directory: Path, dtype: str, output: Path, sequences: int) -> dict:
  out = subprocess.run([sys.executable, __file__, "--child", str(directory), dtype, str(output), str(sequences)],
                       capture_output=True, text=True, env={**os.environ, "TAILJAX_COMPILE_CACHE": "off"})
  if out.returncode:
    raise RuntimeError(f"eval in {dtype} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--layers", type=int, default=19)
  parser.add_argument("--sequences", type=int, default=4, help="windows of 512 tokens scored")
  parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
  parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    directory, dtype, output, sequences = args.child
    print(json.dumps(child(directory, dtype, output, int(sequences))))
    return
  cfg = shape(args.layers) | {"vocab_size": VOCAB}
  gib = lambda b: f"{b / 2**30:.2f}"
  with tempfile.TemporaryDirectory() as tmp:
    directory = Path(tmp) / "hf"
    weight_bytes = write_safetensors(directory, cfg)
    write_tokenizer(directory, VOCAB)
    params = weight_bytes // 2
    rows = [(dtype, measure(directory, dtype, Path(tmp) / f"run-{dtype}", args.sequences)) for dtype in args.dtypes]
  print(f"\n{params / 1e9:.2f}B parameters ({args.layers} layers), checkpoint {gib(weight_bytes)} GiB (bf16); "
        f"{args.sequences} windows x 512 tokens\n")
  print("| --dtype | pair's weights GiB | peak RSS GiB | peak / weights | eval s |")
  print("|---|---:|---:|---:|---:|")
  for dtype, r in rows:
    weights = 2 * params * (2 if dtype in ("bfloat16", "float16") else 4)
    print(f"| {dtype} | {gib(weights)} | {gib(r['peak_rss'])} | {r['peak_rss'] / weights:.2f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
  main()
