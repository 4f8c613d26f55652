"""GGUF files (llama.cpp's format) -> ``ModelConfig``, weights and tokenizer.

Tensors are dequantized by the ``gguf`` package (every common quant type) to float32 in
PyTorch's ``[out, in]`` order (stacked experts: ``[E, out, in]``) and renamed to the canonical
(Hugging Face) names ``tailjax.models.load`` fills. What llama.cpp's converter changed is
undone here: ``attn_q``/``attn_k`` rows of ``llama``-arch files are permuted for its rotary
layout (permuted back to ``rotate_half``'s), Gemma's zero-centred norms are stored as
``1 + w`` (1 is subtracted), Phi-3's LongRoPE factors are tensors (read into the config).
Metadata llama.cpp does not store is filled in the way llama.cpp itself assumes it (Gemma's
layer pattern and query scale: see ``read_config``). The tokenizer is rebuilt from the file's
vocabulary and merges with transformers' own GGUF mapping.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tailjax.models import families, lazy
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
# A shared expert behind a sigmoid gate (``qwen2moe``, ``qwen35moe``).
_SHARED_EXPERT_NAMES = {
    "blk.{}.ffn_gate_inp_shexp.weight": "model.layers.{}.mlp.shared_expert_gate.weight",
    **{f"blk.{{}}.ffn_{x}_shexp.weight": f"model.layers.{{}}.mlp.shared_expert.{x}_proj.weight"
       for x in ("gate", "up", "down")},
}
_QWEN35 = ("qwen35", "qwen35moe")
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
    "nextn_predict_layers",
})


def hf_name(name: str, cfg: ModelConfig | None = None, arch: str | None = None) -> str:
  """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (unknown names pass through).

  Old Mixtral files keep one tensor per expert: ``blk.3.ffn_gate.5.weight`` -> ``...mlp.experts.5.gate_proj.weight``.
  """
  table = {**_HF_NAMES, **_SANDWICH_NAMES} if cfg is not None and cfg.sandwich_norms else _HF_NAMES
  if arch == "phi3":  # its ffn_up holds gate and up, stacked
    table = {**table, "blk.{}.ffn_up.weight": "model.layers.{}.mlp.gate_up_proj.weight"}
  if arch in _QWEN35:
    table = {**table, **_QWEN35_NAMES}
  if arch in ("qwen2moe", "qwen35moe"):
    table = {**table, **_SHARED_EXPERT_NAMES}
  parts = name.split(".")
  if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
    if len(parts) == 5 and parts[2] in ("ffn_gate", "ffn_up", "ffn_down") and parts[3].isdigit():
      return f"model.layers.{parts[1]}.mlp.experts.{parts[3]}.{parts[2][4:]}_proj.{parts[4]}"
    pattern = table.get(".".join(["blk", "{}", *parts[2:]]))
    return pattern.format(parts[1]) if pattern else name
  return table.get(name, name)


def field(reader, key: str, default=None):
  """The value of a metadata key, or ``default`` when the file lacks it."""
  value = reader.fields.get(key)
  if value is None:
    return default
  return value.contents()


def _f32(value) -> float:
  """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.9999997e-06)."""
  return float(np.format_float_scientific(np.float32(value), unique=True))


def read_config(reader, path: Path) -> ModelConfig:
  arch = field(reader, "general.architecture")
  names = {t.name: t for t in reader.tensors}
  family = families.for_gguf(arch, bool(field(reader, f"{arch}.expert_count", 0)), str(path))

  need = lambda key: _need(reader, f"{arch}.{key}", path)
  opt = lambda key, default=None: field(reader, f"{arch}.{key}", default)
  for key in reader.fields:
    if key.startswith(f"{arch}.") and key[len(arch) + 1:] not in _KNOWN_KEYS:
      raise ValueError(f"{path}: GGUF metadata {key}={field(reader, key)!r} is not supported "
                       "(tailjax will not guess what it changes)")
  if opt("expert_gating_func", 1) != 1:  # llama.cpp: 1 softmax, 2 sigmoid
    raise ValueError(f"{path}: {arch}.expert_gating_func={opt('expert_gating_func')} is not supported (softmax only)")
  vocab = opt("vocab_size") or len(field(reader, "tokenizer.ggml.tokens") or [])
  heads = int(need("attention.head_count"))
  hidden = int(need("embedding_length"))
  layers = int(need("block_count")) - int(opt("nextn_predict_layers", 0))  # multi-token-prediction layers: skipped
  head_dim = int(opt("attention.key_length", hidden // heads))
  if int(opt("attention.value_length", head_dim)) != head_dim:
    raise ValueError(f"{path}: {arch}.attention.value_length={opt('attention.value_length')} differs from "
                     f"key_length={head_dim}; not supported")
  rotary_dims = int(opt("rope.dimension_count", head_dim))
  if rotary_dims != head_dim and not family.partial_rotary:
    raise ValueError(f"{path}: partial rotary embeddings ({arch}.rope.dimension_count={rotary_dims} < "
                     f"head_dim={head_dim}) are not supported for {family.name}")
  width = opt("feed_forward_length") if opt("expert_count") else need("feed_forward_length")
  fields = dict(
      vocab_size=int(vocab),
      hidden_size=hidden,
      intermediate_size=int(width or need("expert_feed_forward_length")),  # (every layer MoE: no dense MLP)
      num_layers=layers,
      num_heads=heads,
      num_kv_heads=int(opt("attention.head_count_kv", heads)),
      head_dim=head_dim,
      rope_theta=_f32(opt("rope.freq_base", 10000.0)),
      rope_scaling=_rope_scaling(reader, arch, names, path),
      rms_norm_eps=_f32(need("attention.layer_norm_rms_epsilon")),
      tie_word_embeddings="output.weight" not in names,
      qkv_bias="blk.0.attn_q.bias" in names,
      o_bias="blk.0.attn_output.bias" in names,
      max_position_embeddings=int(opt("context_length", 4096)),
      sliding_window=int(opt("attention.sliding_window") or 0) or None,  # 0: none, as llama.cpp reads it
      rotary_dim=None if rotary_dims == head_dim else rotary_dims,
  )
  if arch in _QWEN35:
    fields.update(_qwen35(reader, arch, layers, path))
  if family.name.startswith("gemma"):
    fields.update(_gemma(reader, arch, layers, head_dim, hidden // heads, fields["sliding_window"]))
  if opt("expert_count"):
    dense = tuple(i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in names)
    fields.update(num_experts=int(opt("expert_count")), num_experts_per_tok=int(need("expert_used_count")),
                  moe_intermediate_size=int(opt("expert_feed_forward_length", fields["intermediate_size"])),
                  norm_topk_prob=bool(opt("expert_weights_norm", arch in ("llama", "qwen3moe"))), dense_layers=dense)
    if opt("expert_shared_feed_forward_length"):
      fields.update(shared_expert_size=int(opt("expert_shared_feed_forward_length")),
                    shared_expert_gate=any(name.endswith(".ffn_gate_inp_shexp.weight") for name in names))
  fields.update(family.config_fields())
  try:
    return ModelConfig(**fields)
  except (TypeError, ValueError) as err:
    raise ValueError(f"{path}: {err}") from err


def _qwen35(reader, arch: str, layers: int, path: Path) -> dict:
  """Qwen3.5's linear-attention shapes from llama.cpp's ``ssm.*`` keys (``state_size``: the key head width,
  ``group_count``: key heads, ``time_step_rank``: value heads, ``inner_size``: value heads x width) and its
  layer pattern: every ``full_attention_interval``-th layer full attention, the others Gated DeltaNet."""
  need = lambda key: int(_need(reader, f"{arch}.{key}", path))
  interval = int(field(reader, f"{arch}.full_attention_interval", 4))
  value_heads = need("ssm.time_step_rank")
  return dict(layer_types=tuple("full" if (i + 1) % interval == 0 else "linear" for i in range(layers)),
              linear_num_key_heads=need("ssm.group_count"), linear_num_value_heads=value_heads,
              linear_key_head_dim=need("ssm.state_size"), linear_value_head_dim=need("ssm.inner_size") // value_heads,
              linear_conv_kernel=need("ssm.conv_kernel"))


def _gemma(reader, arch: str, layers: int, head_dim: int, hidden_per_head: int, window: int | None) -> dict:
  """What Gemma files leave to llama.cpp's code: which layers slide (Gemma 2: every other one, from the
  first; Gemma 3: five of every six, unless ``attention.sliding_window_pattern`` says), the local RoPE
  base (10000 unless ``rope.freq_base_swa``), and the query scale (``head_dim``, but ``hidden / heads``
  for the 27B models, 46 and 62 layers, as in llama.cpp; ``attention.scale`` overrides)."""
  opt = lambda key, default=None: field(reader, f"{arch}.{key}", default)
  pattern = opt("attention.sliding_window_pattern", 2 if arch == "gemma2" else 6)
  if isinstance(pattern, list):  # one flag per layer
    kinds = tuple("sliding" if flag else "full" for flag in pattern)
  else:
    kinds = tuple("sliding" if (i + 1) % int(pattern) else "full" for i in range(layers))
  big = (arch, layers) in (("gemma2", 46), ("gemma3", 62))
  scale = opt("attention.scale")
  out = dict(layer_types=kinds if window is not None else None,
             query_pre_attn_scalar=float(scale**-2) if scale else float(hidden_per_head if big else head_dim),
             attn_logit_softcap=opt("attn_logit_softcapping"), final_logit_softcap=opt("final_logit_softcapping"))
  if arch == "gemma3":
    out["rope_local_theta"] = _f32(opt("rope.freq_base_swa", 10000.0))
  return {k: _f32(v) if isinstance(v, float) else v for k, v in out.items()}


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
                       attention_factor=None if attn is None else _f32(attn))
  kind = field(reader, f"{arch}.rope.scaling.type", "none")
  if kind == "none":
    return None
  if kind not in ("linear", "yarn"):
    raise ValueError(f"{path}: {arch}.rope.scaling.type={kind!r} is not supported")
  return RopeScaling(type=kind, factor=_f32(_need(reader, f"{arch}.rope.scaling.factor", path)),
                     original_max_position_embeddings=None if original is None else int(original))


def _need(reader, key: str, path: Path):
  value = field(reader, key)
  if value is None:
    raise ValueError(f"{path}: GGUF metadata lacks {key}")
  return value


def _unpermuted_rows(rows: int, heads: int) -> np.ndarray:
  """The row order that undoes llama.cpp's rotary permutation of a q/k weight ``[heads * head_dim, ...]``:
  within each head, rows ``0, 2, 4, ..., 1, 3, 5, ...`` (the inverse of its interleave)."""
  return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(rows)


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
  for t in reader.tensors:
    if t.name in _ROPE_TENSORS:  # read into the config
      continue
    parts = t.name.split(".")
    if parts[0] == "blk" and int(parts[1]) >= cfg.num_layers:  # a multi-token-prediction layer
      continue
    w = _tensor(t, path)
    w.read(tuple(slice(0, min(1, n)) for n in w.shape))  # an unreadable quant type fails now, not mid-placement
    if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias")):
      heads = cfg.num_heads if ".attn_q." in t.name else cfg.num_kv_heads
      w = lazy.RowsPermuted(w, _unpermuted_rows(w.shape[0], heads))
    elif arch in _QWEN35 and parts[0] == "blk" and parts[2].startswith(("attn_qkv", "attn_gate", "ssm_")):
      w = _deltanet_tensor(w, parts[2], cfg)
    elif cfg.norm_unit_offset and t.name.endswith("norm.weight"):
      w = lazy.Mapped(w, lambda x: x - np.float32(1.0))
    yield hf_name(t.name, cfg, arch), w


def _deltanet_tensor(w: lazy.LazyTensor, kind: str, cfg: ModelConfig) -> lazy.LazyTensor:
  """A Gated DeltaNet tensor as Hugging Face has it: ``ssm_a`` holds ``-exp(A_log)``, and llama.cpp reorders the
  value heads from grouped by key head (value head ``g * r + j`` uses key head ``g``, ``r`` value heads per key
  head) to tiled (at ``j * key_heads + g``), in the rows of ``attn_qkv`` (its v part), ``attn_gate``,
  ``ssm_conv1d`` (its v channels), ``ssm_beta``, ``ssm_alpha``, ``ssm_a``, ``ssm_dt`` and the columns of
  ``ssm_out``; put back here. ``ssm_norm`` is stored as is (unlike the block's other norms)."""
  if kind == "ssm_a":
    w = lazy.Mapped(w, lambda x: np.log(-x))
  keys, values = cfg.linear_num_key_heads, cfg.linear_num_value_heads
  if keys == values or kind == "ssm_norm":
    return w
  width = cfg.linear_value_head_dim if kind in ("attn_qkv", "attn_gate", "ssm_conv1d", "ssm_out") else 1
  grouped = np.arange(values * width).reshape(values // keys, keys, width).swapaxes(0, 1).reshape(-1)
  if kind in ("attn_qkv", "ssm_conv1d"):  # q and k rows first, unchanged
    qk = 2 * keys * cfg.linear_key_head_dim
    grouped = np.concatenate([np.arange(qk), qk + grouped])
  if kind == "ssm_out":
    return lazy.Transposed(lazy.RowsPermuted(lazy.Transposed(w), grouped))
  return lazy.RowsPermuted(w, grouped)


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
