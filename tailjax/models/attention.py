"""Token mixers: grouped-query softmax attention with its family options, and retention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tailjax.models.cache import KVCache
from tailjax.models.config import ModelConfig
from tailjax.models.layers import RMSNorm, axes, linear, rms_normalize, rope_frequencies, rotary

Array = jax.Array


def _softmax_values(q: Array, k: Array, v: Array, visible: Array, scale: float, softcap: float | None,
                    sink: Array | None) -> Array:
  """The kernel of both attentions, heads grouped: ``q: [B, kv, group, T, hd]``, ``k: [B, kv, S, hd]``,
  ``v: [B, kv, S, vd]``, ``visible: [B, T, S]`` -> ``[B, kv, group, T, vd]`` in float32 (see ``causal_attention``)."""
  scores = jnp.einsum("bkgqd,bksd->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    scores = softcap * jnp.tanh(scores / softcap)
  scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
  top = jnp.max(scores, axis=-1, keepdims=True)  # every row sees at least one key
  top = top if sink is None else jnp.maximum(top, sink)
  p = jnp.exp(scores - top)
  o = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return o / (jnp.sum(p, axis=-1, keepdims=True) + (0 if sink is None else jnp.exp(sink - top)))


def _grouped(q: Array, k: Array, v: Array, sinks: Array | None):
  """``q: [B, T, heads, hd]``, ``k, v: [B, S, kv, ...]`` -> ``_softmax_values``'s layouts, sinks
  ``[1, kv, g, 1, 1]``."""
  b, t, heads, hd = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, heads // kv, hd).transpose(0, 2, 3, 1, 4)  # [B, kv, group, T, hd]
  sink = None if sinks is None else sinks.astype(jnp.float32).reshape(1, kv, heads // kv, 1, 1)
  return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), sink


def _ungrouped(out: Array, dtype) -> Array:
  """``[B, kv, group, T, vd]`` -> ``[B, T, heads, vd]``."""
  b, kv, g, t, vd = out.shape
  return out.astype(dtype).transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, vd)


def causal_attention(q: Array, k: Array, v: Array, mask: Array, window: int | None = None, *,
                     scale: float | None = None, softcap: float | None = None, sinks: Array | None = None) -> Array:
  """Grouped-query softmax attention that skips the keys a causal mask hides.

  ``q, k: [B, T, heads or kv_heads, hd]``; ``v: [B, T, kv_heads, vd]``; ``mask: [B, T, T]``, True where a query
  may see a key, never above the diagonal (nor beyond ``window`` keys back) -> ``[B, T, heads, vd]``.
  Scores are ``q.k * scale`` (default ``hd**-0.5``), soft-capped to ``softcap * tanh(s / softcap)``
  when ``softcap`` is set (Gemma 2), then masked. ``sinks: [heads]`` (gpt-oss) joins each row's softmax
  as one more logit that no value follows: ``p_j = exp(s_j) / (exp(sink) + sum_i exp(s_i))``.

  Queries go in chunks, each against the keys from its window's start to its own last row
  only: about half the work of the full square (``jax.nn.dot_product_attention``'s XLA path
  computes all of it), with score tiles small enough to stay in cache (on CPU, 3x faster).
  Scores and softmax in float32; rows are normalised after the value product.
  """
  t = q.shape[1]
  scale = q.shape[-1]**-0.5 if scale is None else scale
  q, k, v, sink = _grouped(q, k, v, sinks)
  chunk = max(128, -(-t // 8))  # more chunks save little and cost compile time
  out = []
  for start in range(0, t, chunk):
    end = min(start + chunk, t)
    first = 0 if window is None else max(0, start - window + 1)
    out.append(_softmax_values(q[:, :, :, start:end], k[:, :, first:end], v[:, :, first:end],
                               mask[:, start:end, first:end], scale, softcap, sink))
  return _ungrouped(jnp.concatenate(out, axis=3), q.dtype)


def cached_attention(q: Array, k: Array, v: Array, mask: Array, *, scale: float | None = None,
                     softcap: float | None = None, sinks: Array | None = None) -> Array:
  """``causal_attention`` of ``T`` new queries against a cache of ``S`` slots (``tailjax.models.cache``):
  ``q: [B, T, heads, hd]``, ``k: [B, S, kv_heads, hd]``, ``v: [B, S, kv_heads, vd]``, ``mask: [B, T, S]`` (which
  slots each query sees: the cache's mask says causality, windows and padding) -> ``[B, T, heads, vd]``."""
  scale = q.shape[-1]**-0.5 if scale is None else scale
  dtype = q.dtype
  q, k, v, sink = _grouped(q, k, v, sinks)
  return _ungrouped(_softmax_values(q, k, v, mask, scale, softcap, sink), dtype)


def attention(q: Array, k: Array, v: Array, mask: Array, window: int | None = None, **options) -> Array:
  """``causal_attention`` when the queries are the keys' own tokens (``T == S``: a forward pass, or a cache
  filled from slot 0), else ``cached_attention`` (the newest ``T`` of ``S`` cached slots); same ``options``."""
  if q.shape[1] == k.shape[1]:
    return causal_attention(q, k, v, mask, window, **options)
  return cached_attention(q, k, v, mask, **options)


def position_scaled(q: Array, positions: Array, beta: float, period: int) -> Array:
  """``q: [B, T, heads, hd]`` times ``1 + beta * log(1 + floor(positions / period))``, ``positions: [B, T]``."""
  scale = 1 + beta * jnp.log1p(jnp.floor(positions.astype(jnp.float32) / period))
  return q * scale[:, :, None, None].astype(q.dtype)


def _projections(cfg: ModelConfig, dtype, param_dtype, rngs) -> tuple[nnx.Linear, ...]:
  """q, k, v (grouped: ``num_kv_heads`` for k and v) and the output projection o. With ``attn_output_gate`` q
  is twice as wide: per head its query then its gate (``[heads, 2 * hd]``, as Qwen3.5's ``q_proj``)."""
  d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  q_width = h * hd * (2 if cfg.attn_output_gate else 1)
  return (linear(d, q_width, cfg.qkv_bias, ("embed", "heads"), dtype, param_dtype, rngs),
          linear(d, kv * hd, cfg.qkv_bias, ("embed", "kv_heads"), dtype, param_dtype, rngs),
          linear(d, kv * hd, cfg.qkv_bias, ("embed", "kv_heads"), dtype, param_dtype, rngs),
          linear(h * hd, d, cfg.o_bias, ("heads", "embed"), dtype, param_dtype, rngs))


class Attention(nnx.Module):
  """Grouped-query causal self-attention with rotary positions; logits and softmax in float32.

  Per layer: ``layer_type`` ``"sliding"`` attends to the last ``cfg.sliding_window`` tokens and
  (with ``cfg.rope_local_theta``) rotates at its own base. With ``cfg.qk_norm``, q and k are
  RMS-normalised per head before the rotation (Qwen3, Gemma 3); with ``cfg.attention_sinks`` each
  head has a learned sink logit ``sinks: [heads]`` (gpt-oss); with ``cfg.attn_output_gate`` each head's
  output is multiplied by ``sigmoid`` of its gate, the second half of its ``q`` projection (Qwen3.5). Llama 4:
  layers in ``cfg.nope_layers`` skip RoPE and scale their queries up with the position (``nope_query_scaling``),
  the others RMS-normalise q and k without weights after RoPE (``qk_l2_norm``); ``"chunked"`` layers see their
  own chunk (the mask says so; the chunk size bounds how far back keys are read).
  """

  def __init__(self, cfg: ModelConfig, layer: int, dtype, param_dtype, rngs: nnx.Rngs):
    self.q, self.k, self.v, self.o = _projections(cfg, dtype, param_dtype, rngs)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_unit_offset)
      self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_unit_offset)
    if cfg.attention_sinks:
      self.sinks = nnx.Param(jnp.zeros(cfg.num_heads, param_dtype), **axes("heads"))
    self.cfg = cfg
    self.layer_type = cfg.layer_type(layer)
    self.rope = cfg.uses_rope(layer)

  def __call__(self, x: Array, positions: Array, mask: Array, cache: KVCache | None = None
               ) -> tuple[Array, KVCache | None]:
    """``x: [B, T, d]``, ``positions: [B, T]``, ``mask: [B, T, T]`` (``[B, T, S]`` with a ``cache`` of ``S`` slots,
    which the new keys and values are written to) -> (``[B, T, d]``, the cache)."""
    cfg = self.cfg
    b, t, _ = x.shape
    inv_freq, rope_scale = rope_frequencies(cfg, t if cache is None else cache.k.shape[1], self.layer_type)
    q = self.q(x).reshape(b, t, cfg.num_heads, -1)
    q, gate = (q[..., :cfg.head_dim], q[..., cfg.head_dim:]) if cfg.attn_output_gate else (q, None)
    k = self.k(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = self.v(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    if self.rope:
      q = rotary(q, positions, inv_freq, rope_scale, cfg.rope_interleaved)
      k = rotary(k, positions, inv_freq, rope_scale, cfg.rope_interleaved)
      if cfg.qk_l2_norm:
        q, k = rms_normalize(q, cfg.rms_norm_eps), rms_normalize(k, cfg.rms_norm_eps)
    if cfg.query_position_scaling is not None:  # Mistral 3: 1 + beta log(1 + floor(position / period))
      q = position_scaled(q, positions, *cfg.query_position_scaling)
    if not self.rope and cfg.nope_query_scaling is not None:  # Llama 4: 1 + beta log(1 + floor((position + 1) / p))
      q = position_scaled(q, positions + 1, *cfg.nope_query_scaling)
    window = {"sliding": cfg.sliding_window, "chunked": cfg.attention_chunk_size}.get(self.layer_type)
    scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar**-0.5
    sinks = self.sinks[...] if cfg.attention_sinks else None
    if cache is not None:
      cache = cache.write(k, v)
      k, v = cache.k, cache.v
    out = attention(q, k, v, mask, window, scale=scale, softcap=cfg.attn_logit_softcap, sinks=sinks)
    if gate is not None:
      out = out * jax.nn.sigmoid(gate.astype(jnp.float32)).astype(out.dtype)
    return self.o(out.reshape(b, t, cfg.num_heads * cfg.head_dim)), cache


class Retention(nnx.Module):
  """RetNet-style retention (Sun et al., 2023) in its parallel form.

  Identity feature map, no softmax and no rotary: ``out_h = ((q_h k_h^T / sqrt(d)) * D_h) v_h``
  with the causal decay ``D_h[n, m] = gamma_h^(n - m)``, ``gamma_h = 1 - 2^(-5 - h)``, then a
  per-head LayerNorm before the output projection.
  """

  def __init__(self, cfg: ModelConfig, layer: int, dtype, param_dtype, rngs: nnx.Rngs):
    del layer  # retention has no window
    self.q, self.k, self.v, self.o = _projections(cfg, dtype, param_dtype, rngs)
    h, hd = cfg.num_heads, cfg.head_dim
    self.norm_scale = nnx.Param(jnp.ones((h, hd), jnp.float32), **axes("heads", None))
    self.norm_bias = nnx.Param(jnp.zeros((h, hd), jnp.float32), **axes("heads", None))
    self.cfg = cfg

  def __call__(self, x: Array, positions: Array, mask: Array, cache: KVCache | None = None
               ) -> tuple[Array, KVCache | None]:
    """As ``Attention``: with a ``cache``, ``mask: [B, T, S]`` and the decay counts slots back."""
    cfg = self.cfg
    b, t, _ = x.shape
    groups = cfg.num_heads // cfg.num_kv_heads
    q = self.q(x).reshape(b, t, cfg.num_kv_heads, groups, cfg.head_dim)
    k = self.k(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = self.v(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    query_slots, key_slots = jnp.arange(t), jnp.arange(t)
    if cache is not None:
      query_slots, key_slots = cache.index + query_slots, jnp.arange(cache.k.shape[1])
      cache = cache.write(k, v)
      k, v = cache.k, cache.v
    log_gamma = jnp.log1p(-2.0**(-5.0 - jnp.arange(cfg.num_heads, dtype=jnp.float32)))
    distance = (query_slots[:, None] - key_slots[None, :]).astype(jnp.float32)
    decay = jnp.exp(log_gamma.reshape(cfg.num_kv_heads, groups, 1, 1) * jnp.maximum(distance, 0))
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * cfg.head_dim**-0.5
    scores = jnp.where(mask[:, None, None], scores * decay, 0.0)
    out = jnp.einsum("bkgqs,bskd->bqkgd", scores, v.astype(jnp.float32))
    out = out.reshape(b, t, cfg.num_heads, cfg.head_dim)
    mean = out.mean(-1, keepdims=True)
    out = (out - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(out - mean), -1, keepdims=True) + cfg.rms_norm_eps)
    out = out * self.norm_scale[...] + self.norm_bias[...]
    return self.o(out.reshape(b, t, cfg.num_heads * cfg.head_dim).astype(x.dtype)), cache
