"""Host memory and wall time of loading a ~1B-parameter checkpoint: the old way against the sharded way.

Writes a random Llama-shaped checkpoint (TinyLlama-1.1B's shape by default: d=2048, 22 layers,
FFN 5632, 32 heads, 4 KV heads, V=32000) as bfloat16 safetensors in four shards, and the same
weights as a Q8_0 GGUF, then loads each in a fresh process and reports its peak resident memory
(``VmHWM``, which counts the mapped file pages a process touches) and wall time:

- ``float32, 1 device``: what ``tailjax eval`` did before issue 16 (every parameter float32, whole,
  on one device, the model then moved onto a mesh);
- ``bfloat16, 1 device``: the checkpoint's own dtype;
- ``bfloat16, fsdp=8``: straight into 8 shards per matrix (8 simulated CPU devices here, so the
  host still holds every shard; on accelerators the host holds only the box being read).

``import only`` is the same process with nothing loaded (jax, flax, transformers imported): the floor.
Target (issue 16): the bfloat16 load's peak <= checkpoint bytes + 1 GB.

  python benchmarks/load.py                  # ~1.1B parameters
  python benchmarks/load.py --layers 4       # a quick look
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

import numpy as np


def shape(layers: int) -> dict:
  return dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
              num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
              rope_theta=10000.0, tie_word_embeddings=False)


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
  d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
  kv = d // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
  out = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    out |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f)}
  return out


def random_tensor(name: str, shape: tuple[int, ...], rng) -> np.ndarray:
  if len(shape) == 1:
    return (1 + 0.1 * rng.standard_normal(shape, np.float32))
  return rng.standard_normal(shape, np.float32) * np.float32(shape[-1] ** -0.5)


def write_safetensors(directory: Path, cfg: dict, shards: int = 4) -> int:
  """bfloat16 safetensors in ``shards`` files with an index, and config.json; returns the weight bytes."""
  import ml_dtypes
  import transformers
  from safetensors.numpy import save_file

  directory.mkdir(parents=True)
  transformers.LlamaConfig(**cfg, torch_dtype="bfloat16").save_pretrained(directory)
  rng = np.random.default_rng(0)
  names = list(tensor_shapes(cfg).items())
  weight_map, total = {}, 0
  for k in range(shards):
    part = names[k * len(names) // shards:(k + 1) * len(names) // shards]
    file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
    tensors = {name: random_tensor(name, s, rng).astype(ml_dtypes.bfloat16) for name, s in part}
    save_file(tensors, str(directory / file))
    total += sum(t.nbytes for t in tensors.values())
    weight_map |= {name: file for name, _ in part}
  (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
  return total


def write_gguf(path: Path, directory: Path, cfg: dict) -> None:
  """The safetensors weights as a llama-architecture GGUF: matrices Q8_0 (q/k rows permuted as llama.cpp's
  converter does), norms float32, a small byte-level tokenizer padded to the vocabulary."""
  import gguf
  from gguf.quants import quantize
  from safetensors import safe_open

  heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(cfg["num_hidden_layers"])
  w.add_context_length(cfg["max_position_embeddings"])
  w.add_embedding_length(cfg["hidden_size"])
  w.add_feed_forward_length(cfg["intermediate_size"])
  w.add_head_count(heads)
  w.add_head_count_kv(kv)
  w.add_rope_freq_base(cfg["rope_theta"])
  w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
  w.add_vocab_size(cfg["vocab_size"])
  letters = [chr(ord("a") + i) for i in range(26)]
  tokens = letters + ["Ġ"] + [f"{a}e" for a in letters]
  tokens += [f"<extra{i}>" for i in range(cfg["vocab_size"] - len(tokens) - 1)] + ["<|endoftext|>"]
  w.add_tokenizer_model("gpt2")
  w.add_token_list(tokens)
  w.add_token_merges([f"{t[0]} {t[1]}" for t in tokens[27:53]])
  w.add_token_types([1] * len(tokens))
  names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
  blocks = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
            "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
            "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
            "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
            "mlp.down_proj.weight": "ffn_down.weight"}
  for file in sorted(directory.glob("*.safetensors")):
    with safe_open(file, framework="numpy") as f:
      for name in f.keys():
        value = f.get_tensor(name).astype(np.float32)
        if name.startswith("model.layers."):
          _, _, layer, rest = name.split(".", 3)
          if rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
            h = heads if "q_proj" in rest else kv
            value = value.reshape(h, 2, value.shape[0] // h // 2, -1).swapaxes(1, 2).reshape(value.shape)
          target = f"blk.{layer}.{blocks[rest]}"
        else:
          target = names[name]
        if value.ndim == 2:
          w.add_tensor(target, quantize(value, gguf.GGMLQuantizationType.Q8_0),
                       raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
          w.add_tensor(target, value)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def child(spec: str, dtype: str, layout: str | None) -> dict:
  """In a fresh process: load (or, for spec "-", only import) and report peak RSS and seconds."""
  import jax

  from tailjax import mesh, models

  start = time.perf_counter()
  params = 0
  if spec != "-":
    loaded = models.load(spec, dtype, device_mesh=mesh.parse(layout) if layout else None)
    leaves = jax.tree.leaves(loaded.model)
    jax.block_until_ready(leaves)
    params = sum(x.size for x in leaves)
  return {"seconds": time.perf_counter() - start, "peak_rss": peak_rss(), "params": params}


def peak_rss() -> int:
  """This process image's resident high-water mark (``VmHWM``: unlike ``ru_maxrss`` it does not inherit the
  parent's peak across fork and exec)."""
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) * 1024
  raise OSError("no VmHWM in /proc/self/status")


def measure(spec: str, dtype: str, layout: str | None) -> dict:
  env = {**os.environ, "TAILJAX_COMPILE_CACHE": "off"}
  if layout:
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  out = subprocess.run([sys.executable, __file__, "--child", spec, dtype, layout or ""], env=env,
                       capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f"loading {spec} ({dtype}, {layout}) failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--layers", type=int, default=22)
  parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    spec, dtype, layout = args.child
    print(json.dumps(child(spec, dtype, layout or None)))
    return
  cfg = shape(args.layers)
  gib = lambda b: f"{b / 2**30:.2f}"
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir, gguf_path = Path(tmp) / "hf", Path(tmp) / "model.gguf"
    start = time.perf_counter()
    weight_bytes = write_safetensors(hf_dir, cfg)
    write_gguf(gguf_path, hf_dir, cfg)
    print(f"wrote {weight_bytes / 2**30:.2f} GiB of bfloat16 safetensors and a {gguf_path.stat().st_size / 2**30:.2f}"
          f" GiB Q8_0 GGUF ({args.layers} layers) in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    floor = measure("-", "float32", None)
    rows = [("import only", "", floor)]
    for source, spec in (("safetensors bf16", str(hf_dir)), ("GGUF Q8_0", str(gguf_path))):
      for dtype, layout in (("float32", None), ("bfloat16", None), ("bfloat16", "fsdp=8")):
        rows.append((source, f"{dtype}, {layout or '1 device'}", measure(spec, dtype, layout)))
  params = rows[1][2]["params"]
  print(f"\n{params / 1e9:.2f}B parameters, checkpoint {gib(weight_bytes)} GiB (bf16); target: bf16 peak <= "
        f"{gib(weight_bytes + 2**30)} GiB\n")
  print("| source | parameters | peak RSS GiB | above import GiB | x checkpoint bytes | load s |")
  print("|---|---|---:|---:|---:|---:|")
  for source, how, r in rows:
    above = r["peak_rss"] - floor["peak_rss"]
    print(f"| {source} | {how} | {gib(r['peak_rss'])} | {gib(above)} | {r['peak_rss'] / weight_bytes:.2f} | "
          f"{r['seconds']:.1f} |")


if __name__ == "__main__":
  main()
