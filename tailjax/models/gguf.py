"""GGUF files (llama.cpp's format) -> ``ModelConfig``, weights and tokenizer.

Tensors are dequantized by the ``gguf`` package (every common quant type) to float32
in PyTorch's ``[out, in]`` order. llama.cpp stores the rows of ``attn_q``/``attn_k``
permuted for its rotary layout; they are permuted back to Hugging Face's
``rotate_half`` layout, which ``tailjax.models.transformer`` uses. The tokenizer is
rebuilt from the file's vocabulary and merges with transformers' own GGUF mapping.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tailjax.models.config import ModelConfig, RopeScaling

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

# GGUF tensor names -> Hugging Face names (``{}`` is the layer index).
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
    **{f"blk.{{}}.attn_{x}.{kind}": f"model.layers.{{}}.self_attn.{x}_proj.{kind}"
       for x in "qkv" for kind in ("weight", "bias")},
}


def hf_name(name: str) -> str:
  """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (unknown names pass through)."""
  parts = name.split(".")
  if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
    pattern = _HF_NAMES.get(".".join(["blk", "{}", *parts[2:]]))
    return pattern.format(parts[1]) if pattern else name
  return _HF_NAMES.get(name, name)


def _field(reader, key: str, default=None):
  field = reader.fields.get(key)
  if field is None:
    return default
  return field.contents()


def _f32(value) -> float:
  """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.9999997e-06)."""
  return float(np.format_float_scientific(np.float32(value), unique=True))


def read_config(reader, path: Path) -> ModelConfig:
  arch = _field(reader, "general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {SUPPORTED_ARCHITECTURES})")

  need = lambda key: _need(reader, f"{arch}.{key}", path)
  names = {t.name: t for t in reader.tensors}
  vocab = _field(reader, f"{arch}.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens") or [])
  heads = int(need("attention.head_count"))
  hidden = int(need("embedding_length"))
  head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
  rotary_dims = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
  if rotary_dims != head_dim:
    raise ValueError(f"{path}: partial rotary embeddings ({arch}.rope.dimension_count={rotary_dims} < "
                     f"head_dim={head_dim}) are not supported")
  return ModelConfig(
      vocab_size=int(vocab),
      hidden_size=hidden,
      intermediate_size=int(need("feed_forward_length")),
      num_layers=int(need("block_count")),
      num_heads=heads,
      num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
      head_dim=head_dim,
      rope_theta=_f32(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
      rope_scaling=_rope_scaling(reader, arch, names.get("rope_freqs.weight"), path),
      rms_norm_eps=_f32(need("attention.layer_norm_rms_epsilon")),
      tie_word_embeddings="output.weight" not in names,
      qkv_bias="blk.0.attn_q.bias" in names,
      max_position_embeddings=int(_field(reader, f"{arch}.context_length", 4096)),
  )


def _rope_scaling(reader, arch: str, freqs_tensor, path: Path) -> RopeScaling | None:
  """llama.cpp stores Llama 3's scaling as per-frequency divisors (``rope_freqs``), others as metadata."""
  if freqs_tensor is not None:
    return RopeScaling(type="factors", divisors=tuple(float(x) for x in np.asarray(freqs_tensor.data).ravel()))
  kind = _field(reader, f"{arch}.rope.scaling.type", "none")
  if kind == "none":
    return None
  if kind not in ("linear", "yarn"):
    raise ValueError(f"{path}: {arch}.rope.scaling.type={kind!r} is not supported")
  original = _field(reader, f"{arch}.rope.scaling.original_context_length")
  return RopeScaling(type=kind, factor=_f32(_need(reader, f"{arch}.rope.scaling.factor", path)),
                     original_max_position_embeddings=None if original is None else int(original))


def _need(reader, key: str, path: Path):
  value = _field(reader, key)
  if value is None:
    raise ValueError(f"{path}: GGUF metadata lacks {key}")
  return value


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """Undo llama.cpp's rotary row permutation of a q/k weight ``[heads * head_dim, ...]``."""
  rows = w.shape[0]
  return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_tensors(reader, cfg: ModelConfig, path: Path) -> Iterator[tuple[str, np.ndarray]]:
  """``(Hugging Face name, float32 array in PyTorch layout)``, q/k rows in Hugging Face order."""
  from gguf.quants import dequantize

  arch = _field(reader, "general.architecture")
  for t in reader.tensors:
    if t.name == "rope_freqs.weight":  # read into the config
      continue
    try:
      w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
    except NotImplementedError as err:
      raise ValueError(f"{path}: tensor {t.name} has quant type {t.tensor_type.name} that gguf cannot read") from err
    if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_q.bias")):
      w = _unpermute(w, cfg.num_heads)
    elif arch == "llama" and t.name.endswith(("attn_k.weight", "attn_k.bias")):
      w = _unpermute(w, cfg.num_kv_heads)
    yield hf_name(t.name), w


def read_tokenizer(reader, path: Path):
  """The ``tokenizers.Tokenizer`` the file describes (ids identical to AutoTokenizer's)."""
  from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

  mapping = GGUF_TOKENIZER_MAPPING["tokenizer"]
  fields = {name: _field(reader, f"tokenizer.{key}") for key, name in mapping.items()}
  fields = {k: v for k, v in fields.items() if v is not None}
  if "tokens" not in fields:
    raise ValueError(f"{path}: GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
  tokenizer, _ = convert_gguf_tokenizer(_field(reader, "general.architecture"), fields)
  return tokenizer
