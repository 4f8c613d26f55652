"""Hugging Face model directories -> ``ModelConfig``, weights and tokenizer, offline.

A directory holds ``config.json``, one ``model.safetensors`` or shards listed by
``model.safetensors.index.json``, and tokenizer files that ``transformers.AutoTokenizer``
reads. Config fields tailjax does not know are an error, not silently ignored: a field
that changes the forward pass (``partial_rotary_factor``, ``quantization_config``, ...)
must not produce a model that only looks right.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path


from tailjax.models import families, hf_families, lazy
from tailjax.models.config import ModelConfig, RopeScaling

log = logging.getLogger("tailjax")

# Fields that configure training, generation or bookkeeping, not the forward pass.
_INERT_FIELDS = frozenset({
    "_name_or_path", "architectures", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id",
    "torch_dtype", "dtype", "transformers_version", "use_cache", "initializer_range", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "output_attentions", "output_hidden_states", "problem_type",
    "return_dict", "is_llama_config", "tokenizer_class", "tie_encoder_decoder", "torchscript", "use_bfloat16",
    "max_length", "min_length", "do_sample", "num_beams", "temperature", "top_k", "top_p", "embedding_dropout",
    "router_aux_loss_coef", "output_router_logits", "router_jitter_noise", "resid_pdrop", "embd_pdrop",
    "cache_implementation", "auto_map",
})
_MODEL_FIELDS = frozenset({
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rope_theta", "rope_scaling", "rope_parameters", "rms_norm_eps",
    "tie_word_embeddings", "attention_bias", "max_position_embeddings", "sliding_window", "use_sliding_window",
    "max_window_layers", "layer_types", "hidden_act", "mlp_bias", "pretraining_tp",
    # Gemma 2/3
    "hidden_activation", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
    "rope_local_base_freq", "sliding_window_pattern", "_sliding_window_pattern", "use_bidirectional_attention",
    # mixtures of experts
    "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
    "decoder_sparse_step", "mlp_only_layers",
    # Phi-3
    "original_max_position_embeddings", "partial_rotary_factor",
    # gpt-oss
    "swiglu_alpha", "swiglu_limit",
    # GLM-4.5 MoE
    "n_routed_experts", "n_shared_experts", "routed_scaling_factor", "n_group", "topk_group", "first_k_dense_replace",
    "use_qk_norm", "num_mtp_layers", "num_nextn_predict_layers",
    # Qwen2-MoE
    "shared_expert_intermediate_size", "qkv_bias",
    # Qwen3.5 / Qwen3.6 (Gated DeltaNet layers; multi-token-prediction layers skipped)
    "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
    "linear_num_value_heads", "full_attention_interval", "attn_output_gate", "mtp_num_hidden_layers",
    "mtp_use_dedicated_embeddings",
    # Gemma 4
    "vocab_size_per_layer_input", "hidden_size_per_layer_input", "attention_k_eq_v", "num_kv_shared_layers",
    "enable_moe_block", "use_double_wide_mlp", "top_k_experts", "per_layer_config", "global_head_dim",
    "num_global_key_value_heads",
    # Llama 4
    "intermediate_size_mlp", "moe_layers", "interleave_moe_layer_step", "no_rope_layers", "no_rope_layer_interval",
    "attention_chunk_size", "attn_temperature_tuning", "floor_scale", "attn_scale",
    # GLM-4.7-Flash (multi-head latent attention)
    "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "qk_head_dim", "v_head_dim",
    "rope_interleave",
    "mlp_layer_types",
})
_ROPE_FIELDS = {
    "rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "low_freq_factor",
    "high_freq_factor", "beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate",
    "short_factor", "long_factor", "partial_rotary_factor", "llama_4_scaling_beta", "max_position_embeddings",
    "mrope_section", "mrope_interleaved",
}
# A multimodal checkpoint's parts that are not its language model.
_VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.", "multi_modal_projector.",
                    "model.visual.", "visual.", "model.embed_vision.", "vision_model.", "model.audio_tower.",
                    "model.embed_audio.")
# Qwen3.5's multi-token-prediction head (speculative decoding, not the next-token distribution).
_PREDICTION_PREFIXES = ("mtp.", "model.mtp.")
# Multimodal checkpoints whose language model tailjax evaluates: model_type -> the text model's type.
_MULTIMODAL = {"mistral3": "mistral", "qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text",
               "gemma4": "gemma4_text", "llama4": "llama4_text"}


def read_raw_config(directory: Path) -> dict:
  """``config.json`` as a dict; a multimodal checkpoint's ``text_config`` (its language model)."""
  path = directory / "config.json"
  try:
    raw = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as err:
    raise ValueError(f"{path}: not a readable config.json ({err})") from err
  kind = raw.get("model_type")
  if kind in _MULTIMODAL:  # Mistral3ForConditionalGeneration (Mistral Small 3.x, Devstral 2), Qwen3.5 / 3.6
    text = raw.get("text_config")
    if not isinstance(text, dict):
      raise ValueError(f"{path}: a {kind} (multimodal) config without a text_config")
    log.warning("%s: multimodal %s checkpoint: evaluating its language model; the vision tower is skipped",
                directory, kind)
    return {**text, "model_type": text.get("model_type", _MULTIMODAL[kind]),
            "tie_word_embeddings": raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))}
  if raw.get("model_type") == "gemma3":  # Gemma3ForConditionalGeneration
    text = raw.get("text_config")
    if not isinstance(text, dict):
      raise ValueError(f"{path}: a gemma3 (multimodal) config without a text_config")
    log.warning("%s: multimodal gemma3 checkpoint: evaluating its language model; the vision tower is skipped",
                directory)
    raw = {"vocab_size": 262208, **text, "model_type": "gemma3_text",
           "tie_word_embeddings": raw.get("tie_word_embeddings", text.get("tie_word_embeddings", True))}
  return raw


def read_config(directory: Path) -> ModelConfig:
  path = directory / "config.json"
  raw = read_raw_config(directory)
  model_type = raw.get("model_type")
  family = families.for_hf(model_type, str(path))
  quantization = raw.get("quantization_config")
  if family.name == "gpt-oss" and isinstance(quantization, dict) and quantization.get("quant_method") == "mxfp4":
    raw = {k: v for k, v in raw.items() if k != "quantization_config"}  # experts in MXFP4: dequantized on load
  unknown = set(raw) - _MODEL_FIELDS - _INERT_FIELDS
  if unknown:
    raise ValueError(f"{path}: unknown config fields {sorted(unknown)}; tailjax will not guess what they change")

  def require(condition: bool, field: str, why: str):
    if not condition:
      raise ValueError(f"{path}: {field}={raw.get(field)!r} is not supported ({why})")

  raw = hf_families.normalized(family.name, raw)
  if family.name.startswith("qwen3.5") and _partial_rotary_factor(raw) is None:
    raw = {**raw, "partial_rotary_factor": 0.25}  # transformers' default for the family
  experts = _experts(raw, raw.get("num_hidden_layers") or 0)
  every_layer_sparse = experts and not experts["dense_layers"]
  missing = [key for key in _REQUIRED if raw.get(key) is None and not (key == "intermediate_size" and
                                                                        every_layer_sparse)]
  if missing:
    raise ValueError(f"{path}: lacks the fields {missing}")

  gemma = family.name.startswith("gemma")
  act_field = "hidden_activation" if gemma and raw.get("hidden_activation") else "hidden_act"
  act = raw.get(act_field) or ("gelu_pytorch_tanh" if gemma else "silu")
  require(act in _ACTIVATIONS, act_field, f"supported: {sorted(_ACTIVATIONS)}")
  require(not raw.get("mlp_bias", False), "mlp_bias", "the MLP has no bias")
  require(raw.get("pretraining_tp", 1) in (None, 1), "pretraining_tp", "only 1")
  require(not raw.get("use_bidirectional_attention"), "use_bidirectional_attention", "decoders are causal")
  heads = raw.get("num_attention_heads")
  layers = raw.get("num_hidden_layers")
  rotary_dim = _rotary_dim(raw)
  if rotary_dim is not None and not family.partial_rotary:
    raise ValueError(f"{path}: partial_rotary_factor={_partial_rotary_factor(raw)} is not supported ({family.name} "
                     "rotates whole heads)")
  theta, scaling, local_theta = _rope(raw, path, gemma)
  sliding, layer_types = _attention_layers(raw, family.name, layers, path)
  fields = dict(
      vocab_size=raw.get("vocab_size"),
      hidden_size=raw.get("hidden_size"),
      intermediate_size=raw.get("intermediate_size") or experts["moe_intermediate_size"],  # (MoE: no dense MLP)
      num_layers=layers,
      num_heads=heads,
      num_kv_heads=raw.get("num_key_value_heads") or heads,
      head_dim=raw.get("head_dim"),
      rope_theta=float(theta),
      rope_scaling=scaling,
      rope_local_theta=local_theta,
      rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(raw.get("tie_word_embeddings", gemma)),
      qkv_bias=bool(raw.get("attention_bias", raw.get("qkv_bias", False))),
      o_bias=bool(raw.get("attention_bias", False)),
      max_position_embeddings=raw.get("max_position_embeddings", 4096),
      sliding_window=sliding,
      layer_types=layer_types,
      hidden_act=_ACTIVATIONS[act],
      query_pre_attn_scalar=raw.get("query_pre_attn_scalar") if gemma else None,
      attn_logit_softcap=raw.get("attn_logit_softcapping"),
      final_logit_softcap=raw.get("final_logit_softcapping"),
      query_position_scaling=_query_position_scaling(raw, path),
      rotary_dim=rotary_dim,
      **{k: float(raw[k]) for k in ("swiglu_alpha", "swiglu_limit") if raw.get(k) is not None},
      **experts,
  )
  if raw.get("use_qk_norm") is not None:
    fields["qk_norm"] = bool(raw["use_qk_norm"])
  if layer_types is not None and "linear" in layer_types:
    fields.update(linear_num_key_heads=raw.get("linear_num_key_heads"),
                  linear_num_value_heads=raw.get("linear_num_value_heads"),
                  linear_key_head_dim=raw.get("linear_key_head_dim"),
                  linear_value_head_dim=raw.get("linear_value_head_dim"),
                  linear_conv_kernel=raw.get("linear_conv_kernel_dim", 4))
  fields.update(hf_families.fields(family.name, raw, layer_types, path))
  require(raw.get("attn_output_gate", True) or not family.config_fields().get("attn_output_gate"),
          "attn_output_gate", f"transformers' {family.name} always gates its attention output")
  fields.update(family.config_fields())
  try:
    return ModelConfig(**fields)
  except (KeyError, TypeError, ValueError) as err:
    raise ValueError(f"{path}: {err!r}") from err


_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def _attention_layers(raw: dict, family: str, layers: int, path: Path) -> tuple[int | None, tuple[str, ...] | None]:
  """``(sliding_window, layer_types)``: which layers attend through a window, as transformers decides."""
  window = raw.get("sliding_window")
  kinds = raw.get("layer_types")
  if family in ("qwen2", "qwen2-moe", "qwen3", "qwen3-moe") and not raw.get("use_sliding_window", False):
    window = None  # Qwen configs carry a window size that is off unless use_sliding_window
  if kinds is None and family.startswith("qwen3.5"):  # transformers' default: every 4th layer full attention
    interval = raw.get("full_attention_interval") or 4
    kinds = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)]
  if kinds is None and window is not None:
    if family.startswith("qwen"):
      start = raw.get("max_window_layers", 0)
      kinds = ["sliding_attention" if i >= start else "full_attention" for i in range(layers)]
    elif family == "gemma2":
      kinds = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    elif family == "gemma3":  # (Gemma 4 configs always list layer_types)
      pattern = raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern") or 6
      kinds = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
  if kinds is None:
    return window, None
  names = {"full_attention": "full", "sliding_attention": "sliding"}
  if family.startswith("qwen3.5"):
    names["linear_attention"] = "linear"
  if family == "llama4":
    names["chunked_attention"] = "chunked"
  unknown = set(kinds) - set(names)
  if unknown:
    raise ValueError(f"{path}: layer_types {sorted(unknown)} are not supported (supported: {sorted(names)})")
  if len(kinds) != layers:
    raise ValueError(f"{path}: layer_types names {len(kinds)} layers, num_hidden_layers is {layers}")
  kinds = tuple(names[k] for k in kinds)
  if "sliding" not in kinds:
    return None, kinds if {"linear", "chunked"} & set(kinds) else None
  if window is None:
    raise ValueError(f"{path}: layer_types has sliding layers but sliding_window is not set")
  return window, kinds


def _partial_rotary_factor(raw: dict) -> float | None:
  """``partial_rotary_factor``: in ``rope_parameters`` as transformers 5 writes it, or at the top level."""
  return (raw.get("rope_parameters") or {}).get("partial_rotary_factor", raw.get("partial_rotary_factor"))


def _rotary_dim(raw: dict) -> int | None:
  """``head_dim * partial_rotary_factor``; None when the whole head rotates."""
  factor = _partial_rotary_factor(raw)
  if factor in (None, 1, 1.0):
    return None
  head_dim = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
  return int(head_dim * factor)


def _query_position_scaling(raw: dict, path: Path) -> tuple[float, int] | None:
  """Mistral 3's ``rope_parameters.llama_4_scaling_beta`` with the original context it scales beyond."""
  params = raw.get("rope_parameters") or {}
  beta = params.get("llama_4_scaling_beta")
  if beta is None:
    return None
  period = params.get("original_max_position_embeddings") or raw.get("original_max_position_embeddings")
  if not period:
    raise ValueError(f"{path}: rope_parameters.llama_4_scaling_beta needs original_max_position_embeddings")
  return float(beta), int(period)


def _experts(raw: dict, layers: int) -> dict:
  """MoE fields: Qwen3-MoE names them ``num_experts``, Mixtral ``num_local_experts``; dense layers from
  ``mlp_only_layers`` and ``decoder_sparse_step`` (a layer is sparse when ``(i + 1) % step == 0``)."""
  experts = raw.get("num_experts") or raw.get("num_local_experts") or raw.get("n_routed_experts") or 0
  if not experts:
    return {}
  step = raw.get("decoder_sparse_step") or 1
  only = set(raw.get("mlp_only_layers") or ()) | set(range(raw.get("first_k_dense_replace") or 0))
  dense = tuple(i for i in range(layers) if i in only or (i + 1) % step)
  width = raw.get("moe_intermediate_size") or raw.get("intermediate_size")
  fields = dict(num_experts=experts, num_experts_per_tok=raw.get("num_experts_per_tok"), moe_intermediate_size=width,
                norm_topk_prob=bool(raw.get("norm_topk_prob", False)), dense_layers=dense)
  if raw.get("shared_expert_intermediate_size"):  # Qwen2-MoE: one gated shared expert
    fields.update(shared_expert_size=int(raw["shared_expert_intermediate_size"]), shared_expert_gate=True)
  if raw.get("n_group") is not None:  # GLM-4.5: group-limited routing and shared experts
    fields.update(router_groups=(int(raw["n_group"]), int(raw.get("topk_group") or 1)),
                  routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
                  shared_expert_size=int(raw.get("n_shared_experts") or 0) * width)
  return fields


def _rope(raw: dict, path: Path, gemma: bool) -> tuple[float, RopeScaling | None, float | None]:
  """``(theta, scaling, local theta)`` from ``rope_parameters`` (transformers 5) or the older ``rope_theta`` +
  ``rope_scaling``; Gemma 3 keeps one set per layer type (``full_attention``, ``sliding_attention``)."""
  params = dict(raw.get("rope_parameters") or {})
  local_theta = raw.get("rope_local_base_freq")
  if "full_attention" in params or "sliding_attention" in params:
    local = dict(params.get("sliding_attention") or {})
    if local.get("rope_type", local.get("type", "default")) != "default":
      raise ValueError(f"{path}: rope_parameters.sliding_attention of type {local.get('rope_type')!r}: "
                       "only default RoPE is supported in sliding layers")
    local_theta = local.get("rope_theta", local_theta)
    params = dict(params.get("full_attention") or {})
  params = {"rope_theta": raw.get("rope_theta", 10000.0), **(raw.get("rope_scaling") or {}), **params}
  unknown = set(params) - _ROPE_FIELDS
  if unknown:
    raise ValueError(f"{path}: unknown rope parameters {sorted(unknown)}")
  params.pop("llama_4_scaling_beta", None)  # a query scale, not a frequency: read_config takes it
  params.pop("max_position_embeddings", None)  # Mistral 3 repeats the model's own here
  proportion = params.pop("partial_rotary_factor", None)  # read_config takes it (rotary_dim), except:
  for name in ("mrope_section", "mrope_interleaved"):  # Qwen3.5's M-RoPE: a text token's three position ids are
    params.pop(name, None)  # equal, so every section rotates by the same angle: plain RoPE
  kind = params.pop("rope_type", params.pop("type", "default"))
  params.pop("type", None)
  kind = "longrope" if kind == "su" else kind  # Phi-3's first name for it
  theta = params.pop("rope_theta")
  local_theta = float(local_theta) if gemma and local_theta is not None else None
  if kind == "default":
    return theta, None, local_theta
  if kind == "proportional":  # Gemma 4's global layers: the share of angles rotated, whatever the head width
    return theta, RopeScaling(type=kind, factor=params.get("factor", 1.0), proportion=proportion or 1.0), local_theta
  if kind in ("yarn", "longrope") and params.get("original_max_position_embeddings") is None:
    params["original_max_position_embeddings"] = raw.get("original_max_position_embeddings")
  if kind == "yarn" and params.get("factor") is None:
    params["factor"] = raw["max_position_embeddings"] / params["original_max_position_embeddings"]
  if kind == "longrope":
    params.pop("factor", None)  # transformers derives it from max / original positions, so does tailjax
  try:
    return theta, RopeScaling(type=kind, **{k: v for k, v in params.items() if v is not None}), local_theta
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


def read_tensors(directory: Path) -> Iterator[tuple[str, lazy.LazyTensor]]:
  """``(canonical name, lazy tensor in PyTorch layout)`` (see ``canonical_name``): nothing read until a box is
  asked for, and then only that box, in the file's dtype. Each read maps the file afresh and unmaps it after,
  so the pages a load touches leave the process as it goes (they stay in the page cache, not in its RSS)."""
  from safetensors import SafetensorError, safe_open

  raw = read_raw_config(directory)
  family = families.for_hf(raw.get("model_type"), str(directory / "config.json")).name
  tensors: dict[str, lazy.LazyTensor] = {}
  for file in safetensors_files(directory):
    try:
      with safe_open(file, framework="numpy") as handle:
        shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (OSError, SafetensorError) as err:
      raise ValueError(f"{file}: unreadable safetensors file ({err})") from err
    for name, shape in shapes.items():
      if (canonical := canonical_name(name)) is not None and not _prediction_layer(canonical, raw):
        tensors[canonical] = lazy.Stored(shape, _box_reader(file, name))
  yield from hf_families.tensors(family, tensors, directory).items()


def _prediction_layer(name: str, raw: dict) -> bool:
  """Whether ``name`` belongs to a multi-token-prediction layer (GLM-4.5: ``num_nextn_predict_layers`` layers
  after the last decoder layer, used for speculative decoding, not for the next-token distribution)."""
  extra = raw.get("num_nextn_predict_layers") or raw.get("num_mtp_layers") or 0
  match = re.match(r"model\.layers\.(\d+)\.", name)
  return bool(extra and match and int(match[1]) >= raw.get("num_hidden_layers", 0))


def _box_reader(file: Path, name: str):
  from safetensors import SafetensorError, safe_open

  def read(box):
    try:
      with safe_open(file, framework="numpy") as handle:
        part = handle.get_slice(name)
        return part[box] if box else part[...]
    except (OSError, SafetensorError, TypeError) as err:
      raise ValueError(f"{file}: tensor {name} unreadable ({err})") from err

  return read


_RENAMES = (
    (re.compile(r"^model\.language_model\."), "model."),  # multimodal (transformers 5 layout)
    (re.compile(r"^language_model\.model\."), "model."),  # multimodal (older layout)
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"(\.layers\.\d+)\.experts\."), r"\1.moe.experts."),  # Gemma 4: experts beside the MLP
    (re.compile(r"(\.layers\.\d+)\.router\.proj\."), r"\1.moe.gate."),
    (re.compile(r"(\.layers\.\d+)\.router\.scale$"), r"\1.moe.router_scale"),
    (re.compile(r"(\.layers\.\d+)\.router\.per_expert_scale$"), r"\1.moe.per_expert_scale"),
    (re.compile(r"\.block_sparse_moe\.gate\."), ".mlp.gate."),  # Mixtral
    (re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.w1\."), r".mlp.experts.\1.gate_proj."),
    (re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.w2\."), r".mlp.experts.\1.down_proj."),
    (re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.w3\."), r".mlp.experts.\1.up_proj."),
)


def canonical_name(name: str) -> str | None:
  """A checkpoint's tensor name in the one naming tailjax loads (Llama's, Qwen3-MoE's for experts),
  or None for a part that is not the language model (a vision tower, Qwen3.5's multi-token prediction)."""
  if name.startswith(_VISION_PREFIXES) or name.startswith(_PREDICTION_PREFIXES):
    return None
  for pattern, replacement in _RENAMES:
    name = pattern.sub(replacement, name)
  return name


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
