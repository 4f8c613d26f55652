"""A Hugging Face model written as GGUF the way llama.cpp's ``convert_hf_to_gguf.py`` lays it out.

Only what tailjax reads back and what the converter changes: tensor names, llama-arch q/k row
permutation, Gemma norms stored as ``1 + w``, experts stacked ``[E, out, in]`` (or, for old
Mixtral files, one tensor per expert), Phi-3's fused tensors and LongRoPE factor tensors, and
the metadata keys each architecture's converter writes. Weights stay float32 so that a
round trip is exact up to the arithmetic.
"""

from pathlib import Path

import gguf as gguf_lib
import numpy as np

LETTERS = [chr(ord("a") + i) for i in range(26)]


def add_letter_tokenizer(writer: gguf_lib.GGUFWriter, vocab_size: int) -> None:
  """A GPT-2-style byte-level vocabulary of letters, ``Ġ`` and ``?e`` merges, padded to ``vocab_size``."""
  writer.add_tokenizer_model("gpt2")
  tokens = LETTERS + ["Ġ"] + [f"{a}e" for a in LETTERS][:vocab_size - 27]
  tokens += [f"<extra{i}>" for i in range(vocab_size - len(tokens) - 1)] + ["<|endoftext|>"]
  writer.add_token_list(tokens)
  writer.add_token_merges([f"{t[0]} {t[1]}" for t in tokens[27:53]])
  writer.add_token_types([1] * len(tokens))


def permute(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's permutation of q/k rows (the inverse of what tailjax undoes)."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_BLOCK_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.qkv_proj.weight": "attn_qkv.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "mlp.gate_up_proj.weight": "ffn_up.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight", "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
}
# Qwen3.5 (llama.cpp's Qwen3NextModel + _LinearAttentionVReorderBase), and shared experts (Qwen2MoeModel).
_QWEN35_NAMES = {
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "linear_attn.in_proj_qkv.weight": "attn_qkv.weight", "linear_attn.in_proj_z.weight": "attn_gate.weight",
    "linear_attn.in_proj_b.weight": "ssm_beta.weight", "linear_attn.in_proj_a.weight": "ssm_alpha.weight",
    "linear_attn.out_proj.weight": "ssm_out.weight", "linear_attn.norm.weight": "ssm_norm.weight",
    "linear_attn.conv1d.weight": "ssm_conv1d.weight", "linear_attn.A_log": "ssm_a",
    "linear_attn.dt_bias": "ssm_dt.bias",
}
_SHARED_EXPERT = {"mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
                  **{f"mlp.shared_expert.{x}_proj.weight": f"ffn_{x}_shexp.weight" for x in ("gate", "up", "down")}}
_GEMMA_NORMS = {"post_attention_layernorm.weight": "post_attention_norm.weight",
                "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                "post_feedforward_layernorm.weight": "post_ffw_norm.weight"}
_EXPERT = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}


def tiled_value_heads(value: np.ndarray, axis: int, key_heads: int, value_heads: int, width: int) -> np.ndarray:
  """llama.cpp's ``_reorder_v_heads``: value heads grouped by key head -> tiled (``[r, key_heads]`` order)."""
  shape = value.shape
  grouped = value.reshape(*shape[:axis], key_heads, value_heads // key_heads, width, *shape[axis + 1:])
  return np.swapaxes(grouped, axis, axis + 1).reshape(shape)


def qwen35_tensor(rest: str, value: np.ndarray, cfg) -> tuple[str, np.ndarray]:
  """One Qwen3.5 block tensor as llama.cpp's converter writes it."""
  nk, nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
  dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
  if rest.endswith(".A_log"):
    value = -np.exp(value)
  elif "conv1d" in rest:
    value = value.squeeze()
  if rest.startswith("linear_attn.") and nk != nv:
    reorder = lambda x, axis, width: tiled_value_heads(x, axis, nk, nv, width)
    leaf = rest.split(".")[1]
    if leaf in ("in_proj_qkv", "conv1d"):
      value = np.concatenate([value[:2 * nk * dk], reorder(value[2 * nk * dk:], 0, dv)])
    elif leaf == "in_proj_z":
      value = reorder(value, 0, dv)
    elif leaf in ("in_proj_b", "in_proj_a", "A_log", "dt_bias"):
      value = reorder(value, 0, 1)
    elif leaf == "out_proj":
      value = reorder(value, 1, dv)
  return {**_BLOCK_NAMES, **_QWEN35_NAMES, **_SHARED_EXPERT}[rest], value


def ggml_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
  """gpt-oss's MXFP4 (``blocks: [..., G, 16]``, value ``2j`` in the low nibble of byte ``j``; ``scales: [..., G]``)
  -> ggml's MXFP4 bytes ``[..., G * 17]`` (``GptOssModel.repack_mxfp4``): per block the scale byte, then byte ``j``
  holding value ``j`` in its low nibble and value ``j + 16`` in its high one."""
  codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)  # value order
  packed = (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)
  return np.concatenate([scales[..., None], packed], axis=-1).reshape(*blocks.shape[:-2], -1)


def gpt_oss_tensors(rest: str, state: dict, prefix: str):
  """``(gguf leaf, array, raw ggml type or None)`` for one gpt-oss block tensor, as ``GptOssModel`` writes it:
  experts split from gate/up interleaved along the output (gate first), float ones transposed to ``[E, out, in]``,
  MXFP4 ones repacked; the router as ``ffn_gate_inp``, sinks, the pre-MLP norm as ``post_attention_norm``."""
  value = state[prefix + rest]
  if rest.endswith("_scales"):
    return []  # with its blocks
  leaf = rest.removeprefix("mlp.experts.")
  if leaf.endswith("_blocks"):
    blocks, scales = value, state[prefix + rest.replace("_blocks", "_scales")]
    if leaf == "down_proj_blocks":
      return [("ffn_down_exps.weight", ggml_mxfp4(blocks, scales), gguf_lib.GGMLQuantizationType.MXFP4)]
    return [(f"ffn_{x}_exps.weight", ggml_mxfp4(blocks[:, i::2], scales[:, i::2]), gguf_lib.GGMLQuantizationType.MXFP4)
            for i, x in enumerate(("gate", "up"))]
  value = value.astype(np.float32)
  if leaf == "gate_up_proj":
    value = np.swapaxes(value, -1, -2)
    return [(f"ffn_{x}_exps.weight", np.ascontiguousarray(value[:, i::2]), None) for i, x in enumerate(("gate", "up"))]
  if leaf == "gate_up_proj_bias":
    return [(f"ffn_{x}_exps.bias", np.ascontiguousarray(value[..., i::2]), None) for i, x in enumerate(("gate", "up"))]
  if leaf == "down_proj":
    return [("ffn_down_exps.weight", np.ascontiguousarray(np.swapaxes(value, -1, -2)), None)]
  names = {"down_proj_bias": "ffn_down_exps.bias", "mlp.router.weight": "ffn_gate_inp.weight",
           "mlp.router.bias": "ffn_gate_inp.bias", "self_attn.sinks": "attn_sinks.weight",
           "self_attn.o_proj.bias": "attn_output.bias", "post_attention_layernorm.weight": "post_attention_norm.weight"}
  return [(names.get(leaf) or _BLOCK_NAMES[rest], value, None)]


# Gemma 4 (Gemma4Model: the gguf package's tensor map for MODEL_ARCH.GEMMA4).
_GEMMA4_NAMES = {
    **_BLOCK_NAMES, **_GEMMA_NORMS, "layer_scalar": "layer_output_scale.weight",
    "pre_feedforward_layernorm_2.weight": "pre_ffw_norm_2.weight",
    "post_feedforward_layernorm_1.weight": "post_ffw_norm_1.weight",
    "post_feedforward_layernorm_2.weight": "post_ffw_norm_2.weight",
    "per_layer_input_gate.weight": "inp_gate.weight", "per_layer_projection.weight": "proj.weight",
    "post_per_layer_input_norm.weight": "post_norm.weight", "router.proj.weight": "ffn_gate_inp.weight",
    "router.scale": "ffn_gate_inp.scale", "router.per_expert_scale": "ffn_down_exps.scale",
    "experts.gate_up_proj": "ffn_gate_up_exps.weight", "experts.down_proj": "ffn_down_exps.weight",
    "model.embed_tokens_per_layer.weight": "per_layer_token_embd.weight",
    "model.per_layer_model_projection.weight": "per_layer_model_proj.weight",
    "model.per_layer_projection_norm.weight": "per_layer_proj_norm.weight",
}


def gemma4_metadata(w: gguf_lib.GGUFWriter, directory: Path) -> np.ndarray:
  """``Gemma4Model.set_gguf_parameters`` (after ``TextModel``'s): per-layer arrays where layers differ, the full
  layers' head width as ``key_length``; returns the ``rope_freqs`` tensor (1 for the pairs the full layers rotate,
  1e30 for the rest: its proportional RoPE)."""
  import json

  raw = json.loads((Path(directory) / "config.json").read_text())
  layers, shared = raw["num_hidden_layers"], raw.get("num_kv_shared_layers") or 0
  swa = [kind == "sliding_attention" for kind in raw["layer_types"]]
  full = next(iter((raw.get("per_layer_config") or {}).values()), None) or \
      {"head_dim": raw["global_head_dim"], "num_key_value_heads": raw.get("num_global_key_value_heads")}
  w.add_block_count(layers)
  w.add_context_length(raw["max_position_embeddings"])
  w.add_embedding_length(raw["hidden_size"])
  width = raw["intermediate_size"]
  w.add_feed_forward_length([width if i < layers - shared else 2 * width for i in range(layers)]
                            if raw.get("use_double_wide_mlp") else width)
  w.add_head_count(raw["num_attention_heads"])
  kv = raw["num_key_value_heads"]
  w.add_head_count_kv([kv if s else full["num_key_value_heads"] for s in swa] if full.get("num_key_value_heads")
                      else kv)
  w.add_key_length(full["head_dim"])
  w.add_value_length(full["head_dim"])
  w.add_key_length_swa(raw["head_dim"])
  w.add_value_length_swa(raw["head_dim"])
  rope = raw["rope_parameters"]
  w.add_rope_freq_base(rope["full_attention"]["rope_theta"])
  w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
  w.add_rope_dimension_count(full["head_dim"])
  w.add_rope_dimension_count_swa(raw["head_dim"])
  w.add_layer_norm_rms_eps(raw["rms_norm_eps"])
  w.add_vocab_size(raw["vocab_size"])
  if raw.get("final_logit_softcapping"):
    w.add_final_logit_softcapping(raw["final_logit_softcapping"])
  w.add_sliding_window(raw["sliding_window"])
  w.add_shared_kv_layers(shared)
  w.add_embedding_length_per_layer_input(raw.get("hidden_size_per_layer_input") or 0)
  w.add_sliding_window_pattern(swa)
  if raw.get("enable_moe_block"):
    w.add_expert_count(raw["num_experts"])
    w.add_expert_used_count(raw["top_k_experts"])
    w.add_expert_feed_forward_length(raw["moe_intermediate_size"])
  rotated = int(full["head_dim"] * rope["full_attention"]["partial_rotary_factor"] / 2)
  return np.asarray([1.0] * rotated + [1e30] * (full["head_dim"] // 2 - rotated), np.float32)


def glm_routing(w: gguf_lib.GGUFWriter, cfg, leading_dense: int) -> None:
  """GLM's routing keys (``glm4moe`` and ``deepseek2`` alike): sigmoid top groups, scale, shared experts."""
  w.add_expert_count(cfg.n_routed_experts)
  w.add_expert_used_count(cfg.num_experts_per_tok)
  w.add_expert_group_count(cfg.n_group)
  w.add_expert_group_used_count(cfg.topk_group)
  w.add_leading_dense_block_count(leading_dense)
  w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
  w.add_expert_shared_count(cfg.n_shared_experts)
  w.add_expert_gating_func(gguf_lib.ExpertGatingFuncType.SIGMOID)
  w.add_expert_weights_scale(cfg.routed_scaling_factor)
  w.add_expert_weights_norm(cfg.norm_topk_prob)


def llama3_divisors(rope: dict, head_dim: int) -> np.ndarray:
  """``LlamaModel.generate_extra_tensors``: Llama 3's frequency scaling as the ``rope_freqs`` divisors."""
  freqs = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  factor, low, high = rope["factor"], rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
  original = rope["original_max_position_embeddings"]
  out = []
  for freq in freqs:
    wavelen = 2 * np.pi / freq
    if wavelen < original / high:
      out.append(1.0)
    elif wavelen > original / low:
      out.append(factor)
    else:
      smooth = (original / wavelen - low) / (high - low)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.asarray(out, np.float32)


def write(directory: Path, path: Path, arch: str, per_expert: bool = False, extra: dict | None = None) -> Path:
  """A Hugging Face directory (its files, as llama.cpp reads them) -> GGUF ``path`` of architecture ``arch``;
  ``extra``: more float metadata (keys tailjax must refuse)."""
  import transformers
  from safetensors.numpy import load_file

  cfg = transformers.AutoConfig.from_pretrained(directory)
  gemma = arch in ("gemma2", "gemma3")  # norms stored as 1 + w (Gemma 4's as they are)
  w = gguf_lib.GGUFWriter(str(path), arch)
  if arch == "gemma4":
    w.add_tensor("rope_freqs.weight", gemma4_metadata(w, directory))
    add_letter_tokenizer(w, cfg.vocab_size)
    state = {k: v for f in sorted(Path(directory).glob("*.safetensors")) for k, v in load_file(f).items()}
    for name, value in state.items():
      if name == "lm_head.weight" and cfg.tie_word_embeddings:
        continue
      if name.startswith("model.layers."):
        _, _, layer, rest = name.split(".", 3)
        name = f"blk.{layer}.{_GEMMA4_NAMES[rest]}"
      else:
        name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}.get(name) or _GEMMA4_NAMES[name]
      w.add_tensor(name, value.astype(np.float32))
    return _close(w, path)
  heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
  head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
  qwen35 = arch.startswith("qwen35")
  mtp = getattr(cfg, "mtp_num_hidden_layers", 0) or 0
  llama4 = arch == "llama4"
  w.add_block_count(cfg.num_hidden_layers + mtp)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  if llama4:  # Llama4Model swaps the names back: the dense MLP's width, then the experts'
    w.add_feed_forward_length(cfg.intermediate_size_mlp)
    w.add_interleave_moe_layer_step(cfg.interleave_moe_layer_step)
    w.add_expert_feed_forward_length(cfg.intermediate_size)
  elif getattr(cfg, "intermediate_size", None) is not None:
    w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(heads)
  if arch == "deepseek2":  # DeepseekV2Model: MLA as MQA over the latent cache, heads' own lengths beside
    w.add_head_count_kv(1)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    if cfg.q_lora_rank is not None:
      w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    glm_routing(w, cfg, cfg.mlp_layer_types.index("sparse"))  # sigmoid, as GLM-4.7-Flash's files carry it
  else:
    w.add_head_count_kv(kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
  rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
  w.add_rope_freq_base(rope["rope_theta"])
  if rope.get("rope_type") == "linear":
    w.add_rope_scaling_type(gguf_lib.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(rope["factor"])
  if rope.get("rope_type") == "yarn":  # TextModel.set_gguf_parameters, then Ministral3Model's two keys
    w.add_rope_scaling_type(gguf_lib.RopeScalingType.YARN)
    w.add_rope_scaling_factor(rope["factor"])
    w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    for key in ("beta_fast", "beta_slow"):
      if rope.get(key) is not None:
        getattr(w, f"add_rope_scaling_yarn_{key}")(rope[key])
    if arch == "deepseek2" and rope.get("mscale_all_dim") is not None:
      w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    if arch == "mistral3":
      w.add_rope_scaling_yarn_log_mul(rope["mscale_all_dim"])
      w.add_attn_temperature_scale(rope["llama_4_scaling_beta"])
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  if getattr(cfg, "sliding_window", None) is not None:
    w.add_sliding_window(cfg.sliding_window)
  if arch == "gemma2":
    w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
    w.add_final_logit_softcapping(cfg.final_logit_softcapping)
  experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", 0)
  if experts and arch not in ("glm4moe", "deepseek2"):
    w.add_expert_count(experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if arch in ("qwen3moe", "qwen2moe", "qwen35moe"):
      w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if arch == "gpt-oss":
      w.add_expert_feed_forward_length(cfg.intermediate_size)
    if getattr(cfg, "shared_expert_intermediate_size", None):
      w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
  if arch == "glm4moe":  # TextModel's group counts, then Glm4MoeModel.set_gguf_parameters
    w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 0.5)))
    glm_routing(w, cfg, cfg.first_k_dense_replace)
  if qwen35:  # Qwen3NextModel.set_gguf_parameters and the MRoPE / MTP mixins
    w.add_ssm_conv_kernel(cfg.linear_conv_kernel_dim)
    w.add_ssm_state_size(cfg.linear_key_head_dim)
    w.add_ssm_group_count(cfg.linear_num_key_heads)
    w.add_ssm_time_step_rank(cfg.linear_num_value_heads)
    w.add_ssm_inner_size(cfg.linear_value_head_dim * cfg.linear_num_value_heads)
    w.add_full_attention_interval(4)  # what the converter writes for a config.json without the field
    w.add_rope_dimension_count(int(head_dim * cfg.rope_parameters.get("partial_rotary_factor", 0.25)))
    w.add_rope_dimension_sections(cfg.rope_parameters.get("mrope_section", [11, 11, 10, 0]))
    if mtp:
      w.add_nextn_predict_layers(mtp)
  add_letter_tokenizer(w, cfg.vocab_size)
  for key, value in (extra or {}).items():
    w.add_float32(key, value)
  state = {k: v for f in sorted(Path(directory).glob("*.safetensors")) for k, v in load_file(f).items()}
  stacks: dict[str, dict[int, np.ndarray]] = {}
  if rope.get("rope_type") == "llama3":
    w.add_tensor("rope_freqs.weight", llama3_divisors(rope, head_dim))
  if rope.get("rope_type") == "longrope":
    original = cfg.original_max_position_embeddings
    scale = cfg.max_position_embeddings / original
    w.add_rope_scaling_orig_ctx_len(original)
    w.add_rope_scaling_attn_factors(float(np.sqrt(1 + np.log(scale) / np.log(original)) if scale > 1 else 1.0))
    w.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], np.float32))
    w.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], np.float32))
  for name, tensor in state.items():
    if arch == "gpt-oss" and name.startswith("model.layers."):
      prefix = name[:name.index(".", len("model.layers.")) + 1]
      for leaf, value, raw in gpt_oss_tensors(name[len(prefix):], state, prefix):
        w.add_tensor(f"blk.{prefix.split('.')[2]}.{leaf}", value, raw_dtype=raw)
      continue
    value = tensor.astype(np.float32)
    if name.endswith("rotary_emb.inv_freq"):
      continue
    if (gemma or qwen35 and not name.endswith("linear_attn.norm.weight")) and name.endswith("norm.weight"):
      value = value + 1  # zero-centred norms stored as 1 + w (Qwen3.5: all but the DeltaNet output norm)
    if name == "model.embed_tokens.weight":
      w.add_tensor("token_embd.weight", value)
      continue
    if name == "model.norm.weight":
      w.add_tensor("output_norm.weight", value)
      continue
    if name == "lm_head.weight":
      if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", value)
      continue
    if name.startswith("mtp."):  # as _Qwen35MtpMixin: the prediction layer after the last block
      w.add_tensor(f"blk.{cfg.num_hidden_layers}.nextn.{name[4:]}", value)
      continue
    _, _, layer, rest = name.split(".", 3)
    if qwen35 and not rest.startswith("mlp.experts."):
      gguf_name, value = qwen35_tensor(rest, value, cfg)
      w.add_tensor(f"blk.{layer}.{gguf_name}", value)
      continue
    if rest in _SHARED_EXPERT:
      w.add_tensor(f"blk.{layer}.{_SHARED_EXPERT[rest]}", value)
      continue
    if rest.startswith("mlp.shared_experts."):  # GLM, DeepSeek: ungated
      w.add_tensor(f"blk.{layer}.ffn_{rest.split('.')[2][:-5]}_shexp.weight", value)
      continue
    if arch == "deepseek2" and rest.startswith("self_attn.") and rest != "self_attn.o_proj.weight":
      mla = {"q_a_proj": "attn_q_a", "q_a_layernorm": "attn_q_a_norm", "q_b_proj": "attn_q_b", "q_proj": "attn_q",
             "kv_a_proj_with_mqa": "attn_kv_a_mqa", "kv_a_layernorm": "attn_kv_a_norm"}
      leaf = rest.split(".")[1]
      if leaf == "kv_b_proj":  # split for the absorbed form, k_b transposed
        nope, vd = cfg.qk_nope_head_dim, cfg.v_head_dim
        kv_b = value.reshape(kv, nope + vd, value.shape[-1])
        w.add_tensor(f"blk.{layer}.attn_k_b.weight", np.ascontiguousarray(np.swapaxes(kv_b[:, :nope], 1, 2)))
        w.add_tensor(f"blk.{layer}.attn_v_b.weight", np.ascontiguousarray(kv_b[:, nope:]))
      else:
        w.add_tensor(f"blk.{layer}.{mla[leaf]}.weight", value)
      continue
    if rest == "mlp.gate.e_score_correction_bias":
      w.add_tensor(f"blk.{layer}.exp_probs_b.bias", value)
      continue
    if llama4:  # Llama4Model.modify_tensors: feed_forward, router, experts [E, in, out] (gate | up) transposed
      rest = rest.replace("feed_forward.", "mlp.").replace("mlp.router.", "mlp.gate.")
      if rest.startswith("mlp.shared_expert."):
        w.add_tensor(f"blk.{layer}.{_SHARED_EXPERT[rest]}", value)
        continue
      if rest == "mlp.experts.gate_up_proj":
        gate, up = np.split(np.swapaxes(value, -1, -2), 2, axis=-2)
        w.add_tensor(f"blk.{layer}.ffn_gate_exps.weight", np.ascontiguousarray(gate))
        w.add_tensor(f"blk.{layer}.ffn_up_exps.weight", np.ascontiguousarray(up))
        continue
      if rest == "mlp.experts.down_proj":
        w.add_tensor(f"blk.{layer}.ffn_down_exps.weight", np.ascontiguousarray(np.swapaxes(value, -1, -2)))
        continue
    if arch in ("llama", "mistral3") and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
      value = permute(value, heads if "q_proj" in rest else kv)
    if rest.startswith(("mlp.experts.", "block_sparse_moe.experts.")):
      expert, kind = rest.split(".")[2:4]
      if per_expert:
        w.add_tensor(f"blk.{layer}.ffn_{_EXPERT[kind]}.{expert}.weight", value)
      else:
        stacks.setdefault(f"blk.{layer}.ffn_{_EXPERT[kind]}_exps.weight", {})[int(expert)] = value
      continue
    if rest == "post_attention_layernorm.weight" and not gemma:
      w.add_tensor(f"blk.{layer}.{'post_attention_norm' if arch == 'glm4moe' else 'ffn_norm'}.weight", value)
      continue
    table = {**_BLOCK_NAMES, **(_GEMMA_NORMS if gemma else {})}
    w.add_tensor(f"blk.{layer}.{table[rest]}", value)
  for name, parts in stacks.items():
    w.add_tensor(name, np.stack([parts[j] for j in range(len(parts))]))
  return _close(w, path)


def _close(w: gguf_lib.GGUFWriter, path: Path) -> Path:
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path
