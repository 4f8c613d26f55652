"""The layers every family shares: RMSNorm, rotary embeddings, linear layers, dense gated MLPs.

Layouts follow Hugging Face so that checkpoints map one-to-one: a linear layer's kernel
is ``[in, out]`` (the transpose of PyTorch's weight), and rotary embeddings rotate the two
halves of each head (``rotate_half``). Parameters carry logical axis names (``vocab``,
``embed``, ``heads``, ``kv_heads``, ``mlp``, ``experts``, ``norm``); ``tailjax.mesh`` maps
them onto devices.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tailjax.models.config import ModelConfig, RopeScaling

Array = jax.Array


class BlockOutput(NamedTuple):
  """What a decoder block gives: ``x: [B, T, d]`` its output; ``experts: [B, T, k]`` the experts an MoE block
  routed each token to (else None); ``shared`` the keys and values later layers reuse (Gemma 4, else empty);
  ``cache`` its mixer's decoding cache as updated (``tailjax.models.cache``; None outside decoding)."""

  x: Array
  experts: Array | None
  shared: dict
  cache: Any


def axes(*names: str | None) -> dict:
  """Variable metadata naming logical axes; placement is left to ``tailjax.mesh``."""
  return {"out_sharding": names, "eager_sharding": False}


class RMSNorm(nnx.Module):
  """``x / rms(x) * scale`` over the last axis, in float32 whatever the activation dtype.

  ``scale`` is the stored weight ``w``, or ``1 + w`` with ``unit_offset`` (Gemma's
  zero-centred norms, whose weights start at 0).
  """

  def __init__(self, dim: int, eps: float, unit_offset: bool = False):
    self.scale = nnx.Param(jnp.full(dim, 0.0 if unit_offset else 1.0, jnp.float32), **axes("norm"))
    self.eps = eps
    self.unit_offset = unit_offset

  def __call__(self, x: Array) -> Array:
    scale = self.scale[...].astype(jnp.float32)
    return rms_normalize(x, self.eps, 1.0 + scale if self.unit_offset else scale)


def rms_normalize(x: Array, eps: float, scale: Array | float = 1.0) -> Array:
  """``x / sqrt(mean(x^2) + eps) * scale`` over the last axis, in float32, returned in ``x``'s dtype (an RMSNorm
  without a weight when ``scale`` is 1: Gemma 4's value norm and router input)."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (x32 * scale).astype(x.dtype)


def rope_frequencies(cfg: ModelConfig, seq_len: int, layer_type: str = "full") -> tuple[np.ndarray, float]:
  """``([rotary_dim // 2] inverse frequencies, cos/sin scale)`` for windows of ``seq_len`` tokens.

  Computed in float64 on the host (static per shape); the variants follow Hugging Face's
  ``modeling_rope_utils`` so that converted checkpoints see the same angles. Sliding
  layers of a model with ``rope_local_theta`` (Gemma 3) use plain RoPE at that base.
  """
  dim, base = cfg.rotary_dim or cfg.attention_dims(layer_type)[0], cfg.rope_theta
  s = cfg.rope_scaling or RopeScaling()
  if layer_type == "sliding" and cfg.rope_local_theta is not None:
    base, s = cfg.rope_local_theta, RopeScaling()
  if s.type == "dynamic" and seq_len > cfg.max_position_embeddings:
    base *= (s.factor * seq_len / cfg.max_position_embeddings - (s.factor - 1))**(dim / (dim - 2))
  inv_freq = base**(-np.arange(0, dim, 2, dtype=np.float64) / dim)
  scale = 1.0
  if s.type == "linear":
    inv_freq = inv_freq / s.factor
  elif s.type == "proportional":  # Gemma 4: the first pairs rotate, the others keep angle 0
    angles = int(s.proportion * dim // 2)
    inv_freq = np.concatenate([inv_freq[:angles], np.zeros(dim // 2 - angles)]) / s.factor
  elif s.type == "factors":
    inv_freq = inv_freq / np.asarray(s.divisors, np.float64)
  elif s.type == "longrope":
    old = s.original_max_position_embeddings or cfg.max_position_embeddings
    inv_freq = inv_freq / np.asarray(s.long_factor if seq_len > old else s.short_factor, np.float64)
    factor = cfg.max_position_embeddings / old
    scale = s.attention_factor or (1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old)))
  elif s.type == "llama3":
    old = s.original_max_position_embeddings or cfg.max_position_embeddings
    wavelen = 2 * np.pi / inv_freq
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    inv_freq = np.where(wavelen > old / s.low_freq_factor, inv_freq / s.factor,
                        np.where(wavelen < old / s.high_freq_factor, inv_freq, smoothed))
  elif s.type == "yarn":
    old = s.original_max_position_embeddings or cfg.max_position_embeddings
    mscale = lambda m: 1.0 if s.factor <= 1 else 0.1 * m * math.log(s.factor) + 1.0
    if s.attention_factor is not None:
      scale = s.attention_factor
    elif s.mscale and s.mscale_all_dim:
      scale = mscale(s.mscale) / mscale(s.mscale_all_dim)
    else:
      scale = mscale(1.0)
    corr = lambda rotations: dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(base))
    low, high = corr(s.beta_fast), corr(s.beta_slow)
    if s.truncate:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low if high != low else 0.001), 0, 1)
    inv_freq = inv_freq / s.factor * ramp + inv_freq * (1 - ramp)
  return inv_freq.astype(np.float32), scale


def rotary(x: Array, positions: Array, inv_freq: np.ndarray, scale: float = 1.0, interleaved: bool = False) -> Array:
  """Rotary position embedding on ``x: [B, T, heads, head_dim]`` at ``positions: [B, T]``: the first
  ``2 * len(inv_freq)`` dims of each head are rotated, as their two halves (``rotate_half``) or, ``interleaved``,
  as adjacent pairs ``(2i, 2i + 1)`` (Llama 4's complex multiplication); the rest pass."""
  half = len(inv_freq)
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, half]
  cos, sin = (scale * jnp.cos(angles))[:, :, None, :], (scale * jnp.sin(angles))[:, :, None, :]
  head, rest = x[..., :2 * half].astype(jnp.float32), x[..., 2 * half:].astype(jnp.float32)
  if interleaved:
    pairs = head.reshape(*head.shape[:-1], half, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(head.shape)
  else:
    x1, x2 = head[..., :half], head[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return jnp.concatenate([rotated, rest], axis=-1).astype(x.dtype)


class Linear(nnx.Linear):
  """``nnx.Linear`` (``kernel: [in, out]``, optional ``bias``) that may carry low-rank adapters
  (``tailjax.models.lora``): ``lora_a: [in, r]``, ``lora_b: [r, out]`` and their ``lora_scale``, added as
  ``lora_scale * (d(x) A) B`` in float32, ``d`` dropping inputs at rate ``lora_dropout`` when the layer holds a
  ``lora_key`` (a training forward). Without adapters it is ``nnx.Linear``."""

  lora_a = None
  lora_b = None
  lora_scale = 1.0
  lora_dropout = 0.0
  lora_key = None

  def __call__(self, x: Array) -> Array:
    y = super().__call__(x)
    if self.lora_a is None:
      return y
    x = x.astype(jnp.float32)
    if self.lora_key is not None and self.lora_dropout:
      keep = jax.random.bernoulli(self.lora_key[...], 1.0 - self.lora_dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.lora_dropout), 0.0)
    low = jnp.einsum("...i,ir->...r", x, self.lora_a[...].astype(jnp.float32))
    delta = jnp.einsum("...r,ro->...o", low, self.lora_b[...].astype(jnp.float32))
    return (y.astype(jnp.float32) + self.lora_scale * delta).astype(y.dtype)


def linear(d_in: int, d_out: int, bias: bool, names: tuple[str, str], dtype, param_dtype, rngs) -> Linear:
  return Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names, eager_sharding=False),
                bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), names[1:], eager_sharding=False))


def gated(cfg: ModelConfig, gate: Array, up: Array) -> Array:
  """The gated unit of ``cfg.hidden_act`` on the two projections: ``silu(gate) * up`` (SwiGLU),
  ``gelu_tanh(gate) * up`` (GeGLU: PyTorch's ``gelu(approximate="tanh")``), or gpt-oss's clamped SwiGLU
  ``(clip(up, -l, l) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, l)``."""
  if cfg.hidden_act == "silu":
    return jax.nn.silu(gate) * up
  if cfg.hidden_act == "gelu_tanh":
    return jax.nn.gelu(gate, approximate=True) * up
  limit = cfg.swiglu_limit
  gate = jnp.minimum(gate, limit)
  return (jnp.clip(up, -limit, limit) + 1) * gate * jax.nn.sigmoid(gate * cfg.swiglu_alpha)


class MLP(nnx.Module):
  """Gated MLP: ``down(act(gate(x)) * up(x))`` with SwiGLU or GeGLU, ``width`` wide (default
  ``cfg.intermediate_size``; an MoE's shared expert is narrower)."""

  def __init__(self, cfg: ModelConfig, dtype, param_dtype, rngs: nnx.Rngs, width: int | None = None):
    d, m = cfg.hidden_size, width or cfg.intermediate_size
    self.gate = linear(d, m, False, ("embed", "mlp"), dtype, param_dtype, rngs)
    self.up = linear(d, m, False, ("embed", "mlp"), dtype, param_dtype, rngs)
    self.down = linear(m, d, False, ("mlp", "embed"), dtype, param_dtype, rngs)
    self.cfg = cfg

  def __call__(self, x: Array) -> Array:
    return self.down(gated(self.cfg, self.gate(x), self.up(x)))
