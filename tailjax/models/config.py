"""Shape and numerics of one decoder: everything a checkpoint's config says."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Llama / Mistral / Qwen2 / SmolLM-style decoder-only transformer.

  Pre-norm blocks (RMSNorm -> grouped-query attention with RoPE -> residual,
  RMSNorm -> SwiGLU -> residual), a final RMSNorm, and an unembedding that is
  either its own matrix or the transposed token embedding (``tie_word_embeddings``).
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None  # defaults to hidden_size // num_heads
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2
  max_position_embeddings: int = 4096

  def __post_init__(self):
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)
