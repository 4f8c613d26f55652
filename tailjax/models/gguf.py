"""GGUF files (llama.cpp's format) -> ``ModelConfig``, weights and tokenizer.

Tensors are dequantized by the ``gguf`` package (every common quant type) to float32
in PyTorch's ``[out, in]`` order. llama.cpp stores the rows of ``attn_q``/``attn_k``
permuted for its rotary layout; they are permuted back to Hugging Face's
``rotate_half`` layout, which ``tailjax.models.transformer`` uses. The tokenizer is
rebuilt from the file's vocabulary and merges with transformers' own GGUF mapping.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tailjax.models.config import ModelConfig

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")


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

  def need(key):
    value = _field(reader, f"{arch}.{key}")
    if value is None:
      raise ValueError(f"{path}: GGUF metadata lacks {arch}.{key}")
    return value

  names = {t.name for t in reader.tensors}
  vocab = _field(reader, f"{arch}.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens") or [])
  heads = int(need("attention.head_count"))
  hidden = int(need("embedding_length"))
  return ModelConfig(
      vocab_size=int(vocab),
      hidden_size=hidden,
      intermediate_size=int(need("feed_forward_length")),
      num_layers=int(need("block_count")),
      num_heads=heads,
      num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
      head_dim=int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
      rope_theta=_f32(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
      rms_norm_eps=_f32(need("attention.layer_norm_rms_epsilon")),
      tie_word_embeddings="output.weight" not in names,
      qkv_bias="blk.0.attn_q.bias" in names,
      max_position_embeddings=int(_field(reader, f"{arch}.context_length", 4096)),
  )


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """Undo llama.cpp's rotary row permutation of a q/k weight ``[heads * head_dim, ...]``."""
  rows = w.shape[0]
  return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_tensors(reader, cfg: ModelConfig, path: Path) -> dict[str, np.ndarray]:
  """``{gguf tensor name: float32 array}`` in PyTorch layout, q/k rows in Hugging Face order."""
  from gguf.quants import dequantize

  arch = _field(reader, "general.architecture")
  tensors = {}
  for t in reader.tensors:
    try:
      w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
    except NotImplementedError as err:
      raise ValueError(f"{path}: tensor {t.name} has quant type {t.tensor_type.name} that gguf cannot read") from err
    if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_q.bias")):
      w = _unpermute(w, cfg.num_heads)
    elif arch == "llama" and t.name.endswith(("attn_k.weight", "attn_k.bias")):
      w = _unpermute(w, cfg.num_kv_heads)
    tensors[t.name] = w
  return tensors


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
