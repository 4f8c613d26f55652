"""The one table of model families: which Hugging Face ``model_type`` and GGUF architecture
each is, and the ``ModelConfig`` fields that hold for every checkpoint of the family.

Sizes (layers, widths, heads, experts, windows, RoPE) come from each checkpoint's own
config (``tailjax.models.hf``) or metadata (``tailjax.models.gguf``); a family adds only
what its architecture fixes. ``tailjax.models.config.ModelConfig`` documents each field.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  hf_model_types: tuple[str, ...]
  gguf_architectures: tuple[str, ...]  # a GGUF arch shared by several families is resolved by its metadata
  traits: MappingProxyType  # ModelConfig fields every checkpoint of the family has
  examples: str  # for the README and error messages
  partial_rotary: bool = False  # its transformers model rotates only the first rotary_dim dims of a head

  def config_fields(self) -> dict[str, Any]:
    return dict(self.traits)


def _family(name, hf_types, gguf_archs, examples, partial_rotary=False, **traits) -> Family:
  return Family(name, tuple(hf_types), tuple(gguf_archs), MappingProxyType(traits), examples, partial_rotary)


_QWEN3_5 = dict(qk_norm=True, norm_unit_offset=True, attn_output_gate=True)
_GEMMA = dict(norm_unit_offset=True, sandwich_norms=True, scale_embeddings=True, hidden_act="gelu_tanh")
_GEMMA4 = dict(block="gemma4", qk_norm=True, sandwich_norms=True, scale_embeddings=True, hidden_act="gelu_tanh",
               query_pre_attn_scalar=1.0, router="scaled_softmax", norm_topk_prob=True)

FAMILIES: tuple[Family, ...] = (
    _family("llama", ["llama"], ["llama"], "Llama 2/3, SmolLM, TinyLlama"),
    _family("mistral", ["mistral"], [], "Mistral 7B (GGUF files of it say llama)"),
    _family("qwen2", ["qwen2"], ["qwen2"], "Qwen2, Qwen2.5", qkv_bias=True),
    _family("qwen2-moe", ["qwen2_moe"], ["qwen2moe"], "Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B (a shared expert behind a "
            "sigmoid gate)", o_bias=False),
    _family("qwen3", ["qwen3"], ["qwen3"], "Qwen3 dense", qk_norm=True),
    _family("qwen3-moe", ["qwen3_moe"], ["qwen3moe"], "Qwen3-30B-A3B, Qwen3-235B-A22B", qk_norm=True),
    _family("mixtral", ["mixtral"], ["llama"], "Mixtral 8x7B, 8x22B (GGUF: llama with experts)", norm_topk_prob=True),
    _family("gemma2", ["gemma2"], ["gemma2"], "Gemma 2", **_GEMMA),
    _family("gemma3", ["gemma3_text", "gemma3"], ["gemma3"], "Gemma 3 (text; the language model of multimodal "
            "checkpoints)", qk_norm=True, **_GEMMA),
    _family("gemma4", ["gemma4_text", "gemma4"], ["gemma4"], "Gemma 4 dense and MoE, e.g. Gemma-4-31B, Gemma-4-26B-A4B, "
            "E2B/E4B (wider global layers, per-layer inputs, shared KV; the language model of multimodal "
            "checkpoints)", **_GEMMA4),
    _family("llama4", ["llama4_text", "llama4"], ["llama4"], "Llama 4 Scout, Maverick (experts on scaled inputs beside a "
            "shared expert, layers without RoPE, chunked attention; the language model of multimodal checkpoints)",
            rope_interleaved=True, router="sigmoid_inputs"),
    _family("phi3", ["phi3"], ["phi3"], "Phi-3, Phi-3.5 mini/medium (LongRoPE)", partial_rotary=True),
    _family("gpt-oss", ["gpt_oss"], ["gpt-oss"], "gpt-oss-20b, gpt-oss-120b (MXFP4 experts dequantized on load, from "
            "safetensors or llama.cpp's MXFP4 GGUF)",
            attention_sinks=True, moe_bias=True, hidden_act="clamped_swiglu", norm_topk_prob=True),
    _family("glm4-moe", ["glm4_moe"], ["glm4moe"], "GLM-4.5, GLM-4.5-Air, GLM-4.6, GLM-4.7 (group-limited sigmoid routing, "
            "a shared expert, partial RoPE)", partial_rotary=True, router="sigmoid_groups", o_bias=False),
    _family("glm4-moe-lite", ["glm4_moe_lite"], ["deepseek2"], "GLM-4.7-Flash (as glm4-moe, with multi-head latent "
            "attention; GGUF: llama.cpp's deepseek2 with sigmoid routing)",
            attention="mla", router="sigmoid_groups"),
    _family("qwen3.5", ["qwen3_5_text", "qwen3_5"], ["qwen35"], "Qwen3.5 / Qwen3.6 dense, e.g. Qwen3.6-27B "
            "(Gated DeltaNet linear attention in 3 of 4 layers; the language model of multimodal checkpoints)",
            partial_rotary=True, **_QWEN3_5),
    _family("qwen3.5-moe", ["qwen3_5_moe_text", "qwen3_5_moe"], ["qwen35moe"], "Qwen3.5 / Qwen3.6 MoE, e.g. "
            "Qwen3.6-35B-A3B (as qwen3.5, with a gated shared expert)", partial_rotary=True, norm_topk_prob=True,
            **_QWEN3_5),
    _family("ministral3", ["ministral3"], ["mistral3"], "Mistral 3 / Ministral 3, Devstral Small 2 (the text model of "
            "mistral3 checkpoints; YaRN with position-scaled queries)"),
)

HF_MODEL_TYPES = tuple(t for f in FAMILIES for t in f.hf_model_types)
GGUF_ARCHITECTURES = tuple(dict.fromkeys(a for f in FAMILIES for a in f.gguf_architectures))


def for_hf(model_type: str | None, source: str) -> Family:
  for family in FAMILIES:
    if model_type in family.hf_model_types:
      return family
  raise ValueError(f"{source}: model_type {model_type!r} is not supported (supported: {', '.join(HF_MODEL_TYPES)})")


def for_gguf(arch: str | None, has_experts: bool, source: str) -> Family:
  """``llama`` files with expert tensors are Mixtral-style MoE; otherwise the arch names one family."""
  if arch == "llama":
    return by_name("mixtral" if has_experts else "llama")
  for family in FAMILIES:
    if arch in family.gguf_architectures:
      return family
  raise ValueError(f"{source}: GGUF architecture {arch!r} is not supported (supported: {', '.join(GGUF_ARCHITECTURES)})")


def by_name(name: str) -> Family:
  return next(f for f in FAMILIES if f.name == name)
