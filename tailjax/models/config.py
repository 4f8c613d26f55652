"""Shape and numerics of one decoder: everything a checkpoint's config says."""

from __future__ import annotations

import dataclasses
from typing import Any

ATTENTION_KINDS = ("softmax", "retention", "mla")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "factors", "longrope", "proportional")
LAYER_TYPES = ("full", "sliding", "chunked", "linear")
ACTIVATIONS = ("silu", "gelu_tanh", "clamped_swiglu")
ROUTERS = ("softmax", "sigmoid_groups", "scaled_softmax", "sigmoid_inputs")
BLOCKS = ("pre_norm", "gemma4")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Context-extension variants of rotary embeddings, as Hugging Face's ``rope_parameters`` name them.

  ``linear`` divides every frequency by ``factor``; ``dynamic`` (NTK) raises the base when
  a window is longer than ``max_position_embeddings``; ``yarn`` blends interpolated and
  extrapolated frequencies and scales cos/sin by ``attention_factor``; ``llama3`` divides
  low frequencies by ``factor`` with a smooth ramp; ``factors`` divides frequency ``i``
  by ``divisors[i]`` (llama.cpp's ``rope_freqs`` tensor in GGUF files); ``longrope`` (Phi-3)
  divides frequency ``i`` by ``long_factor[i]`` for windows longer than
  ``original_max_position_embeddings``, else by ``short_factor[i]``, and scales cos/sin by
  ``attention_factor`` (default ``sqrt(1 + log(factor) / log(original))``); ``proportional`` (Gemma 4's
  global layers) rotates the first ``proportion`` of a head's ``head_dim / 2`` angle pairs at
  ``base^(-2i / head_dim)`` (exponents over the whole head), the rest not at all, each frequency over ``factor``.
  """

  type: str = "default"
  factor: float = 1.0
  original_max_position_embeddings: int | None = None
  low_freq_factor: float = 1.0  # llama3
  high_freq_factor: float = 4.0  # llama3
  beta_fast: float = 32.0  # yarn
  beta_slow: float = 1.0  # yarn
  attention_factor: float | None = None  # yarn
  mscale: float | None = None  # yarn
  mscale_all_dim: float | None = None  # yarn
  truncate: bool = True  # yarn
  proportion: float = 1.0  # proportional: the share of a head's angle pairs that rotate
  divisors: tuple[float, ...] | None = None  # factors
  short_factor: tuple[float, ...] | None = None  # longrope
  long_factor: tuple[float, ...] | None = None  # longrope

  def __post_init__(self):
    if self.type not in ROPE_TYPES:
      raise ValueError(f"rope type {self.type!r} is not supported (supported: {ROPE_TYPES})")
    for name in ("divisors", "short_factor", "long_factor"):
      if getattr(self, name) is not None:
        object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only transformer of the Llama family tree, described by what differs.

  The base is Llama's: pre-norm blocks (RMSNorm -> grouped-query attention with RoPE ->
  residual, RMSNorm -> SwiGLU -> residual), a final RMSNorm, and an unembedding that is
  either its own matrix or the transposed token embedding (``tie_word_embeddings``).
  Each family turns on its differences (``tailjax.models.families`` says which):

  - attention: q/k biases (Qwen2), per-head RMSNorm on q and k before RoPE (``qk_norm``:
    Qwen3, Gemma 3), a score scale of ``query_pre_attn_scalar**-0.5`` and a soft-cap
    ``c * tanh(s / c)`` on scores (Gemma 2), sliding windows in every layer (Mistral) or in
    the layers ``layer_types`` marks ``"sliding"`` (Gemma 2/3), those layers with their own
    unscaled RoPE base ``rope_local_theta`` (Gemma 3), queries scaled up with their
    position beyond the original context (``query_position_scaling``: Mistral 3), a learned
    sink logit per head in each softmax (``attention_sinks``: gpt-oss), the output gated by
    ``sigmoid`` of a second query-sized projection (``attn_output_gate``: Qwen3.5); Llama 4's RoPE on
    adjacent pairs (``rope_interleaved``), layers without RoPE (``nope_layers``) whose queries grow with the
    position (``nope_query_scaling``), q and k RMS-normalised without weights after RoPE in the other layers
    (``qk_l2_norm``), and layers marked ``"chunked"`` that attend within aligned chunks of
    ``attention_chunk_size`` tokens;
  - layers marked ``"linear"`` in ``layer_types`` mix tokens by Gated DeltaNet instead of softmax
    attention (``tailjax.models.deltanet``; ``linear_*`` fields: Qwen3.5 / Qwen3.6);
  - blocks: norms with scale ``1 + w`` (``norm_unit_offset``), norms after attention and MLP
    as well (``sandwich_norms``), GeGLU (``hidden_act="gelu_tanh"``), embeddings times
    ``sqrt(d)`` in the compute dtype (``scale_embeddings``): Gemma 2/3;
  - MLP: a sparse mixture of ``num_experts`` SwiGLU experts, each token through its
    ``num_experts_per_tok`` highest-scoring ones (``tailjax.models.moe``), except in
    ``dense_layers`` (Qwen3-MoE, Mixtral); with router and expert biases and a clamped SwiGLU
    (``moe_bias``, ``hidden_act="clamped_swiglu"``: gpt-oss); routed by group-limited top-k of
    sigmoid scores with a shared expert beside (``router="sigmoid_groups"``, ``shared_expert_size``:
    GLM-4.5), a shared expert behind a sigmoid gate (``shared_expert_gate``: Qwen2-MoE); the top-k experts'
    inputs scaled by the sigmoid of their logits beside a shared expert (``router="sigmoid_inputs"``: Llama 4);
    RoPE on the first ``rotary_dim`` dims of each head only (GLM);
  - output: logits soft-capped at ``final_logit_softcap`` (Gemma 2), applied by
    ``tailjax.head`` blockwise;
  - ``block="gemma4"`` (``tailjax.models.gemma4``): Gemma 4's block, whose ``"full"`` layers may have their own head
    width and KV heads (``full_head_dim``, ``full_num_kv_heads``) and take values from the key projection
    (``full_values_from_keys``), whose last ``num_kv_shared_layers`` layers reuse the keys and values of the last
    earlier layer of their type (their MLP ``shared_kv_mlp_factor`` times wider), with per-layer input embeddings
    of width ``per_layer_input_size`` and an MoE beside the dense MLP (``router="scaled_softmax"``).

  ``attention="mla"`` is multi-head latent attention (``tailjax.models.mla``: GLM-4.7-Flash), keys and values
  rebuilt from a ``kv_lora_rank`` latent, heads of ``head_dim`` (``rotary_dim`` of them rotated) and values of
  ``value_head_dim``. ``attention="retention"`` swaps softmax attention for RetNet-style retention
  (the linear-attention variant of ../shared/mission/001, appendix G).
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None  # defaults to hidden_size // num_heads
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2; Llama's attention_bias sets both
  o_bias: bool = False
  max_position_embeddings: int = 4096
  sliding_window: int | None = None  # attend to at most this many tokens, itself included
  attention: str = "softmax"
  qk_norm: bool = False
  query_pre_attn_scalar: float | None = None  # None: head_dim
  attn_logit_softcap: float | None = None
  layer_types: tuple[str, ...] | None = None  # "full" / "sliding" / "linear" per layer; None: all sliding iff
  # sliding_window
  rope_local_theta: float | None = None  # RoPE base of "sliding" layers (no scaling); None: as "full" layers
  norm_unit_offset: bool = False
  sandwich_norms: bool = False
  hidden_act: str = "silu"
  scale_embeddings: bool = False
  final_logit_softcap: float | None = None
  num_experts: int = 0
  num_experts_per_tok: int = 0
  moe_intermediate_size: int | None = None
  norm_topk_prob: bool = False  # renormalize the chosen experts' router probabilities to sum to 1
  dense_layers: tuple[int, ...] = ()  # layers of an MoE model whose MLP is dense (intermediate_size)
  # (beta, period): queries scaled by 1 + beta * log(1 + floor(position / period)) after RoPE (Mistral 3's
  # llama_4_scaling_beta over the original context length); None: no position scaling
  query_position_scaling: tuple[float, int] | None = None
  attention_sinks: bool = False  # a learned per-head logit in every softmax's denominator (gpt-oss)
  moe_bias: bool = False  # biases on the router and on every expert's projections (gpt-oss)
  swiglu_alpha: float = 1.702  # hidden_act="clamped_swiglu": (clip(up) + 1) * g * sigmoid(alpha * g), g clipped
  swiglu_limit: float = 7.0  # ... at swiglu_limit (gpt-oss)
  rotary_dim: int | None = None  # the leading dims of each head that RoPE rotates; None: all (GLM, Phi-4-mini)
  router: str = "softmax"  # "softmax" top-k, or "sigmoid_groups": GLM's group-limited top-k of sigmoid scores
  router_groups: tuple[int, int] = (1, 1)  # (groups of experts, groups a token may choose): sigmoid_groups
  routed_scaling_factor: float = 1.0  # the chosen experts' weights times this (GLM)
  shared_expert_size: int = 0  # width of an always-on SwiGLU expert added to every MoE layer (GLM); 0: none
  shared_expert_gate: bool = False  # the shared expert's output times sigmoid(x @ w), w: [d, 1] (Qwen2-MoE)
  attn_output_gate: bool = False  # attention output times sigmoid(x @ w_gate), w_gate: [d, heads * hd] (Qwen3.5)
  # Gated DeltaNet ("linear" layers): key/query and value heads, their widths, the causal convolution's taps
  linear_num_key_heads: int = 0
  linear_num_value_heads: int = 0
  linear_key_head_dim: int = 0
  linear_value_head_dim: int = 0
  linear_conv_kernel: int = 4
  # Llama 4: RoPE on adjacent pairs; layers without RoPE, their queries times 1 + beta * log1p(floor((position + 1)
  # / period)) with (beta, period) = nope_query_scaling; weightless q/k norms after RoPE; "chunked" layers' chunks
  rope_interleaved: bool = False
  nope_layers: tuple[int, ...] = ()
  nope_query_scaling: tuple[float, int] | None = None
  qk_l2_norm: bool = False
  attention_chunk_size: int | None = None
  # multi-head latent attention (attention="mla"): query and key/value latent widths (q_lora_rank 0: a plain
  # query projection), value head width (None: head_dim)
  q_lora_rank: int = 0
  kv_lora_rank: int = 0
  value_head_dim: int | None = None
  block: str = "pre_norm"  # "pre_norm": Block (tailjax.models.transformer); "gemma4": tailjax.models.gemma4
  # Gemma 4: "full" layers' head width and KV heads (None: head_dim, num_kv_heads), their values taken from the
  # key projection; per-layer input embeddings (width, vocabulary); the last layers reusing earlier keys/values
  full_head_dim: int | None = None
  full_num_kv_heads: int | None = None
  full_values_from_keys: bool = False
  per_layer_input_size: int = 0
  per_layer_vocab_size: int = 0
  num_kv_shared_layers: int = 0
  shared_kv_mlp_factor: int = 1

  def __post_init__(self):
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.value_head_dim is None:
      object.__setattr__(self, "value_head_dim", self.head_dim)
    if self.attention == "mla" and (self.kv_lora_rank < 1 or self.rotary_dim is None):
      raise ValueError("attention='mla' needs kv_lora_rank and rotary_dim (the rotated share of each head)")
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
    if self.attention not in ATTENTION_KINDS:
      raise ValueError(f"attention={self.attention!r} is not one of {ATTENTION_KINDS}")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act={self.hidden_act!r} is not one of {ACTIVATIONS}")
    for name in ("layer_types", "dense_layers", "query_position_scaling", "router_groups", "nope_layers",
                 "nope_query_scaling"):
      if getattr(self, name) is not None:
        object.__setattr__(self, name, tuple(getattr(self, name)))
    if self.layer_types is not None:
      if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(LAYER_TYPES):
        raise ValueError(f"layer_types={self.layer_types} must name {LAYER_TYPES} once per layer ({self.num_layers})")
      if "sliding" in self.layer_types and self.sliding_window is None:
        raise ValueError("layer_types has sliding layers but sliding_window is not set")
      if "chunked" in self.layer_types and not (self.attention_chunk_size or 0) > 0:
        raise ValueError("layer_types has chunked layers but attention_chunk_size is not set")
      linear = (self.linear_num_key_heads, self.linear_num_value_heads, self.linear_key_head_dim,
                self.linear_value_head_dim, self.linear_conv_kernel)
      if "linear" in self.layer_types and (min(linear) < 1 or self.linear_num_value_heads % self.linear_num_key_heads):
        raise ValueError(f"linear layers need positive linear_* sizes (key heads, value heads, key dim, value dim, "
                         f"taps: {linear}) and value heads a multiple of key heads")
    if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
      raise ValueError(f"rotary_dim={self.rotary_dim} must be even and in (0, head_dim={self.head_dim}]")
    if self.block not in BLOCKS:
      raise ValueError(f"block={self.block!r} is not one of {BLOCKS}")
    if self.block != "gemma4" and (self.full_head_dim or self.full_num_kv_heads or self.full_values_from_keys or
                                   self.per_layer_input_size or self.num_kv_shared_layers):
      raise ValueError("full_head_dim, full_num_kv_heads, full_values_from_keys, per_layer_input_size and "
                       "num_kv_shared_layers are Gemma 4's (block='gemma4')")
    full_hd, full_kv = self.attention_dims("full")
    if full_hd % 2 or self.num_heads % full_kv:
      raise ValueError(f"full layers: head_dim={full_hd} must be even and num_heads={self.num_heads} a multiple "
                       f"of their kv heads ({full_kv})")
    if self.num_kv_shared_layers:
      first = self.num_layers - self.num_kv_shared_layers
      kinds = {self.layer_type(i) for i in range(first)}
      if not 0 < first or not {self.layer_type(i) for i in range(first, self.num_layers)} <= kinds:
        raise ValueError(f"num_kv_shared_layers={self.num_kv_shared_layers}: every layer type of the last "
                         f"{self.num_kv_shared_layers} layers needs an earlier layer of that type to share from")
    if self.per_layer_input_size and self.per_layer_vocab_size < 1:
      raise ValueError("per_layer_input_size needs per_layer_vocab_size")
    if self.router not in ROUTERS:
      raise ValueError(f"router={self.router!r} is not one of {ROUTERS}")
    groups, chosen = self.router_groups
    if self.num_experts and (self.num_experts % groups or not 0 < chosen <= groups or
                             self.router == "sigmoid_groups" and self.num_experts // groups < 2):
      raise ValueError(f"router_groups={self.router_groups} must split {self.num_experts} experts into groups of "
                       "at least 2, of which a token chooses 1..groups")
    if self.query_position_scaling is not None and (len(self.query_position_scaling) != 2 or
                                                    self.query_position_scaling[1] < 1):
      raise ValueError(f"query_position_scaling={self.query_position_scaling} must be (beta, period >= 1)")
    if self.num_experts:
      if not 0 < self.num_experts_per_tok <= self.num_experts or not self.moe_intermediate_size:
        raise ValueError(f"an MoE config needs 0 < num_experts_per_tok={self.num_experts_per_tok} <= "
                         f"num_experts={self.num_experts} and moe_intermediate_size={self.moe_intermediate_size}")
      if not set(self.dense_layers) <= set(range(self.num_layers)):
        raise ValueError(f"dense_layers={self.dense_layers} are not all layers of {self.num_layers}")

  def layer_type(self, layer: int) -> str:
    """``"full"``, ``"sliding"`` (attends to the last ``sliding_window`` tokens only) or ``"linear"`` (Gated
    DeltaNet)."""
    if self.layer_types is not None:
      return self.layer_types[layer]
    return "full" if self.sliding_window is None else "sliding"

  def is_moe_layer(self, layer: int) -> bool:
    return self.num_experts > 0 and layer not in self.dense_layers

  def attention_dims(self, layer_type: str) -> tuple[int, int]:
    """``(head_dim, kv_heads)`` of a softmax layer of this type (Gemma 4's full layers may differ)."""
    if layer_type == "full":
      return self.full_head_dim or self.head_dim, self.full_num_kv_heads or self.num_kv_heads
    return self.head_dim, self.num_kv_heads

  def uses_rope(self, layer: int) -> bool:
    return layer not in self.nope_layers

  def kv_shared(self, layer: int) -> bool:
    """Whether the layer reuses the keys and values of the last earlier layer of its type (Gemma 4)."""
    return layer >= self.num_layers - self.num_kv_shared_layers

  @property
  def num_params(self) -> int:
    d = self.hidden_size
    gemma4 = self.block == "gemma4"

    def attn(layer: int) -> int:
      hd, kv = self.attention_dims(self.layer_type(layer))
      if self.attention == "mla":
        h, rope, vd, q_lora, latent = self.num_heads, self.rotary_dim, self.value_head_dim, self.q_lora_rank, \
            self.kv_lora_rank
        query = (d + 1 + h * hd) * q_lora + (q_lora if self.qkv_bias else 0) if q_lora else d * h * hd
        keys = (d + self.qkv_bias) * (latent + rope) + latent + latent * h * (hd - rope + vd)
        return query + keys + h * vd * d + (d if self.o_bias else 0)
      kv_widths = 0 if self.kv_shared(layer) else 1 if self.full_values_from_keys and \
          self.layer_type(layer) == "full" else 2
      n = d * hd * (2 * self.num_heads + kv_widths * kv)
      n += hd * (self.num_heads + kv_widths * kv) if self.qkv_bias else 0
      n += d if self.o_bias else 0
      n += 2 * self.num_heads * hd if self.attention == "retention" else 0  # per-head norm scale and bias
      n += (1 + (kv_widths > 0)) * hd if self.qk_norm else 0
      return n + (d * self.num_heads * hd if self.attn_output_gate else 0)

    keys, values = self.linear_num_key_heads * self.linear_key_head_dim, self.linear_num_value_heads * \
        self.linear_value_head_dim
    linear = (d * (2 * keys + 2 * values + 2 * self.linear_num_value_heads) + values * d  # q k v z b a, out
              + self.linear_conv_kernel * (2 * keys + values) + 2 * self.linear_num_value_heads
              + self.linear_value_head_dim)  # conv, dt_bias and A_log, norm
    norms = (4 if self.sandwich_norms else 2) * d
    p = self.per_layer_input_size
    total = self.vocab_size * d + d + (0 if self.tie_word_embeddings else d * self.vocab_size)
    total += (self.per_layer_vocab_size + d) * self.num_layers * p + p if p else 0  # embedding, projection, norm
    for layer in range(self.num_layers):
      experts = (d + (self.router == "sigmoid_groups")) * self.num_experts + 3 * d * self.moe_intermediate_size * \
          self.num_experts if self.is_moe_layer(layer) else 0  # router (and its choice-only correction), experts
      if self.is_moe_layer(layer) and not gemma4:
        mlp = experts + 3 * d * self.shared_expert_size + (d if self.shared_expert_gate else 0)
      else:  # Gemma 4: the dense MLP and beside it the experts, their router's scales and three norms
        wide = self.shared_kv_mlp_factor if self.kv_shared(layer) else 1
        mlp = 3 * d * self.intermediate_size * wide + (experts and experts + 4 * d + self.num_experts)
      extra = gemma4 * (1 + (2 * d * p + d if p else 0))  # Gemma 4: layer scalar, per-layer input gate, projection, norm
      total += (linear if self.layer_type(layer) == "linear" else attn(layer)) + mlp + norms + extra
    return total

  @property
  def num_active_params(self) -> int:
    """Parameters one token passes through (an MoE layer counts only its ``num_experts_per_tok`` experts)."""
    if not self.num_experts:
      return self.num_params
    idle = 3 * self.hidden_size * self.moe_intermediate_size * (self.num_experts - self.num_experts_per_tok)
    return self.num_params - idle * sum(self.is_moe_layer(i) for i in range(self.num_layers))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, fields: dict[str, Any]) -> ModelConfig:
    """Inverse of ``to_dict``; an unknown field is an error, not silently dropped."""
    unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
    fields = dict(fields)
    if fields.get("rope_scaling") is not None:
      fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
    return cls(**fields)


PRESETS = {
    # ../shared/mission/001 section 4: 8 layers, 384 dims, 6 heads, GPT-2 vocabulary, ~34M params
    # (tied embedding; a SwiGLU of width 1024 has the parameters of a 4x GELU MLP).
    "tinystories-34m": ModelConfig(vocab_size=50257, hidden_size=384, intermediate_size=1024, num_layers=8,
                                   num_heads=6, num_kv_heads=6, tie_word_embeddings=True,
                                   max_position_embeddings=2048),
}
PRESETS["tinystories-34m-retention"] = dataclasses.replace(PRESETS["tinystories-34m"], attention="retention")
