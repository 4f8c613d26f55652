"""Eval throughput and peak memory: tailjax's batch step vs the usual transformers + PyTorch way.

The usual way (the baseline, measured in the same run): two forwards returning [B, T, V]
logits, ``log_softmax``, ``F.kl_div(..., reduction="none").sum(-1)`` for per-token KLD, both
CEs and top-1 agreement. tailjax: ``tailjax.evaluate``'s jitted batch step (two forwards to
hidden states, the fused head, sketches), the exact code ``tailjax eval`` runs.

Two workloads, each implementation in its own process (peak RSS is its own):
  smollm2   SmolLM2-135M (GGUF, float32) vs its int4-g64 RTN candidate, real text;
Peak memory is the resident-set growth during the timed steps (after one warm-up call that
compiles), read from Linux's VmHWM after resetting it.
  vocab     a random 4-layer Llama (d=256) saved as a Hugging Face directory, V in {32k, 128k, 256k}:
            peak memory should stay flat in V for tailjax and grow for the baseline.

  python benchmarks/eval.py                 # both, batch 4 x 512
  python benchmarks/eval.py --only vocab --repeats 2
  python benchmarks/eval.py --only smollm2 --candidates 2   # the embedded default's shape: int4 and int3

With several candidates both sides run the reference once per batch (the usual way keeps its
log-probs; tailjax computes each reference logits block once for all candidates).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VOCABS = (32768, 131072, 262144)


def _status_mb(field: str) -> float:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def rss_mb() -> float:
  """Resident memory now, after resetting the high-water mark (Linux: clear_refs 5), so
  ``peak_mb()`` later reports the peak of what ran since, not of model loading."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  return _status_mb("VmRSS")


def peak_mb() -> float:
  return _status_mb("VmHWM")


def token_batch(size: int, seq_len: int, vocab: int, encode=None) -> np.ndarray:
  if encode is None:
    return np.random.default_rng(0).integers(0, vocab, (size, seq_len), dtype=np.int32)
  from pydoc_data.topics import topics

  return np.asarray(encode("\n\n".join(topics.values()))[:size * seq_len], np.int32).reshape(size, seq_len)


def timed(step, repeats: int) -> tuple[float, float, float]:
  """(median seconds, peak RSS growth MB, peak RSS MB) of ``step`` after one warm-up (compilation) call."""
  step()
  before = rss_mb()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return statistics.median(times), peak_mb() - before, peak_mb()


CANDIDATES = ("@int4-g64", "@int3-g64", "@int8-g64")


def jax_models(args):
  """(reference, [candidates]): RTN quantizations of the reference."""
  from tailjax import models, runner

  ref = models.load(runner.default_reference() if args.workload == "smollm2" else args.model_dir)
  return ref, [runner.load_candidate(spec, ref) for spec in CANDIDATES[:args.candidates]]


def run_jax(args) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from tailjax import evaluate
  from tailjax.stats import spec_for

  ref, cands = jax_models(args)
  encode = ref.tokenizer.encode if args.workload == "smollm2" else None
  tokens = jnp.asarray(token_batch(args.batch, args.seq_len, ref.config.vocab_size, encode))
  scored = jnp.ones((args.batch, args.seq_len - 1), bool)
  models = (ref.model, *(cand.model for cand in cands))
  step = lambda: jax.block_until_ready(evaluate._batch_stats_jit(
      models, tokens, scored, None, spec_for(), ref.config.vocab_size, 20, False, 0))
  result = dict(zip(("seconds", "peak_growth_mb", "peak_mb"), timed(step, args.repeats)))
  graph, params = nnx.split(models)
  step_fn = lambda p, t, s: evaluate._batch_stats(nnx.merge(graph, p), t, s, None, spec_for(), ref.config.vocab_size,
                                                  20, False, 0)
  lowered = jax.jit(step_fn).lower(params, tokens, scored)
  result["temp_mb"] = lowered.compile().memory_analysis().temp_size_in_bytes / 2**20
  return result


def torch_state_dict(loaded):
  """tailjax parameters -> a transformers Llama state dict (the candidate's RTN weights, exactly)."""
  import torch

  from tailjax.models.load import _targets

  return {name: torch.as_tensor(np.array(param.get_value().T if transpose else param.get_value(), np.float32))
          for name, (param, transpose) in _targets(loaded.model).items()}


def run_torch(args) -> dict:
  import torch
  import torch.nn.functional as F
  import transformers

  torch.set_num_threads(args.threads)
  ref_j, cands_j = jax_models(args)  # same weights as the JAX side, candidates included
  config = transformers.LlamaConfig(
      vocab_size=ref_j.config.vocab_size, hidden_size=ref_j.config.hidden_size,
      intermediate_size=ref_j.config.intermediate_size, num_hidden_layers=ref_j.config.num_layers,
      num_attention_heads=ref_j.config.num_heads, num_key_value_heads=ref_j.config.num_kv_heads,
      head_dim=ref_j.config.head_dim, rms_norm_eps=ref_j.config.rms_norm_eps,
      tie_word_embeddings=ref_j.config.tie_word_embeddings, max_position_embeddings=4096,
      rope_parameters={"rope_type": "default", "rope_theta": ref_j.config.rope_theta})
  torch_models = []
  for loaded in (ref_j, *cands_j):
    model = transformers.LlamaForCausalLM(config).eval()
    model.load_state_dict(torch_state_dict(loaded), strict=False)
    model.tie_weights()
    torch_models.append(model)
  encode = ref_j.tokenizer.encode if args.workload == "smollm2" else None
  tokens = torch.as_tensor(token_batch(args.batch, args.seq_len, config.vocab_size, encode), dtype=torch.long)
  del ref_j, cands_j
  targets = tokens[:, 1:, None]

  def step():
    with torch.inference_mode():
      ref_lp = F.log_softmax(torch_models[0](tokens, use_cache=False).logits[:, :-1].float(), -1)
      ref_ce, ref_top1, out = -ref_lp.gather(-1, targets), ref_lp.argmax(-1), []
      for model in torch_models[1:]:
        cand_lp = F.log_softmax(model(tokens, use_cache=False).logits[:, :-1].float(), -1)
        kld = F.kl_div(cand_lp, ref_lp, log_target=True, reduction="none").sum(-1)
        out.append((kld, ref_ce, -cand_lp.gather(-1, targets), ref_top1 == cand_lp.argmax(-1)))
      return out

  return dict(zip(("seconds", "peak_growth_mb", "peak_mb"), timed(step, args.repeats)))


def random_model_dir(root: Path, vocab: int) -> Path:
  import torch
  import transformers

  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                    max_position_embeddings=4096)
  path = root / f"llama-v{vocab}"
  transformers.LlamaForCausalLM(config).save_pretrained(path)
  return path


def child(impl: str, workload: str, args, model_dir: Path | None = None) -> dict:
  command = [sys.executable, __file__, "--impl", impl, "--workload", workload, "--batch", str(args.batch),
             "--seq-len", str(args.seq_len), "--repeats", str(args.repeats), "--threads", str(args.threads),
             "--candidates", str(args.candidates)]
  if model_dir is not None:
    command += ["--model-dir", str(model_dir)]
  out = subprocess.run(command, capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f"{impl} {workload} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq-len", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--candidates", type=int, default=1, choices=range(1, len(CANDIDATES) + 1))
  parser.add_argument("--only", choices=("smollm2", "vocab"))
  parser.add_argument("--impl", choices=("jax", "torch"), help=argparse.SUPPRESS)
  parser.add_argument("--workload", help=argparse.SUPPRESS)
  parser.add_argument("--model-dir", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.impl:
    print(json.dumps((run_jax if args.impl == "jax" else run_torch)(args)))
    return
  from rich.console import Console
  from rich.table import Table

  rows = []
  scored = args.batch * (args.seq_len - 1)
  with tempfile.TemporaryDirectory() as tmp:
    against = " + ".join(spec[1:] for spec in CANDIDATES[:args.candidates])
    cases = [("smollm2", None, f"SmolLM2-135M vs {against} (V=49152)")] if args.only != "vocab" else []
    if args.only != "smollm2":
      cases += [("vocab", random_model_dir(Path(tmp), v), f"random Llama d=256, V={v}") for v in VOCABS]
    for workload, model_dir, label in cases:
      base, ours = child("torch", workload, args, model_dir), child("jax", workload, args, model_dir)
      rows.append((label, base, ours))
  table = Table(title=f"Eval step (reference + {args.candidates} candidates), batch {args.batch} x {args.seq_len}, "
                f"float32, CPU {args.threads} threads")
  for col in ("workload", "PyTorch tok/s", "tailjax tok/s", "throughput vs PyTorch", "PyTorch peak growth MB",
              "tailjax peak growth MB", "tailjax compiled temp MB", "PyTorch peak MB", "tailjax peak MB"):
    table.add_column(col, justify="right")
  for label, base, ours in rows:
    table.add_row(label, f"{scored / base['seconds']:.0f}", f"{scored / ours['seconds']:.0f}",
                  f"{base['seconds'] / ours['seconds']:.2f}x", f"{base['peak_growth_mb']:.0f}",
                  f"{ours['peak_growth_mb']:.0f}", f"{ours['temp_mb']:.0f}", f"{base['peak_mb']:.0f}",
                  f"{ours['peak_mb']:.0f}")
  Console(width=200).print(table)


if __name__ == "__main__":
  main()
