"""GGUF files (llama.cpp's format) -> ``ModelConfig``, weights and tokenizer.

Tensors are dequantized by the ``gguf`` package (every common quant type) to float32 in
PyTorch's ``[out, in]`` order (stacked experts: ``[E, out, in]``) and renamed to the canonical
(Hugging Face) names ``tailjax.models.load`` fills. What llama.cpp's converter changed is
undone here: ``attn_q``/``attn_k`` rows of ``llama`` and ``mistral3`` files are permuted for its
rotary layout (permuted back to ``rotate_half``'s), Gemma 2/3's zero-centred norms are stored as
``1 + w`` (1 is subtracted), Phi-3's LongRoPE factors are tensors (read into the config).
Metadata llama.cpp does not store is filled in the way llama.cpp itself assumes it (Gemma's
layer pattern and query scale, Llama 4's attention pattern: ``tailjax.models.gguf_families``).
The tokenizer is rebuilt from the file's vocabulary and merges with transformers' own GGUF mapping.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tailjax.models import families, gguf_families, lazy
from tailjax.models.config import ModelConfig, RopeScaling

# GGUF tensor names -> canonical names (``{}`` is the layer index).
_HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.attn_output.bias": "model.layers.{}.self_attn.o_proj.bias",
    "blk.{}.attn_q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "blk.{}.attn_k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
    "blk.{}.attn_qkv.weight": "model.layers.{}.self_attn.qkv_proj.weight",
    "blk.{}.ffn_gate_inp.weight": "model.layers.{}.mlp.gate.weight",
    **{f"blk.{{}}.ffn_{x}_exps.weight": f"model.layers.{{}}.mlp.experts.{x}_proj.weight" for x in ("gate", "up", "down")},
    **{f"blk.{{}}.attn_{x}.{kind}": f"model.layers.{{}}.self_attn.{x}_proj.{kind}"
       for x in "qkv" for kind in ("weight", "bias")},
}
# Gemma's four norms per block (elsewhere ``ffn_norm`` is the one norm before the MLP).
_SANDWICH_NAMES = {
    "blk.{}.post_attention_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.pre_feedforward_layernorm.weight",
    "blk.{}.post_ffw_norm.weight": "model.layers.{}.post_feedforward_layernorm.weight",
}
# GLM's router's choice-only bias (``glm4moe``, ``deepseek2``).
_CORRECTION_BIAS = {"blk.{}.exp_probs_b.bias": "model.layers.{}.mlp.gate.e_score_correction_bias"}
# GLM-4.5 (``glm4moe``): the norm before the MLP.
_GLM4MOE_NAMES = {"blk.{}.post_attention_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
                  **_CORRECTION_BIAS}
# GLM-4.7-Flash (``deepseek2``): multi-head latent attention.
_MLA_NAMES = {
    **{f"blk.{{}}.attn_{g}.weight": f"model.layers.{{}}.self_attn.{h}.weight" for g, h in (
        ("q_a", "q_a_proj"), ("q_a_norm", "q_a_layernorm"), ("q_b", "q_b_proj"), ("kv_a_mqa", "kv_a_proj_with_mqa"),
        ("kv_a_norm", "kv_a_layernorm"), ("kv_b", "kv_b_proj"))},
    **_CORRECTION_BIAS,
}
# gpt-oss: sinks, the norm before the MLP, biased router and experts.
_GPT_OSS_NAMES = {
    "blk.{}.attn_sinks.weight": "model.layers.{}.self_attn.sinks",
    "blk.{}.post_attention_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate_inp.bias": "model.layers.{}.mlp.gate.bias",
    **{f"blk.{{}}.ffn_{x}_exps.bias": f"model.layers.{{}}.mlp.experts.{x}_proj.bias" for x in ("gate", "up", "down")},
}
# Gemma 4: the layer scalar, the experts beside the MLP (``moe.``, fused gate/up as transformers keeps them) and
# their norms, per-layer inputs.
_GEMMA4_NAMES = {
    "blk.{}.layer_output_scale.weight": "model.layers.{}.layer_scalar",
    "blk.{}.ffn_gate_inp.weight": "model.layers.{}.moe.gate.weight",
    "blk.{}.ffn_gate_inp.scale": "model.layers.{}.moe.router_scale",
    "blk.{}.ffn_down_exps.scale": "model.layers.{}.moe.per_expert_scale",
    "blk.{}.ffn_gate_up_exps.weight": "model.layers.{}.moe.experts.gate_up_proj",
    "blk.{}.ffn_down_exps.weight": "model.layers.{}.moe.experts.down_proj.weight",
    "blk.{}.pre_ffw_norm_2.weight": "model.layers.{}.pre_feedforward_layernorm_2.weight",
    "blk.{}.post_ffw_norm_1.weight": "model.layers.{}.post_feedforward_layernorm_1.weight",
    "blk.{}.post_ffw_norm_2.weight": "model.layers.{}.post_feedforward_layernorm_2.weight",
    "blk.{}.inp_gate.weight": "model.layers.{}.per_layer_input_gate.weight",
    "blk.{}.proj.weight": "model.layers.{}.per_layer_projection.weight",
    "blk.{}.post_norm.weight": "model.layers.{}.post_per_layer_input_norm.weight",
    "per_layer_token_embd.weight": "model.embed_tokens_per_layer.weight",
    "per_layer_model_proj.weight": "model.per_layer_model_projection.weight",
    "per_layer_proj_norm.weight": "model.per_layer_projection_norm.weight",
}
# Qwen3.5 / 3.6 (llama.cpp ``qwen35``, ``qwen35moe``): Gated DeltaNet layers, the norm before the MLP, shared experts.
_QWEN35_NAMES = {
    "blk.{}.post_attention_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.attn_qkv.weight": "model.layers.{}.linear_attn.in_proj_qkv.weight",
    "blk.{}.attn_gate.weight": "model.layers.{}.linear_attn.in_proj_z.weight",
    "blk.{}.ssm_beta.weight": "model.layers.{}.linear_attn.in_proj_b.weight",
    "blk.{}.ssm_alpha.weight": "model.layers.{}.linear_attn.in_proj_a.weight",
    "blk.{}.ssm_out.weight": "model.layers.{}.linear_attn.out_proj.weight",
    "blk.{}.ssm_norm.weight": "model.layers.{}.linear_attn.norm.weight",
    "blk.{}.ssm_conv1d.weight": "model.layers.{}.linear_attn.conv1d.weight",
    "blk.{}.ssm_a": "model.layers.{}.linear_attn.A_log",  # stored as -exp(A_log)
    "blk.{}.ssm_dt.bias": "model.layers.{}.linear_attn.dt_bias",
}
# A shared expert behind a sigmoid gate (``qwen2moe``, ``qwen35moe``), or without one (canonical: ``shared_experts``).
_SHARED_EXPERT_NAMES = {
    "blk.{}.ffn_gate_inp_shexp.weight": "model.layers.{}.mlp.shared_expert_gate.weight",
    **{f"blk.{{}}.ffn_{x}_shexp.weight": f"model.layers.{{}}.mlp.shared_expert.{x}_proj.weight"
       for x in ("gate", "up", "down")},
}
_SHARED_EXPERTS_NAMES = {f"blk.{{}}.ffn_{x}_shexp.weight": f"model.layers.{{}}.mlp.shared_experts.{x}_proj.weight"
                         for x in ("gate", "up", "down")}
_ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
# ``{arch}.*`` metadata this reader understands; any other key might change the forward pass: an error.
_KNOWN_KEYS = frozenset({
    "context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
    "attention.layer_norm_rms_epsilon", "attention.sliding_window", "attention.sliding_window_pattern",
    "attention.scale", "rope.freq_base", "rope.freq_base_swa", "rope.dimension_count", "rope.scaling.type",
    "rope.scaling.factor", "rope.scaling.original_context_length", "rope.scaling.attn_factor",
    "rope.scaling.finetuned", "attn_logit_softcapping", "final_logit_softcapping", "expert_count",
    "expert_used_count", "expert_feed_forward_length", "expert_weights_norm", "expert_gating_func",
    "expert_shared_feed_forward_length", "ssm.conv_kernel", "ssm.state_size", "ssm.group_count",
    "ssm.time_step_rank", "ssm.inner_size", "full_attention_interval", "rope.dimension_sections",
    "nextn_predict_layers", "rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow",
})


def hf_name(name: str, cfg: ModelConfig | None = None, arch: str | None = None) -> str:
  """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (unknown names pass through).

  Old Mixtral files keep one tensor per expert: ``blk.3.ffn_gate.5.weight`` -> ``...mlp.experts.5.gate_proj.weight``.
  """
  table = {**_HF_NAMES, **_SANDWICH_NAMES} if cfg is not None and cfg.sandwich_norms else _HF_NAMES
  if arch == "phi3":  # its ffn_up holds gate and up, stacked
    table = {**table, "blk.{}.ffn_up.weight": "model.layers.{}.mlp.gate_up_proj.weight"}
  if arch in gguf_families.QWEN35:
    table = {**table, **_QWEN35_NAMES}
  if arch == "glm4moe":
    table = {**table, **_GLM4MOE_NAMES}
  if arch in gguf_families.MLA:
    table = {**table, **_MLA_NAMES}
  if arch == "gpt-oss":
    table = {**table, **_GPT_OSS_NAMES}
  if arch == "gemma4":
    table = {**table, **_GEMMA4_NAMES}
  if cfg is not None and cfg.shared_expert_size:
    table = {**table, **(_SHARED_EXPERT_NAMES if cfg.shared_expert_gate else _SHARED_EXPERTS_NAMES)}
  parts = name.split(".")
  if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
    if len(parts) == 5 and parts[2] in ("ffn_gate", "ffn_up", "ffn_down") and parts[3].isdigit():
      return f"model.layers.{parts[1]}.mlp.experts.{parts[3]}.{parts[2][4:]}_proj.{parts[4]}"
    pattern = table.get(".".join(["blk", "{}", *parts[2:]]))
    return pattern.format(parts[1]) if pattern else name
  return table.get(name, name)


def field(reader, key: str, default=None):
  """The value of a metadata key (a float as the shortest decimal that round-trips float32), or ``default``."""
  value = reader.fields.get(key)
  if value is None:
    return default
  value = value.contents()
  return gguf_families.float32(value) if isinstance(value, float) else value


def read_config(reader, path: Path) -> ModelConfig:
  arch = field(reader, "general.architecture")
  names = {t.name: t for t in reader.tensors}
  family = families.for_gguf(arch, bool(field(reader, f"{arch}.expert_count", 0)), str(path))

  need = lambda key: _need(reader, f"{arch}.{key}", path)
  opt = lambda key, default=None: field(reader, f"{arch}.{key}", default)

  def first(value, key: str):  # a per-layer array -> layer 0's value (the architecture's fields read the rest)
    if not isinstance(value, list):
      return value
    if key not in gguf_families.PER_LAYER.get(arch, ()):
      raise ValueError(f"{path}: GGUF metadata {arch}.{key} holds one value per layer; not supported for {arch}")
    return value[0]
  known = _KNOWN_KEYS | gguf_families.KEYS.get(arch, frozenset())
  for key in reader.fields:
    if key.startswith(f"{arch}.") and key[len(arch) + 1:] not in known:
      raise ValueError(f"{path}: GGUF metadata {key}={field(reader, key)!r} is not supported "
                       "(tailjax will not guess what it changes)")
  gating = gguf_families.GATING.get(arch, 1)  # llama.cpp: 1 softmax, 2 sigmoid
  if opt("expert_gating_func", 1) != gating and (opt("expert_count") or opt("expert_gating_func") is not None):
    raise ValueError(f"{path}: {arch}.expert_gating_func={opt('expert_gating_func', 1)} is not supported "
                     f"({'softmax' if gating == 1 else 'sigmoid'} only)")
  vocab = opt("vocab_size") or len(field(reader, "tokenizer.ggml.tokens") or [])
  heads = int(need("attention.head_count"))
  hidden = int(need("embedding_length"))
  layers = int(need("block_count")) - int(opt("nextn_predict_layers", 0))  # multi-token-prediction layers: skipped
  head_dim = int(opt("attention.key_length", hidden // heads))
  mla = arch in gguf_families.MLA  # key and value lengths of the latent cache: the family reads its own
  if int(opt("attention.value_length", head_dim)) != head_dim and not mla:
    raise ValueError(f"{path}: {arch}.attention.value_length={opt('attention.value_length')} differs from "
                     f"key_length={head_dim}; not supported")
  rotary_dims = int(opt("rope.dimension_count", head_dim))
  if rotary_dims != head_dim and not family.partial_rotary and not mla:
    raise ValueError(f"{path}: partial rotary embeddings ({arch}.rope.dimension_count={rotary_dims} < "
                     f"head_dim={head_dim}) are not supported for {family.name}")
  width = first(opt("feed_forward_length") if opt("expert_count") else need("feed_forward_length"), "feed_forward_length")
  fields = dict(
      vocab_size=int(vocab),
      hidden_size=hidden,
      intermediate_size=int(width or need("expert_feed_forward_length")),  # (every layer MoE: no dense MLP)
      num_layers=layers,
      num_heads=heads,
      num_kv_heads=int(first(opt("attention.head_count_kv", heads), "attention.head_count_kv")),
      head_dim=head_dim,
      rope_theta=float(opt("rope.freq_base", 10000.0)),
      rope_scaling=_rope_scaling(reader, arch, names, path),
      rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
      tie_word_embeddings="output.weight" not in names,
      qkv_bias="blk.0.attn_q.bias" in names,
      o_bias="blk.0.attn_output.bias" in names,
      max_position_embeddings=int(opt("context_length", 4096)),
      sliding_window=int(opt("attention.sliding_window") or 0) or None,  # 0: none, as llama.cpp reads it
      rotary_dim=None if rotary_dims == head_dim else rotary_dims,
  )
  if opt("expert_count"):
    dense = tuple(i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in names)
    fields.update(num_experts=int(opt("expert_count")), num_experts_per_tok=int(need("expert_used_count")),
                  moe_intermediate_size=int(opt("expert_feed_forward_length", fields["intermediate_size"])),
                  norm_topk_prob=bool(opt("expert_weights_norm", arch in ("llama", "qwen3moe"))), dense_layers=dense)
    if opt("expert_shared_feed_forward_length"):
      fields.update(shared_expert_size=int(opt("expert_shared_feed_forward_length")),
                    shared_expert_gate=any(name.endswith(".ffn_gate_inp_shexp.weight") for name in names))
  shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}  # PyTorch order
  try:
    fields.update(gguf_families.config_fields(arch, opt, lambda key: _need(reader, f"{arch}.{key}", None), fields,
                                              shapes))
    fields.update(family.config_fields())
    return ModelConfig(**fields)
  except (TypeError, ValueError) as err:
    raise ValueError(f"{path}: {err}") from err


def _rope_scaling(reader, arch: str, names: dict, path: Path) -> RopeScaling | None:
  """llama.cpp stores Llama 3's scaling as per-frequency divisors (``rope_freqs``), Phi-3's LongRoPE as
  ``rope_factors_long`` / ``_short`` tensors, the others as metadata."""
  vector = lambda name: tuple(float(x) for x in np.asarray(names[name].data, np.float64).ravel())
  if "rope_freqs.weight" in names:
    return RopeScaling(type="factors", divisors=vector("rope_freqs.weight"))
  original = field(reader, f"{arch}.rope.scaling.original_context_length")
  if "rope_factors_long.weight" in names:
    attn = field(reader, f"{arch}.rope.scaling.attn_factor")
    return RopeScaling(type="longrope", long_factor=vector("rope_factors_long.weight"),
                       short_factor=vector("rope_factors_short.weight"),
                       original_max_position_embeddings=None if original is None else int(original),
                       attention_factor=None if attn is None else float(attn))
  kind = field(reader, f"{arch}.rope.scaling.type", "none")
  if kind == "none":
    return None
  if kind not in ("linear", "yarn"):
    raise ValueError(f"{path}: {arch}.rope.scaling.type={kind!r} is not supported")
  yarn = {}
  if kind == "yarn":  # llama.cpp's defaults are transformers' (32, 1)
    yarn = dict(beta_fast=field(reader, f"{arch}.rope.scaling.yarn_beta_fast", 32.0),
                beta_slow=field(reader, f"{arch}.rope.scaling.yarn_beta_slow", 1.0))
    try:
      yarn.update(gguf_families.yarn_fields(arch, field(reader, f"{arch}.rope.scaling.yarn_log_multiplier")))
    except ValueError as err:
      raise ValueError(f"{path}: {err}") from err
  return RopeScaling(type=kind, factor=float(_need(reader, f"{arch}.rope.scaling.factor", path)),
                     original_max_position_embeddings=None if original is None else int(original), **yarn)


def _need(reader, key: str, path: Path | None):
  value = field(reader, key)
  if value is None:
    raise ValueError(f"{path}: GGUF metadata lacks {key}" if path else f"GGUF metadata lacks {key}")
  return value


_CHUNK = 1 << 23  # elements dequantized at a time (32 MiB of float32): bounds gguf's temporaries


def _tensor(t, path: Path) -> lazy.LazyTensor:
  """One GGUF tensor, lazily, in PyTorch layout (numpy order of llama.cpp's ``ne``): a box dequantizes
  only the rows (leading indices) it covers, a few MiB at a time, whole quant blocks along the last axis,
  keeping the box's columns. Each read maps the tensor's bytes afresh and drops the map after, so the
  pages it touched leave the process."""
  from gguf.quants import dequantize

  shape = tuple(int(n) for n in reversed(t.shape))
  stored_shape, stored_dtype = t.data.shape, t.data.dtype

  def read(box):
    *lead, last = box
    data = np.memmap(path, dtype=stored_dtype, mode="r", offset=t.data_offset, shape=stored_shape)
    out = np.empty([s.stop - s.start for s in box], np.float32)
    try:
      if not lead:
        out[...] = dequantize(np.asarray(data), t.tensor_type).reshape(shape)[last]
        return out
      *outer, rows = lead
      step = max(1, _CHUNK // (shape[-1] * int(np.prod([s.stop - s.start for s in outer], dtype=np.int64))))
      for start in range(rows.start, rows.stop, step):
        stop = min(start + step, rows.stop)
        part = dequantize(np.asarray(data[(*outer, slice(start, stop))]), t.tensor_type)
        out[..., start - rows.start:stop - rows.start, :] = part.reshape(*out.shape[:-2], stop - start,
                                                                          shape[-1])[..., last]
      return out
    except NotImplementedError as err:
      raise ValueError(f"{path}: tensor {t.name} has quant type {t.tensor_type.name} that gguf cannot read") from err
    finally:
      del data

  return lazy.Stored(shape, read)


def read_tensors(reader, cfg: ModelConfig, path: Path) -> Iterator[tuple[str, lazy.LazyTensor]]:
  """``(canonical name, lazy float32 tensor in PyTorch layout)``, q/k rows in Hugging Face order."""
  arch = field(reader, "general.architecture")
  tensors = {}
  for t in reader.tensors:
    if t.name in _ROPE_TENSORS:  # read into the config
      continue
    parts = t.name.split(".")
    if parts[0] == "blk" and int(parts[1]) >= cfg.num_layers:  # a multi-token-prediction layer
      continue
    w = _tensor(t, path)
    w.read(tuple(slice(0, min(1, n)) for n in w.shape))  # an unreadable quant type fails now, not mid-placement
    w = gguf_families.tensor(arch, t.name, w, cfg)
    if cfg.norm_unit_offset and t.name.endswith("norm.weight") and not t.name.endswith("ssm_norm.weight"):
      w = lazy.Mapped(w, lambda x: x - np.float32(1.0))
    tensors[t.name] = w
  for name, w in gguf_families.merged(arch, tensors, cfg).items():
    yield hf_name(name, cfg, arch), w


def read_tokenizer(reader, path: Path):
  """The ``tokenizers.Tokenizer`` the file describes (ids identical to AutoTokenizer's)."""
  from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

  mapping = GGUF_TOKENIZER_MAPPING["tokenizer"]
  fields = {name: field(reader, f"tokenizer.{key}") for key, name in mapping.items()}
  fields = {k: v for k, v in fields.items() if v is not None}
  if "tokens" not in fields:
    raise ValueError(f"{path}: GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
  tokenizer, _ = convert_gguf_tokenizer(field(reader, "general.architecture"), fields)
  return tokenizer
