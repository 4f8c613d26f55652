"""What single families' Hugging Face checkpoints do their own way: config fields read as transformers reads
them, and tensor layouts brought to the canonical names and PyTorch layouts ``tailjax.models.place`` fills.

``tailjax.models.hf`` reads every family; it asks this module three things by family name: ``normalized`` (the
raw config as the shared readers expect it), ``fields`` (``ModelConfig`` fields only this family has) and
``tensors`` (its checkpoint's tensors renamed and re-laid lazily).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tailjax.models import lazy, mla, mxfp4

log = logging.getLogger("tailjax")


def normalized(family: str, raw: dict) -> dict:
  """``raw`` with the defaults and renamings transformers' config class of the family applies."""
  return {"gemma4": _gemma4_raw, "llama4": _llama4_raw}.get(family, dict)(raw)


def fields(family: str, raw: dict, layer_types: tuple[str, ...] | None, path: Path) -> dict:
  """``ModelConfig`` fields that only this family's config sets (none for most)."""
  if family == "gemma4":
    return _gemma4_fields(raw, layer_types, path)
  if family == "llama4":
    return _llama4_fields(raw)
  if family == "glm4-moe-lite":
    return _mla_fields(raw)
  return {}


def tensors(family: str, tensors: dict[str, lazy.LazyTensor], directory: Path) -> dict[str, lazy.LazyTensor]:
  """The checkpoint's tensors (already through ``hf.canonical_name``) in the canonical names and layouts."""
  if family == "gpt-oss":
    return _gpt_oss_tensors(tensors, directory)
  if family == "llama4":
    return _llama4_tensors(tensors)
  return tensors


def _gemma4_raw(raw: dict) -> dict:
  """Gemma 4's config as the shared readers expect it, as transformers' ``Gemma4TextConfig`` reads it: experts only
  with ``enable_moe_block`` (``top_k_experts`` of them per token), the default 5:1 layer pattern, and the last
  layer always full attention."""
  raw = dict(raw)
  if not raw.get("enable_moe_block"):
    raw.pop("num_experts", None)
  raw["num_experts_per_tok"] = raw.pop("top_k_experts", None)
  raw.setdefault("sliding_window", 512)
  kinds = raw.get("layer_types") or ["sliding_attention" if (i + 1) % 6 else "full_attention"
                                     for i in range(raw.get("num_hidden_layers") or 0)]
  if kinds and kinds[-1] != "full_attention":
    log.warning("gemma4 config: the last layer is %s; transformers makes it full_attention, so does tailjax",
                kinds[-1])
    kinds = [*kinds[:-1], "full_attention"]
  raw["layer_types"] = kinds
  return raw


def _gemma4_fields(raw: dict, layer_types: tuple[str, ...] | None, path: Path) -> dict:
  """Gemma 4's shape fields: the full layers' head width and KV heads (``per_layer_config`` as transformers 5.24
  saves it, or ``global_head_dim`` and ``num_global_key_value_heads``), values from keys, per-layer inputs, shared
  KV layers and their double-wide MLP."""
  full = [i for i in range(raw["num_hidden_layers"]) if layer_types is None or layer_types[i] == "full"]
  values_from_keys = bool(raw.get("attention_k_eq_v", False))
  per_layer = raw.get("per_layer_config")
  if "per_layer_config" in raw and per_layer is None:
    overrides = {}  # present but null: transformers applies no override, every layer takes head_dim and KV heads
  elif per_layer is None:
    overrides = {"head_dim": raw.get("global_head_dim", 512)}
    if values_from_keys and raw.get("num_global_key_value_heads") is not None:
      overrides["num_key_value_heads"] = raw["num_global_key_value_heads"]
  else:
    if not isinstance(per_layer, dict) or {int(k) for k in per_layer} != set(full) or \
        len({json.dumps(v, sort_keys=True) for v in per_layer.values()}) > 1:
      raise ValueError(f"{path}: per_layer_config={per_layer!r} is not supported (one override of head_dim and "
                       f"num_key_value_heads for exactly the full-attention layers {full})")
    overrides = next(iter(per_layer.values()), {})
    unknown = set(overrides) - {"head_dim", "num_key_value_heads"}
    if unknown:
      raise ValueError(f"{path}: per_layer_config overrides {sorted(unknown)}: not supported")
  wide = raw.get("use_double_wide_mlp", False)
  inputs = int(raw.get("hidden_size_per_layer_input") or 0)
  return dict(full_head_dim=overrides.get("head_dim"), full_num_kv_heads=overrides.get("num_key_value_heads"),
              full_values_from_keys=values_from_keys,
              per_layer_input_size=inputs,
              per_layer_vocab_size=int(raw.get("vocab_size_per_layer_input") or raw["vocab_size"]) if inputs else 0,
              num_kv_shared_layers=int(raw.get("num_kv_shared_layers") or 0), shared_kv_mlp_factor=2 if wide else 1)


def _mla_fields(raw: dict) -> dict:
  """GLM-4.7-Flash (DeepSeek-V2 attention): head width ``qk_nope_head_dim + qk_rope_head_dim`` of which the rope
  part rotates, latent widths, value width, the score scale with YaRN's ``mscale_all_dim`` folded in (as
  transformers' ``yarn_apply_mscale``), dense layers from ``mlp_layer_types``."""
  rope, nope = raw["qk_rope_head_dim"], raw["qk_nope_head_dim"]
  params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
  scaled = params.get("rope_type", params.get("type", "default")) != "default"
  layers = raw["num_hidden_layers"]
  kinds = raw.get("mlp_layer_types") or ["dense"] + ["sparse"] * (layers - 1)
  return dict(head_dim=rope + nope, rotary_dim=rope, value_head_dim=raw["v_head_dim"],
              q_lora_rank=int(raw.get("q_lora_rank") or 0), kv_lora_rank=raw["kv_lora_rank"],
              query_pre_attn_scalar=mla.query_pre_attn_scalar(rope + nope, params.get("factor") if scaled else None,
                                                              params.get("mscale_all_dim")),
              rope_interleaved=bool(raw.get("rope_interleave", True)),
              num_kv_heads=raw["num_attention_heads"], dense_layers=tuple(i for i, k in enumerate(kinds) if k != "sparse"))


def _llama4_raw(raw: dict) -> dict:
  """Llama 4's defaults (``Llama4TextConfig.__post_init__``): every ``no_rope_layer_interval``-th layer without
  RoPE (``no_rope_layers[i] == 0``), experts in every ``interleave_moe_layer_step``-th layer, and the RoPE layers
  chunked when ``attention_chunk_size`` is set."""
  raw = dict(raw)
  layers = raw.get("num_hidden_layers") or 0
  interval = raw.get("no_rope_layer_interval") or 4
  raw["no_rope_layers"] = raw.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]
  step = raw.get("interleave_moe_layer_step") or 1
  if raw.get("moe_layers") is None:
    raw["moe_layers"] = list(range(step - 1, layers, step))
  chunk = raw.get("attention_chunk_size", 8192)
  if raw.get("layer_types") is None:
    raw["layer_types"] = ["chunked_attention" if rope and chunk is not None else "full_attention"
                          for rope in raw["no_rope_layers"]]
  return raw


def _llama4_fields(raw: dict) -> dict:
  """Dense layers' MLP ``intermediate_size_mlp`` wide, experts and the shared expert ``intermediate_size``; RoPE
  only in ``no_rope_layers[i] == 1`` layers, which RMS-normalise q and k without weights (``use_qk_norm``); the
  others' queries scaled with the position (``attn_temperature_tuning``); chunked layers' chunk size."""
  layers = raw["num_hidden_layers"]
  width = raw["intermediate_size"]
  out = dict(intermediate_size=raw.get("intermediate_size_mlp") or width,
             nope_layers=tuple(i for i, rope in enumerate(raw["no_rope_layers"]) if not rope),
             qk_norm=False, qk_l2_norm=bool(raw.get("use_qk_norm", True)),
             nope_query_scaling=(float(raw.get("attn_scale", 0.1)), int(raw.get("floor_scale", 8192)))
             if raw.get("attn_temperature_tuning", True) else None,
             attention_chunk_size=raw.get("attention_chunk_size", 8192))
  if raw.get("num_local_experts"):
    out.update(moe_intermediate_size=width, shared_expert_size=width,
               dense_layers=tuple(i for i in range(layers) if i not in set(raw["moe_layers"])))
  return out


def _llama4_tensors(tensors: dict[str, lazy.LazyTensor]) -> dict[str, lazy.LazyTensor]:
  """Llama 4 calls its MLP ``feed_forward``, its router ``router`` and keeps its experts stacked in ``[E, in, out]``
  (gate and up side by side along ``out``): -> ``mlp.gate``, ``mlp.shared_experts``, and the canonical stacked
  ``mlp.experts.{gate,up,down}_proj.weight`` in PyTorch's ``[E, out, in]``."""
  out = {}
  for name, tensor in tensors.items():
    name = name.replace(".feed_forward.", ".mlp.").replace(".mlp.router.", ".mlp.gate.")
    name = name.replace(".mlp.shared_expert.", ".mlp.shared_experts.")
    stem, found, leaf = name.rpartition(".mlp.experts.")
    if found and leaf == "gate_up_proj":
      width = tensor.shape[-1] // 2
      out[f"{stem}.mlp.experts.gate_proj.weight"] = lazy.Transposed(lazy.Part(tensor, 2, 0, width))
      out[f"{stem}.mlp.experts.up_proj.weight"] = lazy.Transposed(lazy.Part(tensor, 2, width, 2 * width))
    elif found and leaf == "down_proj":
      out[f"{stem}.mlp.experts.down_proj.weight"] = lazy.Transposed(tensor)
    else:
      out[name] = tensor
  return out


def _gpt_oss_tensors(tensors: dict[str, lazy.LazyTensor], directory: Path) -> dict[str, lazy.LazyTensor]:
  """gpt-oss keeps its experts stacked with gate and up interleaved along the output (gate first), either in
  bf16 as ``[E, in, out]`` or as MXFP4 ``*_blocks`` + ``*_scales`` (``tailjax.models.mxfp4``: ``[E, out, in]``),
  their biases beside them, and calls its router ``mlp.router``: -> the canonical stacked expert names
  (``mlp.experts.gate_proj.weight``, ``...bias``) in PyTorch layout, and ``mlp.gate``."""
  out = {}
  for name, tensor in tensors.items():
    prefix, found, leaf = name.rpartition(".mlp.experts.")
    if not found:
      out[name.replace(".mlp.router.", ".mlp.gate.")] = tensor
      continue
    stem = f"{prefix}.mlp.experts."
    if leaf.endswith("_scales"):
      continue  # read with its blocks
    packed = leaf.endswith("_blocks")
    if packed:
      leaf = leaf.removesuffix("_blocks")
      if f"{stem}{leaf}_scales" not in tensors:
        raise ValueError(f"{directory}: MXFP4 tensor {name} has no {leaf}_scales beside it")
      tensor = mxfp4.Dequantized(tensor, tensors[f"{stem}{leaf}_scales"], f"{directory}: {name}")
    pytorch = (lambda t: t) if packed else lazy.Transposed  # to PyTorch's [out, in]
    if leaf == "gate_up_proj":
      axis = len(tensor.shape) - (2 if packed else 1)  # the interleaved output axis
      for start, x in enumerate(("gate", "up")):
        out[f"{stem}{x}_proj.weight"] = pytorch(lazy.Strided(tensor, axis, start, 2))
    elif leaf == "gate_up_proj_bias":
      for start, x in enumerate(("gate", "up")):
        out[f"{stem}{x}_proj.bias"] = lazy.Strided(tensor, len(tensor.shape) - 1, start, 2)
    elif leaf == "down_proj":
      out[f"{stem}down_proj.weight"] = pytorch(tensor)
    elif leaf == "down_proj_bias":
      out[f"{stem}down_proj.bias"] = tensor
    else:
      out[name] = tensor
  return out
