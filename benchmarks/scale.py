"""Eval batch-step throughput vs mesh on simulated CPU devices: a regression harness, not a speed claim.

The CPU is split into N host-platform devices (``--xla_force_host_platform_device_count``),
so more devices share the same two cores: the table shows what partitioning costs (collectives,
smaller per-device matmuls), and a change that breaks sharding shows up as a collapse or an
error. The step is ``tailjax.eval.step``'s (reference + one candidate, fused head, sketches),
on random weights: d=256, 4 layers, V=32768, batch 8 x 512, float32.

  python benchmarks/scale.py
  python benchmarks/scale.py --meshes data=1 data=8 data=2,model=4 --repeats 5
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402 (the flag above must be set before JAX starts)
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from tailjax import mesh  # noqa: E402
from tailjax.eval import step as eval_step
from tailjax.models import Decoder, ModelConfig  # noqa: E402
from tailjax.stats import spec_for  # noqa: E402

MESHES = ("data=1", "data=2", "data=4", "data=8", "data=4,model=2", "data=2,model=4", "fsdp=8")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--meshes", nargs="+", default=MESHES)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  cfg = ModelConfig(vocab_size=32768, hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4,
                    num_kv_heads=4, tie_word_embeddings=True, max_position_embeddings=4096)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (args.batch, args.seq_len), dtype=np.int32)
  scored = np.ones((args.batch, args.seq_len - 1), bool)
  tokens_per_step = int(scored.sum())
  print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()} (simulated); "
        f"{args.batch} x {args.seq_len} tokens per step")
  print(f"{'mesh':>18} {'devices':>8} {'tokens/s':>10} {'vs data=1':>10}")
  baseline = None
  for layout in args.meshes:
    device_mesh = mesh.parse(layout, jax.devices()[:_size(layout)])
    models = tuple(mesh.shard_model(Decoder(cfg, rngs=nnx.Rngs(i)), device_mesh) for i in (0, 1))
    step = eval_step.batch_step(device_mesh)
    inputs = (mesh.global_batch(tokens, device_mesh), mesh.global_batch(scored, device_mesh))
    options = eval_step.StepOptions(("reference", "candidate"), spec_for(), cfg.vocab_size)
    run = lambda: jax.block_until_ready(step(models, *inputs, None, options))
    run()
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      run()
      times.append(time.perf_counter() - start)
    rate = tokens_per_step / statistics.median(times)
    baseline = baseline or rate
    print(f"{layout:>18} {device_mesh.size:>8} {rate:>10,.0f} {rate / baseline:>9.2f}x")


def _size(layout: str) -> int:
  sizes = [int(part.split("=")[1]) for part in layout.split(",")]
  return int(np.prod(sizes))


if __name__ == "__main__":
  main()
