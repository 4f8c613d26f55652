"""Distillation step throughput and memory: fused head vs materialized logits, teacher online vs cached.

Both measure ``tailjax.distill``'s jitted training step (forward, backward, AdamW) on random
weights and random tokens:

  head     top-K KL (K = 40, cached teacher) with the vocabulary V in {8k, 32k, 128k}: the fused
           head (tailjax.head, blockwise both ways) vs the baseline, the same step with the loss on
           materialized [tokens, V] logits (tailjax.losses). Memory is XLA's compiled temporary
           allocation of the step (arguments and outputs excluded; both need the V x d gradient
           of the unembedding). Target: flat in V for the fused head.
  teacher  a student (d=256, 4 layers) and a teacher 4x its non-embedding parameters (d=512);
           top-K KL with the teacher online in the step vs read from a cache.
           Target: cached >= 1.5x online.
  lora     token CE on a d=512, 8-layer model: every parameter trained (the baseline) vs rank-16 LoRA adapters on
           q, k, v, o, gate, up, down with the base frozen; step time, compiled temporaries, optimizer state.
  on_policy  full KL, the teacher of `teacher` online: a corpus step (the baseline) vs an on-policy step (the student
           continues each window's first half by 32 sampled tokens with its KV cache, then the same step):
           what one on-policy step costs in corpus steps.

  python benchmarks/distill.py                    # both, batch 8 x 256 tokens
  python benchmarks/distill.py --only teacher --repeats 10
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tailjax import distill, head, losses
from tailjax.losses import TopK
from tailjax.distill import on_policy
from tailjax.models import Decoder, ModelConfig, lora

VOCABS = (8192, 32768, 131072)
K = 40


def config(d: int, layers: int, vocab: int) -> ModelConfig:
  return ModelConfig(vocab_size=vocab, hidden_size=d, intermediate_size=4 * d, num_layers=layers, num_heads=d // 64,
                     num_kv_heads=d // 64, tie_word_embeddings=True, max_position_embeddings=4096)


class Materialized(distill.Objective):
  """The baseline: the same loss on full logits (``tailjax.losses``), as a training loop usually writes it."""

  def token_losses(self, student, batch, teacher=None):
    inputs, segments = batch["tokens"][:, :-1], batch["segments"][:, :-1]
    logits = jnp.einsum("btd,dv->btv", student(inputs, segments), student.unembedding(),
                        preferred_element_type=jnp.float32)
    if "topk_ids" in batch:
      return losses.topk_kl_divergence(student_logits=logits, vocab_size=self.vocab_size,
                                       teacher=TopK(batch["topk_ids"], batch["topk_logprobs"]))
    teacher_logits = jax.lax.stop_gradient(jnp.einsum("btd,dv->btv", teacher(inputs, segments),
                                                      teacher.unembedding()))
    return losses.topk_kl_divergence(student_logits=logits, teacher=teacher_logits, k=self.topk,
                                     vocab_size=self.vocab_size)


def make_step(student: Decoder, teacher: Decoder | None, vocab: int, fused: bool = True, objective: str = "topk"):
  """``tailjax.distill``'s public training step (its loss fused, or the materialized baseline) and a fresh state;
  a student with LoRA adapters trains them alone (its base frozen)."""
  cfg = distill.DistillConfig(objective=objective, topk=K, teacher="bench", steps=1000, warmup_steps=10)
  graphdef, params, frozen = nnx.split(student, nnx.LoRAParam if lora.adapted(student) else nnx.Param, ...)
  tx, schedule = distill.optimizer(cfg.optimizer_config())
  teacher_graphdef, teacher_state = (None, None) if teacher is None else nnx.split(teacher)
  loss = (distill.Objective if fused else Materialized)(objective, vocab, K, block_size=head.DEFAULT_BLOCK_SIZE)
  step = jax.jit(functools.partial(distill.train_step, config=distill.StepConfig(
      graphdef, teacher_graphdef, tx, schedule, accum=1, objective=loss)))
  return step, distill.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params)), teacher_state, frozen


def batch_for(vocab: int, batch: int, seq_len: int, cached: bool) -> dict[str, jax.Array]:
  rng = np.random.default_rng(0)
  out = {"tokens": jnp.asarray(rng.integers(0, vocab, (batch, seq_len + 1), dtype=np.int32)),
         "segments": jnp.ones((batch, seq_len + 1), jnp.int32), "scored": jnp.ones((batch, seq_len + 1), bool)}
  if cached:
    ids = np.argsort(rng.random((batch, seq_len, vocab)), axis=-1)[..., :K] if vocab <= 8192 else \
        rng.integers(0, vocab, (batch, seq_len, K))
    logprobs = np.sort(np.log(rng.dirichlet(np.ones(K), (batch, seq_len)) * 0.9), axis=-1)[..., ::-1]
    out["topk_ids"], out["topk_logprobs"] = jnp.asarray(ids, jnp.int32), jnp.asarray(logprobs.copy(), jnp.float32)
  return out


def measure(step, state, batch, teacher_state, repeats: int, frozen=None) -> tuple[float, float]:
  """(median seconds per step, compiled temporary MB)."""
  compiled = step.lower(state, batch, teacher_state, frozen).compile()
  temp_mb = compiled.memory_analysis().temp_size_in_bytes / 2**20
  state, metrics = compiled(state, batch, teacher_state, frozen)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, teacher_state, frozen)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return statistics.median(times), temp_mb


def bench_head(args) -> None:
  tokens = args.batch * args.seq_len
  print(f"\nhead: top-{K} KL training step, student d=256 x 2 layers, {args.batch} x {args.seq_len} tokens, "
        "cached teacher")
  print(f"{'V':>8} {'impl':>13} {'tokens/s':>10} {'temp MB':>9} {'speed ratio':>12} {'memory ratio':>13}")
  for vocab in VOCABS:
    student = Decoder(config(256, 2, vocab), rngs=nnx.Rngs(0))
    batch = batch_for(vocab, args.batch, args.seq_len, cached=True)
    rows = {}
    for fused in (False, True):
      step, state, _, _ = make_step(student, None, vocab, fused)
      rows[fused] = measure(step, state, batch, None, args.repeats)
    for fused, name in ((False, "materialized"), (True, "fused")):
      seconds, temp = rows[fused]
      print(f"{vocab:>8} {name:>13} {tokens / seconds:>10,.0f} {temp:>9.0f} "
            f"{rows[False][0] / seconds:>11.2f}x {rows[False][1] / temp:>12.2f}x")


def bench_teacher(args) -> None:
  vocab = 8192
  tokens = args.batch * args.seq_len
  student = Decoder(config(256, 4, vocab), rngs=nnx.Rngs(0))
  teacher = Decoder(config(512, 4, vocab), rngs=nnx.Rngs(1))
  body = lambda m: m.cfg.num_params - vocab * m.cfg.hidden_size
  print(f"\nteacher: top-{K} KL training step, V={vocab}, {args.batch} x {args.seq_len} tokens; teacher "
        f"{body(teacher) / body(student):.1f}x the student's non-embedding parameters")
  print(f"{'teacher':>8} {'tokens/s':>10} {'temp MB':>9} {'ratio':>7}")
  step, state, teacher_state, _ = make_step(student, teacher, vocab)
  online = measure(step, state, batch_for(vocab, args.batch, args.seq_len, False), teacher_state, args.repeats)
  step, state, _, _ = make_step(student, None, vocab)
  cached = measure(step, state, batch_for(vocab, args.batch, args.seq_len, True), None, args.repeats)
  for name, (seconds, temp) in (("online", online), ("cached", cached)):
    print(f"{name:>8} {tokens / seconds:>10,.0f} {temp:>9.0f} {online[0] / seconds:>6.2f}x")


def bench_lora(args) -> None:
  vocab = 8192
  tokens = args.batch * args.seq_len
  print(f"\nlora: token CE training step, d=512 x 8 layers, V={vocab}, {args.batch} x {args.seq_len} tokens")
  print(f"{'trained':>22} {'tokens/s':>10} {'temp MB':>9} {'opt state MB':>13} {'speed ratio':>12}")
  rows = {}
  for name in ("every parameter", "rank-16 LoRA adapters"):
    student = Decoder(config(512, 8, vocab), rngs=nnx.Rngs(0))
    if name != "every parameter":
      lora.adapt(student, lora.LoraConfig(rank=16, alpha=32.0), nnx.Rngs(1))
    step, state, _, frozen = make_step(student, None, vocab, objective="ce")
    opt_mb = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.opt_state)) / 2**20
    seconds, temp = measure(step, state, batch_for(vocab, args.batch, args.seq_len, False), None, args.repeats,
                            frozen)
    rows[name] = seconds
    print(f"{name:>22} {tokens / seconds:>10,.0f} {temp:>9.0f} {opt_mb:>13.1f} "
          f"{rows['every parameter'] / seconds:>11.2f}x")


def bench_on_policy(args) -> None:
  vocab = 8192
  student = Decoder(config(256, 4, vocab), rngs=nnx.Rngs(0))
  teacher = Decoder(config(512, 4, vocab), rngs=nnx.Rngs(1))
  policy = on_policy.OnPolicyConfig(fraction=1.0, max_new_tokens=32, prompt_tokens=args.seq_len // 2)
  batch = {k: np.asarray(v) for k, v in batch_for(vocab, args.batch, args.seq_len, False).items()}
  step, state, teacher_state, _ = make_step(student, teacher, vocab, objective="kl")
  corpus, _ = measure(step, state, jax.tree.map(jnp.asarray, batch), teacher_state, args.repeats)
  sampling = []
  for seed in range(args.repeats + 1):  # the first compiles
    start = time.perf_counter()
    resampled = on_policy.resample(student, batch, policy, seed)
    sampling.append(time.perf_counter() - start)
  sampled = statistics.median(sampling[1:])
  print(f"\non_policy: full KL training step, teacher online, V={vocab}, {args.batch} x {args.seq_len} tokens; "
        f"on-policy: {resampled.targets // args.batch} tokens sampled per window after its first {policy.prompt_tokens}")
  print(f"{'step':>10} {'sampling s':>11} {'step s':>8} {'steps/s':>8} {'cost in corpus steps':>21}")
  for name, extra in (("corpus", 0.0), ("on-policy", sampled)):
    print(f"{name:>10} {extra:>11.3f} {corpus:>8.3f} {1 / (corpus + extra):>8.2f} {(corpus + extra) / corpus:>20.2f}x")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--only", choices=("head", "teacher", "lora", "on_policy"))
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}")
  if args.only in (None, "head"):
    bench_head(args)
  if args.only in (None, "teacher"):
    bench_teacher(args)
  if args.only in (None, "lora"):
    bench_lora(args)
  if args.only in (None, "on_policy"):
    bench_on_policy(args)


if __name__ == "__main__":
  main()
