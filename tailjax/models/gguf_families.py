"""What one GGUF architecture leaves to llama.cpp's code, and the tensor layouts its converter changed.

``tailjax.models.gguf`` reads what every file says the same way (sizes, heads, RoPE base, experts). The
rest is per architecture and lives here: ``config_fields`` fills in what llama.cpp's loader assumes for
the architecture (Gemma's and gpt-oss's layer patterns, Gemma's query scale, Llama 4's chunks, layers without
RoPE and query temperature, Mistral 3's position-scaled queries, Qwen3.5's linear-attention shapes, gpt-oss's
SwiGLU clamp), as llama.cpp assumes it, so a file means here what it means there (one exception, stated at
``yarn_fields``: gpt-oss's YaRN keeps its untruncated correction range, as the model defines it); ``tensor`` undoes what the converter did to one
tensor (llama's rotary row permutation, Qwen3.5's value-head order).

``opt(key, default)`` and ``need(key)`` read ``{arch}.{key}`` metadata (floats as the shortest decimal that
round-trips float32); ``base`` holds the fields already read.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Mapping
from typing import Any

import numpy as np

from tailjax.models import lazy, mla
from tailjax.models.config import ModelConfig, RopeScaling

QWEN35 = ("qwen35", "qwen35moe")
PERMUTED_QK = ("llama", "mistral3")  # converters that permute q/k rows for llama.cpp's rotary layout
# llama.cpp's LLM_ARCH_LLAMA4 constants: chunked attention in 3 of every 4 layers (the 4th: full, without RoPE)
LLAMA4_CHUNK = 8192
LLAMA4_STEP = 4
LLAMA4_TEMPERATURE = (0.1, 8192)  # (attn_scale, floor_scale) of the layers without RoPE
# llama.cpp's LLM_FFN_SWIGLU_OAI_MOE constants (gpt-oss files store neither)
GPT_OSS_SWIGLU = dict(swiglu_alpha=1.702, swiglu_limit=7.0)

# ``{arch}.*`` metadata only these architectures' files carry (every file's keys: ``tailjax.models.gguf``)
KEYS = {
    "mistral3": frozenset({"attention.temperature_scale", "rope.scaling.yarn_log_multiplier"}),
    "llama4": frozenset({"interleave_moe_layer_step"}),  # (which layers route: the router tensors say)
    "glm4moe": frozenset({"expert_shared_count", "leading_dense_block_count", "expert_weights_scale",
                          "expert_group_count", "expert_group_used_count"}),
}
KEYS["deepseek2"] = KEYS["glm4moe"] | {"attention.q_lora_rank", "attention.kv_lora_rank", "attention.key_length_mla",
                                        "attention.value_length_mla", "rope.scaling.yarn_log_multiplier"}
KEYS["gpt-oss"] = frozenset({"rope.freq_base_swa"})
KEYS["gemma4"] = frozenset({"attention.key_length_swa", "attention.value_length_swa", "rope.dimension_count_swa",
                            "attention.shared_kv_layers", "embedding_length_per_layer_input"})
# keys that may hold one value per layer (``tailjax.models.gguf`` reads layer 0's; ``config_fields`` the rest)
PER_LAYER = {"gemma4": frozenset({"attention.head_count_kv", "feed_forward_length"})}
GATING = {"glm4moe": 2, "deepseek2": 2}  # the expert gating function llama.cpp must find (1 softmax, the default)
MLA = ("deepseek2",)  # key_length / value_length are the latent cache's, not a head's

Opt = Callable[..., Any]


def config_fields(arch: str, opt: Opt, need: Callable[[str], Any], base: dict,
                  tensors: Mapping[str, tuple[int, ...]]) -> dict:
  """``ModelConfig`` fields of ``arch`` beyond ``base``, given the file's tensors (name -> shape in PyTorch order;
  a ``ValueError`` names what the file lacks)."""
  if arch in QWEN35:
    return _qwen35(opt, need, base["num_layers"])
  if arch in ("gemma2", "gemma3"):
    return _gemma(arch, opt, base)
  if arch == "llama4":
    return _llama4(opt, base)
  if arch == "mistral3":
    return _mistral3(opt, base)
  if arch == "glm4moe":
    return _glm4moe(opt, base, tensors)
  if arch == "deepseek2":
    return _deepseek2(opt, need, base)
  if arch == "gpt-oss":
    return _gpt_oss(opt, base)
  if arch == "gemma4":
    return _gemma4(opt, need, base, tensors)
  return {}


def float32(value) -> float:
  """A float32 value as the shortest decimal that round-trips (1e-05, not 9.9999997e-06)."""
  return float(np.format_float_scientific(np.float32(value), unique=True))


def yarn_fields(arch: str, log_multiplier: float | None) -> dict:
  """``RopeScaling`` fields of a YaRN file beyond factor, context and betas: from
  ``rope.scaling.yarn_log_multiplier``, which each architecture reads its own way (Mistral 3's is
  ``mscale_all_dim`` beside an ``mscale`` of 1, llama.cpp's reading of it), and gpt-oss's untruncated
  correction range (``truncate=False`` in every gpt-oss config; llama.cpp rounds the range outwards for every
  architecture, a difference in the rotation of a few frequencies that tailjax does not copy)."""
  if arch == "gpt-oss":
    return dict(truncate=False)
  if not log_multiplier:
    return dict(attention_factor=1.0) if arch == "deepseek2" else {}
  if arch == "mistral3":
    return dict(mscale=1.0, mscale_all_dim=log_multiplier)
  if arch == "deepseek2":  # 0.1 mscale_all_dim; llama.cpp cancels YaRN's cos/sin factor (as mscale == mscale_all_dim)
    return dict(mscale=log_multiplier / 0.1, mscale_all_dim=log_multiplier / 0.1)
  raise ValueError(f"{arch}.rope.scaling.yarn_log_multiplier={log_multiplier} is not supported for {arch}")


def _qwen35(opt: Opt, need: Callable[[str], Any], layers: int) -> dict:
  """Qwen3.5's linear-attention shapes from llama.cpp's ``ssm.*`` keys (``state_size``: the key head width,
  ``group_count``: key heads, ``time_step_rank``: value heads, ``inner_size``: value heads x width) and its
  layer pattern: every ``full_attention_interval``-th layer full attention, the others Gated DeltaNet."""
  interval = int(opt("full_attention_interval", 4))
  value_heads = int(need("ssm.time_step_rank"))
  return dict(layer_types=tuple("full" if (i + 1) % interval == 0 else "linear" for i in range(layers)),
              linear_num_key_heads=int(need("ssm.group_count")), linear_num_value_heads=value_heads,
              linear_key_head_dim=int(need("ssm.state_size")),
              linear_value_head_dim=int(need("ssm.inner_size")) // value_heads,
              linear_conv_kernel=int(need("ssm.conv_kernel")))


def _gemma(arch: str, opt: Opt, base: dict) -> dict:
  """What Gemma files leave to llama.cpp's code: which layers slide (Gemma 2: every other one, from the
  first; Gemma 3: five of every six, unless ``attention.sliding_window_pattern`` says), the local RoPE
  base (10000 unless ``rope.freq_base_swa``), and the query scale (``head_dim``, but ``hidden / heads``
  for the 27B models, 46 and 62 layers, as in llama.cpp; ``attention.scale`` overrides)."""
  layers = base["num_layers"]
  kinds = _sliding_layers(opt, layers, 2 if arch == "gemma2" else 6)
  big = (arch, layers) in (("gemma2", 46), ("gemma3", 62))
  scale = opt("attention.scale")
  hidden_per_head = base["hidden_size"] // base["num_heads"]
  out = dict(layer_types=kinds if base["sliding_window"] is not None else None,
             query_pre_attn_scalar=float32(scale**-2) if scale else float(hidden_per_head if big else base["head_dim"]),
             attn_logit_softcap=opt("attn_logit_softcapping"), final_logit_softcap=opt("final_logit_softcapping"))
  if arch == "gemma3":
    out["rope_local_theta"] = opt("rope.freq_base_swa", 10000.0)
  return out


def _sliding_layers(opt: Opt, layers: int, period: int) -> tuple[str, ...]:
  """llama.cpp's ``set_swa_pattern``: ``attention.sliding_window_pattern`` (default ``period``) is one flag per
  layer, or a period ``n``: every ``n``-th layer full, the others sliding."""
  pattern = opt("attention.sliding_window_pattern", period)
  if isinstance(pattern, list):
    return tuple("sliding" if flag else "full" for flag in pattern)
  return tuple("sliding" if (i + 1) % int(pattern) else "full" for i in range(layers))


def _gpt_oss(opt: Opt, base: dict) -> dict:
  """gpt-oss as llama.cpp's ``gpt-oss``: sliding windows in every other layer from the first (or as
  ``attention.sliding_window_pattern`` says), one RoPE for both kinds, and the clamped SwiGLU of its experts at
  llama.cpp's fixed alpha 1.702 and limit 7. A sliding-layer RoPE base of its own (``rope.freq_base_swa``, which
  llama.cpp would scale with YaRN as well) is refused: no gpt-oss model has one."""
  if base["sliding_window"] is None:
    raise ValueError("gpt-oss.attention.sliding_window is missing: llama.cpp needs it")
  if opt("rope.freq_base_swa") not in (None, base["rope_theta"]):
    raise ValueError(f"gpt-oss.rope.freq_base_swa={opt('rope.freq_base_swa')} differs from rope.freq_base="
                     f"{base['rope_theta']}; not supported")
  return dict(layer_types=_sliding_layers(opt, base["num_layers"], 2), **GPT_OSS_SWIGLU)


def _gemma4(opt: Opt, need: Callable[[str], Any], base: dict, tensors: Mapping[str, tuple[int, ...]]) -> dict:
  """Gemma 4 as llama.cpp's ``gemma4`` (``Gemma4Model``): ``key_length`` is the full layers' head width and
  ``key_length_swa`` the sliding ones'; ``head_count_kv`` and ``feed_forward_length`` may be per-layer arrays (full
  layers' KV heads; the KV-shared layers' double-wide MLP); which layers slide: ``sliding_window_pattern``; full
  layers without ``attn_v`` take values from keys; the ``proportional`` RoPE of full layers is ``rope_freqs`` =
  1 for the pairs that rotate and 1e30 (no rotation) for the rest; sliding layers rotate whole heads at
  ``rope.freq_base_swa``."""
  layers = base["num_layers"]
  kinds = _sliding_layers(opt, layers, 6)
  sliding = int(need("attention.key_length_swa"))
  if int(opt("attention.value_length_swa", sliding)) != sliding or int(opt("rope.dimension_count_swa", sliding)) \
      != sliding:
    raise ValueError(f"gemma4: sliding layers with value_length_swa={opt('attention.value_length_swa')} or "
                     f"rope.dimension_count_swa={opt('rope.dimension_count_swa')} other than key_length_swa={sliding} "
                     "are not supported")
  per_layer = lambda key, default: value if isinstance(value := opt(key, default), list) else [value] * layers
  kv = per_layer("attention.head_count_kv", base["num_kv_heads"])
  full = [i for i, kind in enumerate(kinds) if kind == "full"]
  if len({kv[i] for i in full}) > 1 or len({kv[i] for i in range(layers) if i not in full}) > 1:
    raise ValueError(f"gemma4.attention.head_count_kv={kv}: one count for sliding layers and one for full ones")
  shared = int(opt("attention.shared_kv_layers", 0))
  widths = per_layer("feed_forward_length", base["intermediate_size"])
  factor, rest = divmod(widths[-1], widths[0])
  if rest or widths != [widths[0]] * (layers - shared) + [widths[-1]] * shared:
    raise ValueError(f"gemma4.feed_forward_length={widths}: one width, or a multiple in the {shared} KV-shared layers")
  scaling = base["rope_scaling"]
  divisors = np.asarray(scaling.divisors if scaling is not None and scaling.type == "factors" else [0], np.float32)
  rotated = int(np.sum(divisors == 1))
  if np.any(divisors[:rotated] != 1) or np.any(divisors[rotated:] != np.float32(1e30)):
    raise ValueError("gemma4: rope_freqs must be 1 for the rotated pairs, then 1e30 (llama.cpp's proportional RoPE)")
  inputs = int(opt("embedding_length_per_layer_input", 0))
  full_kv = kv[full[0]] if full else None
  return dict(
      head_dim=sliding, full_head_dim=base["head_dim"], layer_types=kinds, rope_local_theta=opt("rope.freq_base_swa"),
      num_kv_heads=kv[0], full_num_kv_heads=None if full_kv == kv[0] else full_kv,
      full_values_from_keys=any(f"blk.{i}.attn_v.weight" not in tensors for i in full if i < layers - shared),
      rope_scaling=RopeScaling(type="proportional", proportion=rotated / len(divisors)),
      num_kv_shared_layers=shared, shared_kv_mlp_factor=factor, per_layer_input_size=inputs,
      per_layer_vocab_size=tensors["per_layer_token_embd.weight"][0] if inputs else 0,
      final_logit_softcap=opt("final_logit_softcapping"))


def _llama4(opt: Opt, base: dict) -> dict:
  """Llama 4 files store none of its attention pattern; llama.cpp fixes it: chunks of 8192 tokens in the layers
  ``i`` with ``(i + 1) % 4 != 0``, the others full and without RoPE, their queries scaled by
  ``1 + 0.1 log1p(floor((pos + 1) / 8192))``; weightless q/k norms unless the model has 128 experts (Maverick).
  Experts in every ``interleave_moe_layer_step``-th layer (the dense ones have no router tensor), a shared expert
  as wide as each expert."""
  if opt("attention.sliding_window") == 0:  # llama.cpp's MobileLLM variant: another attention pattern
    raise ValueError("llama4.attention.sliding_window=0 (RoPE in every layer, no chunks) is not supported")
  layers = base["num_layers"]
  nope = tuple(i for i in range(layers) if (i + 1) % LLAMA4_STEP == 0)
  out = dict(attention_chunk_size=LLAMA4_CHUNK, nope_layers=nope, nope_query_scaling=LLAMA4_TEMPERATURE,
             layer_types=tuple("full" if i in nope else "chunked" for i in range(layers)),
             qk_l2_norm=int(opt("expert_count", 0)) != 128)
  if opt("expert_count"):
    out["shared_expert_size"] = int(opt("expert_feed_forward_length"))
  return out


def _mistral3(opt: Opt, base: dict) -> dict:
  """Mistral 3's queries scaled by ``1 + beta log(1 + floor(pos / original context))`` (``attention.temperature_scale``
  is beta; llama.cpp takes the period from YaRN's original context)."""
  beta = opt("attention.temperature_scale")
  if not beta:
    return {}
  scaling = base["rope_scaling"]
  if scaling is None or not scaling.original_max_position_embeddings:
    raise ValueError("mistral3.attention.temperature_scale needs rope.scaling.original_context_length")
  return dict(query_position_scaling=(beta, scaling.original_max_position_embeddings))


def _glm4moe(opt: Opt, base: dict, tensors: Container[str]) -> dict:
  """GLM-4.5's routing: sigmoid scores, top groups (``expert_group_count`` groups, the best
  ``expert_group_used_count`` kept), weights times ``expert_weights_scale``, ``expert_shared_count`` shared
  experts as one MLP; q/k norms when the file has them."""
  out = dict(qk_norm="blk.0.attn_q_norm.weight" in tensors,
             routed_scaling_factor=float(opt("expert_weights_scale", 1.0)))
  if opt("expert_group_count"):
    out["router_groups"] = (int(opt("expert_group_count")), int(opt("expert_group_used_count", 1)))
  shared = int(opt("expert_shared_count", 0))
  if shared:
    out["shared_expert_size"] = shared * base["moe_intermediate_size"]
  return out


def _deepseek2(opt: Opt, need: Callable[[str], Any], base: dict) -> dict:
  """GLM-4.7-Flash as llama.cpp's ``deepseek2``: multi-head latent attention (heads of ``key_length_mla``, values
  of ``value_length_mla``, RoPE on the last ``rope.dimension_count`` dims in adjacent pairs, every head its own
  keys once decompressed), the score scale with YaRN's ``mscale_all_dim`` (``yarn_log_multiplier / 0.1``), and
  GLM's routing (``_glm4moe``)."""
  head_dim = int(need("attention.key_length_mla"))
  scaling = base["rope_scaling"]
  log_multiplier = opt("rope.scaling.yarn_log_multiplier")
  out = dict(attention="mla", head_dim=head_dim, value_head_dim=int(need("attention.value_length_mla")),
             rotary_dim=int(need("rope.dimension_count")), q_lora_rank=int(opt("attention.q_lora_rank", 0)),
             kv_lora_rank=int(need("attention.kv_lora_rank")), num_kv_heads=base["num_heads"], rope_interleaved=True,
             query_pre_attn_scalar=mla.query_pre_attn_scalar(
                 head_dim, scaling.factor if scaling is not None else None,
                 log_multiplier / 0.1 if log_multiplier else None))
  return {**_glm4moe(opt, base, ()), **out, "qk_norm": False}


def merged(arch: str, tensors: dict[str, lazy.LazyTensor], cfg: ModelConfig) -> dict[str, lazy.LazyTensor]:
  """Tensors the converter split, joined again: ``deepseek2``'s ``attn_k_b`` ``[H, latent, nope]`` (transposed)
  and ``attn_v_b`` ``[H, vd, latent]`` -> ``attn_kv_b`` ``[H * (nope + vd), latent]`` (older files keep it)."""
  if arch not in MLA:
    return tensors
  out = dict(tensors)
  for name in [n for n in tensors if n.endswith(".attn_k_b.weight")]:
    k_b, v_b = out.pop(name), out.pop(name.replace(".attn_k_b.", ".attn_v_b."))
    heads, latent, nope = k_b.shape
    vd = v_b.shape[1]

    def read(box, k_b=k_b, v_b=v_b):
      whole = lambda t: t.read(tuple(slice(0, n) for n in t.shape))
      kv = np.concatenate([np.swapaxes(whole(k_b), 1, 2), whole(v_b)], axis=1).reshape(heads * (nope + vd), latent)
      return kv[box]

    out[name.replace(".attn_k_b.", ".attn_kv_b.")] = lazy.Stored((heads * (nope + vd), latent), read)
  return out


def tensor(arch: str, name: str, w: lazy.LazyTensor, cfg: ModelConfig) -> lazy.LazyTensor:
  """Tensor ``name`` of an ``arch`` file in the layout Hugging Face has it."""
  parts = name.split(".")
  if arch in PERMUTED_QK and name.endswith(("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias")):
    heads = cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads
    return lazy.RowsPermuted(w, unpermuted_rows(w.shape[0], heads))
  if arch in QWEN35 and parts[0] == "blk" and parts[2].startswith(("attn_qkv", "attn_gate", "ssm_")):
    return _deltanet_tensor(w, parts[2], cfg)
  return w


def unpermuted_rows(rows: int, heads: int) -> np.ndarray:
  """The row order that undoes llama.cpp's rotary permutation of a q/k weight ``[heads * head_dim, ...]``:
  within each head, rows ``0, 2, 4, ..., 1, 3, 5, ...`` (the inverse of its interleave)."""
  return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(rows)


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
