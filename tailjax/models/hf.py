"""Hugging Face model directories -> ``ModelConfig``, weights and tokenizer, offline.

A directory holds ``config.json``, one ``model.safetensors`` or shards listed by
``model.safetensors.index.json``, and tokenizer files that ``transformers.AutoTokenizer``
reads. Config fields tailjax does not know are an error, not silently ignored: a field
that changes the forward pass (``partial_rotary_factor``, ``quantization_config``, ...)
must not produce a model that only looks right.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tailjax.models.config import ModelConfig, RopeScaling

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# Fields that configure training, generation or bookkeeping, not the forward pass.
_INERT_FIELDS = frozenset({
    "_name_or_path", "architectures", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id",
    "torch_dtype", "dtype", "transformers_version", "use_cache", "initializer_range", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "output_attentions", "output_hidden_states", "problem_type",
    "return_dict", "is_llama_config", "tokenizer_class", "tie_encoder_decoder", "torchscript", "use_bfloat16",
    "max_length", "min_length", "do_sample", "num_beams", "temperature", "top_k", "top_p", "embedding_dropout",
})
_MODEL_FIELDS = frozenset({
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rope_theta", "rope_scaling", "rope_parameters", "rms_norm_eps",
    "tie_word_embeddings", "attention_bias", "max_position_embeddings", "sliding_window", "use_sliding_window",
    "max_window_layers", "layer_types", "hidden_act", "mlp_bias", "pretraining_tp",
})
_ROPE_FIELDS = {
    "rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "low_freq_factor",
    "high_freq_factor", "beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate",
}


def read_config(directory: Path) -> ModelConfig:
  path = directory / "config.json"
  try:
    raw = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as err:
    raise ValueError(f"{path}: not a readable config.json ({err})") from err
  model_type = raw.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"{path}: model_type {model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
  unknown = set(raw) - _MODEL_FIELDS - _INERT_FIELDS
  if unknown:
    raise ValueError(f"{path}: unknown config fields {sorted(unknown)}; tailjax will not guess what they change")

  def require(condition: bool, field: str, why: str):
    if not condition:
      raise ValueError(f"{path}: {field}={raw.get(field)!r} is not supported ({why})")

  require(raw.get("hidden_act", "silu") in ("silu", "swish"), "hidden_act", "the MLP is SwiGLU")
  require(not raw.get("mlp_bias", False), "mlp_bias", "the MLP has no bias")
  require(raw.get("pretraining_tp", 1) in (None, 1), "pretraining_tp", "only 1")
  layer_types = set(raw.get("layer_types") or ())
  require(len(layer_types) <= 1, "layer_types", "one attention type for every layer")
  sliding = raw.get("sliding_window")
  if model_type == "qwen2":
    sliding = sliding if raw.get("use_sliding_window") or layer_types == {"sliding_attention"} else None
    require(sliding is None or raw.get("max_window_layers", 0) == 0, "max_window_layers", "sliding in every layer")
  heads = raw.get("num_attention_heads")
  theta, scaling = _rope(raw, path)
  try:
    return ModelConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim"),
        rope_theta=float(theta),
        rope_scaling=scaling,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
        o_bias=bool(raw.get("attention_bias", False)),
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        sliding_window=sliding,
    )
  except (KeyError, TypeError, ValueError) as err:
    raise ValueError(f"{path}: {err!r}") from err


def _rope(raw: dict, path: Path) -> tuple[float, RopeScaling | None]:
  """``rope_parameters`` (transformers 5) or the older ``rope_theta`` + ``rope_scaling``."""
  params = dict(raw.get("rope_parameters") or {})
  params = {"rope_theta": raw.get("rope_theta", 10000.0), **(raw.get("rope_scaling") or {}), **params}
  unknown = set(params) - _ROPE_FIELDS
  if unknown:
    raise ValueError(f"{path}: unknown rope parameters {sorted(unknown)}")
  kind = params.pop("rope_type", params.pop("type", "default"))
  params.pop("type", None)
  theta = params.pop("rope_theta")
  if kind == "default":
    return theta, None
  if kind == "yarn" and params.get("factor") is None:
    params["factor"] = raw["max_position_embeddings"] / params["original_max_position_embeddings"]
  try:
    return theta, RopeScaling(type=kind, **{k: v for k, v in params.items() if v is not None})
  except (TypeError, ValueError) as err:
    raise ValueError(f"{path}: rope parameters: {err}") from err


def safetensors_files(directory: Path) -> list[Path]:
  """The checkpoint's files: the shards an index names (all must exist) or every ``*.safetensors``."""
  index = directory / "model.safetensors.index.json"
  if index.exists():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as err:
      raise ValueError(f"{index}: not a safetensors index ({err!r})") from err
    files = [directory / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.exists()]
    if missing:
      raise ValueError(f"{index}: shards missing from {directory}: {missing}")
    return files
  files = sorted(directory.glob("*.safetensors"))
  if not files:
    found = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
    raise ValueError(f"{directory}: no *.safetensors weights (found: {found})")
  return files


def read_tensors(directory: Path) -> Iterator[tuple[str, np.ndarray]]:
  """``(Hugging Face name, array in PyTorch layout)``, one tensor at a time."""
  from safetensors import SafetensorError, safe_open

  for file in safetensors_files(directory):
    try:
      with safe_open(file, framework="numpy") as f:
        for name in f.keys():
          yield name, f.get_tensor(name)
    except (OSError, SafetensorError) as err:
      raise ValueError(f"{file}: unreadable safetensors file ({err})") from err


def read_tokenizer(directory: Path):
  """``transformers.AutoTokenizer`` from the directory, or None if it ships no tokenizer."""
  names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
  if not any((directory / name).exists() for name in names):
    return None
  from transformers import AutoTokenizer

  try:
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)
  except (OSError, ValueError) as err:
    raise ValueError(f"{directory}: tokenizer files present but unreadable ({err})") from err
