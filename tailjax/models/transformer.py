"""A Flax NNX decoder that returns hidden states and exposes its unembedding.

tailjax never asks a model for ``[tokens, vocab]`` logits on the hot path: the model
stops at the final norm, and ``tailjax.head`` reads the unembedding blockwise.
Layouts follow Hugging Face's Llama so that checkpoints map one-to-one: a linear
layer's kernel is ``[in, out]`` (the transpose of PyTorch's weight), and rotary
embeddings rotate the two halves of each head (``rotate_half``).

Parameters carry logical axis names (``vocab``, ``embed``, ``heads``, ``kv_heads``,
``mlp``, ``norm``); ``tailjax.mesh`` maps them onto devices.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tailjax.models.config import ModelConfig, RopeScaling

Array = jax.Array


def _axes(*names: str | None) -> dict:
  """Variable metadata naming logical axes; placement is left to ``tailjax.mesh``."""
  return {"out_sharding": names, "eager_sharding": False}


class RMSNorm(nnx.Module):
  """``x / rms(x) * scale``, computed in float32 whatever the activation dtype."""

  def __init__(self, dim: int, eps: float):
    self.scale = nnx.Param(jnp.ones(dim, jnp.float32), **_axes("norm"))
    self.eps = eps

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...]).astype(x.dtype)


def rope_frequencies(cfg: ModelConfig, seq_len: int) -> tuple[np.ndarray, float]:
  """``([head_dim // 2] inverse frequencies, cos/sin scale)`` for windows of ``seq_len`` tokens.

  Computed in float64 on the host (static per shape); the variants follow Hugging Face's
  ``modeling_rope_utils`` so that converted checkpoints see the same angles.
  """
  dim, base = cfg.head_dim, cfg.rope_theta
  s = cfg.rope_scaling or RopeScaling()
  if s.type == "dynamic" and seq_len > cfg.max_position_embeddings:
    base *= (s.factor * seq_len / cfg.max_position_embeddings - (s.factor - 1))**(dim / (dim - 2))
  inv_freq = base**(-np.arange(0, dim, 2, dtype=np.float64) / dim)
  scale = 1.0
  if s.type == "linear":
    inv_freq = inv_freq / s.factor
  elif s.type == "factors":
    inv_freq = inv_freq / np.asarray(s.divisors, np.float64)
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


def rotary(x: Array, positions: Array, inv_freq: np.ndarray, scale: float = 1.0) -> Array:
  """Rotary position embedding on ``x: [B, T, heads, head_dim]`` at ``positions: [B, T]``."""
  half = x.shape[-1] // 2
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, half]
  cos, sin = (scale * jnp.cos(angles))[:, :, None, :], (scale * jnp.sin(angles))[:, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _linear(d_in: int, d_out: int, bias: bool, axes: tuple[str, str], dtype, param_dtype, rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                    kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), axes, eager_sharding=False),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), axes[1:], eager_sharding=False))


def _projections(cfg: ModelConfig, dtype, param_dtype, rngs) -> tuple[nnx.Linear, ...]:
  """q, k, v (grouped: ``num_kv_heads`` for k and v) and the output projection o."""
  d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  return (_linear(d, h * hd, cfg.qkv_bias, ("embed", "heads"), dtype, param_dtype, rngs),
          _linear(d, kv * hd, cfg.qkv_bias, ("embed", "kv_heads"), dtype, param_dtype, rngs),
          _linear(d, kv * hd, cfg.qkv_bias, ("embed", "kv_heads"), dtype, param_dtype, rngs),
          _linear(h * hd, d, cfg.o_bias, ("heads", "embed"), dtype, param_dtype, rngs))


def causal_attention(q: Array, k: Array, v: Array, mask: Array, window: int | None = None) -> Array:
  """Grouped-query softmax attention that skips the keys a causal mask hides.

  ``q: [B, T, heads, hd]``; ``k, v: [B, T, kv_heads, hd]``; ``mask: [B, T, T]``, True where a query
  may see a key, never above the diagonal (nor beyond ``window`` keys back) -> ``[B, T, heads, hd]``.

  Queries go in chunks, each against the keys from its window's start to its own last row
  only: about half the work of the full square (``jax.nn.dot_product_attention``'s XLA path
  computes all of it), with score tiles small enough to stay in cache (on CPU, 3x faster).
  Scores and softmax in float32; rows are normalised after the value product.
  """
  b, t, heads, hd = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, heads // kv, hd).transpose(0, 2, 3, 1, 4)  # [B, kv, group, T, hd]
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, kv, T, hd]
  chunk = max(128, -(-t // 8))  # more chunks save little and cost compile time
  out = []
  for start in range(0, t, chunk):
    end = min(start + chunk, t)
    first = 0 if window is None else max(0, start - window + 1)
    scores = jnp.einsum("bkgqd,bksd->bkgqs", q[:, :, :, start:end], k[:, :, first:end],
                        preferred_element_type=jnp.float32) * hd**-0.5
    scores = jnp.where(mask[:, None, None, start:end, first:end], scores, -jnp.inf)
    p = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))  # the diagonal is always visible
    o = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v.dtype), v[:, :, first:end], preferred_element_type=jnp.float32)
    out.append(o / jnp.sum(p, axis=-1, keepdims=True))
  out = jnp.concatenate(out, axis=3).astype(q.dtype)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, heads, hd)


class Attention(nnx.Module):
  """Grouped-query causal self-attention with rotary positions; logits and softmax in float32."""

  def __init__(self, cfg: ModelConfig, dtype, param_dtype, rngs: nnx.Rngs):
    self.q, self.k, self.v, self.o = _projections(cfg, dtype, param_dtype, rngs)
    self.cfg = cfg

  def __call__(self, x: Array, positions: Array, mask: Array) -> Array:
    cfg = self.cfg
    b, t, _ = x.shape
    inv_freq, scale = rope_frequencies(cfg, t)
    q = rotary(self.q(x).reshape(b, t, cfg.num_heads, cfg.head_dim), positions, inv_freq, scale)
    k = rotary(self.k(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim), positions, inv_freq, scale)
    v = self.v(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    out = causal_attention(q, k, v, mask, cfg.sliding_window)
    return self.o(out.reshape(b, t, cfg.num_heads * cfg.head_dim))


class Retention(nnx.Module):
  """RetNet-style retention (Sun et al., 2023) in its parallel form.

  Identity feature map, no softmax and no rotary: ``out_h = ((q_h k_h^T / sqrt(d)) * D_h) v_h``
  with the causal decay ``D_h[n, m] = gamma_h^(n - m)``, ``gamma_h = 1 - 2^(-5 - h)``, then a
  per-head LayerNorm before the output projection.
  """

  def __init__(self, cfg: ModelConfig, dtype, param_dtype, rngs: nnx.Rngs):
    self.q, self.k, self.v, self.o = _projections(cfg, dtype, param_dtype, rngs)
    h, hd = cfg.num_heads, cfg.head_dim
    self.norm_scale = nnx.Param(jnp.ones((h, hd), jnp.float32), **_axes("heads", None))
    self.norm_bias = nnx.Param(jnp.zeros((h, hd), jnp.float32), **_axes("heads", None))
    self.cfg = cfg

  def __call__(self, x: Array, positions: Array, mask: Array) -> Array:
    cfg = self.cfg
    b, t, _ = x.shape
    groups = cfg.num_heads // cfg.num_kv_heads
    q = self.q(x).reshape(b, t, cfg.num_kv_heads, groups, cfg.head_dim)
    k = self.k(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = self.v(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    log_gamma = jnp.log1p(-2.0**(-5.0 - jnp.arange(cfg.num_heads, dtype=jnp.float32)))
    distance = (jnp.arange(t)[:, None] - jnp.arange(t)[None, :]).astype(jnp.float32)
    decay = jnp.exp(log_gamma.reshape(cfg.num_kv_heads, groups, 1, 1) * jnp.maximum(distance, 0))
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * cfg.head_dim**-0.5
    scores = jnp.where(mask[:, None, None], scores * decay, 0.0)
    out = jnp.einsum("bkgqs,bskd->bqkgd", scores, v.astype(jnp.float32))
    out = out.reshape(b, t, cfg.num_heads, cfg.head_dim)
    mean = out.mean(-1, keepdims=True)
    out = (out - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(out - mean), -1, keepdims=True) + cfg.rms_norm_eps)
    out = out * self.norm_scale[...] + self.norm_bias[...]
    return self.o(out.reshape(b, t, cfg.num_heads * cfg.head_dim).astype(x.dtype))


class MLP(nnx.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, cfg: ModelConfig, dtype, param_dtype, rngs: nnx.Rngs):
    d, m = cfg.hidden_size, cfg.intermediate_size
    self.gate = _linear(d, m, False, ("embed", "mlp"), dtype, param_dtype, rngs)
    self.up = _linear(d, m, False, ("embed", "mlp"), dtype, param_dtype, rngs)
    self.down = _linear(m, d, False, ("mlp", "embed"), dtype, param_dtype, rngs)

  def __call__(self, x: Array) -> Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, dtype, param_dtype, rngs: nnx.Rngs):
    mixer = Retention if cfg.attention == "retention" else Attention
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.attn = mixer(cfg, dtype, param_dtype, rngs)
    self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.mlp = MLP(cfg, dtype, param_dtype, rngs)

  def __call__(self, x: Array, positions: Array, mask: Array) -> Array:
    x = x + self.attn(self.attn_norm(x), positions, mask)
    return x + self.mlp(self.mlp_norm(x))


class Decoder(nnx.Module):
  """Token ids -> final-norm hidden states; ``unembedding()`` gives the ``[d, V]`` output matrix.

  ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype (defaults to ``dtype``);
  norms, attention logits and softmax stay in float32 either way.
  """

  def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs):
    param_dtype = param_dtype or dtype
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                           embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed"),
                                                                  eager_sharding=False))
    self.blocks = nnx.List([Block(cfg, dtype, param_dtype, rngs) for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    if not cfg.tie_word_embeddings:
      init = nnx.initializers.lecun_normal()
      self.lm_head = nnx.Param(init(rngs.params(), (cfg.hidden_size, cfg.vocab_size), param_dtype),
                               **_axes("embed", "vocab"))

  def __call__(self, tokens: Array, segment_ids: Array | None = None) -> Array:
    """``tokens: [B, T]`` int -> ``[B, T, d]``.

    ``segment_ids: [B, T]`` (optional) keeps packed documents apart and marks padding
    with 0: a token attends to earlier tokens of its own non-zero segment only, and
    positions restart at each segment.
    """
    b, t = tokens.shape
    index = jnp.arange(t)
    causal = index[:, None] >= index[None, :]
    if self.cfg.sliding_window is not None:
      causal &= index[:, None] - index[None, :] < self.cfg.sliding_window
    if segment_ids is None:
      mask = jnp.broadcast_to(causal[None], (b, t, t))
      positions = jnp.broadcast_to(index, (b, t))
    else:
      same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] > 0)
      mask = causal[None] & same | jnp.eye(t, dtype=bool)[None]  # every row keeps itself: no all-masked softmax
      starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
      positions = index[None] - jax.lax.cummax(jnp.where(starts, index[None], 0), axis=1)
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x, positions, mask)
    return self.norm(x)

  def unembedding(self) -> Array:
    """``[d, V]`` output matrix (the transposed embedding when tied)."""
    return self.embed.embedding[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]
