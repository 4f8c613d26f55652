"""Shape and numerics of one decoder: everything a checkpoint's config says."""

from __future__ import annotations

import dataclasses
from typing import Any

ATTENTION_KINDS = ("softmax", "retention")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "factors")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Context-extension variants of rotary embeddings, as Hugging Face's ``rope_parameters`` name them.

  ``linear`` divides every frequency by ``factor``; ``dynamic`` (NTK) raises the base when
  a window is longer than ``max_position_embeddings``; ``yarn`` blends interpolated and
  extrapolated frequencies and scales cos/sin by ``attention_factor``; ``llama3`` divides
  low frequencies by ``factor`` with a smooth ramp; ``factors`` divides frequency ``i``
  by ``divisors[i]`` (llama.cpp's ``rope_freqs`` tensor in GGUF files).
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
  divisors: tuple[float, ...] | None = None  # factors

  def __post_init__(self):
    if self.type not in ROPE_TYPES:
      raise ValueError(f"rope type {self.type!r} is not supported (supported: {ROPE_TYPES})")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Llama / Mistral / Qwen2 / SmolLM-style decoder-only transformer.

  Pre-norm blocks (RMSNorm -> grouped-query attention with RoPE -> residual,
  RMSNorm -> SwiGLU -> residual), a final RMSNorm, and an unembedding that is
  either its own matrix or the transposed token embedding (``tie_word_embeddings``).
  ``attention="retention"`` swaps softmax attention for RetNet-style retention
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
  sliding_window: int | None = None  # Mistral: attend to at most this many tokens, itself included
  attention: str = "softmax"

  def __post_init__(self):
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
    if self.attention not in ATTENTION_KINDS:
      raise ValueError(f"attention={self.attention!r} is not one of {ATTENTION_KINDS}")

  @property
  def num_params(self) -> int:
    d, hd = self.hidden_size, self.head_dim
    attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
    attn += hd * (self.num_heads + 2 * self.num_kv_heads) if self.qkv_bias else 0
    attn += d if self.o_bias else 0
    attn += 2 * self.num_heads * hd if self.attention == "retention" else 0  # per-head norm scale and bias
    block = attn + 3 * d * self.intermediate_size + 2 * d
    head = 0 if self.tie_word_embeddings else d * self.vocab_size
    return self.vocab_size * d + self.num_layers * block + d + head

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
      scaling = dict(fields["rope_scaling"])
      if scaling.get("divisors") is not None:
        scaling["divisors"] = tuple(scaling["divisors"])
      fields["rope_scaling"] = RopeScaling(**scaling)
    return cls(**fields)


PRESETS = {
    # ../shared/mission/001 section 4: 8 layers, 384 dims, 6 heads, GPT-2 vocabulary, ~34M params
    # (tied embedding; a SwiGLU of width 1024 has the parameters of a 4x GELU MLP).
    "tinystories-34m": ModelConfig(vocab_size=50257, hidden_size=384, intermediate_size=1024, num_layers=8,
                                   num_heads=6, num_kv_heads=6, tie_word_embeddings=True,
                                   max_position_embeddings=2048),
}
PRESETS["tinystories-34m-retention"] = dataclasses.replace(PRESETS["tinystories-34m"], attention="retention")
