"""Multi-head latent attention (DeepSeek-V2's MLA; GLM-4.7-Flash's ``glm4_moe_lite``): keys and values rebuilt from
one small latent per token.

Per token ``x: [d]``, ``H`` heads, key/query heads of ``nope + rope`` dims and values of ``vd``::

    q       = q_b(norm(q_a(x)))  or  q(x)                    # [H, nope + rope]  (q_lora_rank > 0 or not)
    c, k_r  = kv_a(x)                                         # latent [kv_lora_rank], one shared RoPE key [rope]
    k_n, v  = kv_b(norm(c))                                   # [H, nope], [H, vd]
    k       = [k_n, RoPE(k_r)] per head;  q = [q_nope, RoPE(q_rope)]
    out     = o(softmax(q.k * scale) v)

RoPE rotates only the ``rope = cfg.rotary_dim`` trailing dims of q and the shared ``k_r`` (adjacent pairs when
``cfg.rope_interleaved``, DeepSeek's layout); ``scale`` is ``cfg.query_pre_attn_scalar ** -0.5`` (the loader folds
YaRN's ``mscale_all_dim`` correction into it). ``cfg.head_dim`` is ``nope + rope``, ``cfg.value_head_dim`` is ``vd``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from tailjax.models.attention import attention
from tailjax.models.cache import KVCache
from tailjax.models.config import ModelConfig
from tailjax.models.layers import RMSNorm, linear, rope_frequencies, rotary

Array = jax.Array


def query_pre_attn_scalar(head_dim: int, factor: float | None = None, mscale_all_dim: float | None = None) -> float:
  """``cfg.query_pre_attn_scalar`` of MLA: scores over ``sqrt(head_dim)``, times ``mscale^2`` under YaRN with
  ``mscale_all_dim`` (``mscale = 0.1 mscale_all_dim ln(factor) + 1`` past factor 1), as transformers'
  ``yarn_apply_mscale`` and llama.cpp's ``deepseek2`` (whose ``yarn_log_multiplier`` is ``0.1 mscale_all_dim``)."""
  scale = head_dim**-0.5
  if factor is not None and mscale_all_dim:
    mscale = 0.1 * mscale_all_dim * math.log(factor) + 1.0 if factor > 1 else 1.0
    scale *= mscale * mscale
  return scale**-2


class MultiLatentAttention(nnx.Module):
  """``q`` (or ``q_a``, ``q_a_norm``, ``q_b`` with ``cfg.q_lora_rank``), ``kv_a``, ``kv_a_norm``, ``kv_b``, ``o``:
  kernels ``[in, out]`` as everywhere; biases on ``q_a``, ``kv_a`` (``cfg.qkv_bias``) and ``o`` (``cfg.o_bias``)."""

  def __init__(self, cfg: ModelConfig, layer: int, dtype, param_dtype, rngs: nnx.Rngs):
    del layer
    d, h, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    rope, latent, vd = cfg.rotary_dim, cfg.kv_lora_rank, cfg.value_head_dim
    if cfg.q_lora_rank:
      self.q_a = linear(d, cfg.q_lora_rank, cfg.qkv_bias, ("embed", None), dtype, param_dtype, rngs)
      self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
      self.q_b = linear(cfg.q_lora_rank, h * hd, False, (None, "heads"), dtype, param_dtype, rngs)
    else:
      self.q = linear(d, h * hd, False, ("embed", "heads"), dtype, param_dtype, rngs)
    self.kv_a = linear(d, latent + rope, cfg.qkv_bias, ("embed", None), dtype, param_dtype, rngs)
    self.kv_a_norm = RMSNorm(latent, cfg.rms_norm_eps)
    self.kv_b = linear(latent, h * (hd - rope + vd), False, (None, "heads"), dtype, param_dtype, rngs)
    self.o = linear(h * vd, d, cfg.o_bias, ("heads", "embed"), dtype, param_dtype, rngs)
    self.cfg = cfg

  def __call__(self, x: Array, positions: Array, mask: Array, cache: KVCache | None = None
               ) -> tuple[Array, KVCache | None]:
    """``x: [B, T, d]``, ``mask: [B, T, T]`` (``[B, T, S]`` with a ``cache`` of ``S`` slots: every head's keys and
    values, not the latent) -> (``[B, T, d]``, the cache)."""
    cfg = self.cfg
    b, t, _ = x.shape
    h, hd, rope, vd = cfg.num_heads, cfg.head_dim, cfg.rotary_dim, cfg.value_head_dim
    nope = hd - rope
    q = self.q(x) if hasattr(self, "q") else self.q_b(self.q_a_norm(self.q_a(x)))
    q = q.reshape(b, t, h, hd)
    compressed = self.kv_a(x)  # [B, T, latent + rope]
    kv = self.kv_b(self.kv_a_norm(compressed[..., :cfg.kv_lora_rank])).reshape(b, t, h, nope + vd)
    inv_freq, rope_scale = rope_frequencies(cfg, t if cache is None else cache.k.shape[1])
    rotate = lambda y: rotary(y, positions, inv_freq, rope_scale, cfg.rope_interleaved)
    k_rope = rotate(compressed[:, :, None, cfg.kv_lora_rank:])  # [B, T, 1, rope]: one key for every head
    q = jnp.concatenate([q[..., :nope], rotate(q[..., nope:])], axis=-1)
    k = jnp.concatenate([kv[..., :nope], jnp.broadcast_to(k_rope, (b, t, h, rope))], axis=-1)
    v = kv[..., nope:]
    if cache is not None:
      cache = cache.write(k, v)
      k, v = cache.k, cache.v
    out = attention(q, k, v, mask, scale=cfg.query_pre_attn_scalar**-0.5)
    return self.o(out.reshape(b, t, h * vd)), cache
