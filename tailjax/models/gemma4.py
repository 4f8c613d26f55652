"""Gemma 4's decoder block (``ModelConfig.block == "gemma4"``): what its layers do that no other family's do.

Per layer ``i``, with ``x: [B, T, d]`` the residual stream (transformers' ``Gemma4TextDecoderLayer``)::

    x = x + post_attn_norm(attention(attn_norm(x)))
    h = mlp(mlp_norm(x))                                        # a dense GeGLU
    h = post_mlp_norm_1(h) + post_moe_norm(moe(moe_norm(x), router sees x))     # MoE layers only
    x = x + post_mlp_norm(h)
    x = x + per_layer_norm(per_layer_projection(gelu(per_layer_gate(x)) * e_i))  # per-layer inputs only
    x = x * layer_scalar

Norms scale by their stored weight (not ``1 + w`` as in Gemma 2/3). Attention: q and k RMS-normalised per head
and values RMS-normalised without a weight, scores unscaled (``query_pre_attn_scalar = 1``). ``"full"`` layers
may be wider (``full_head_dim``, ``full_num_kv_heads``), rotate a share of their angles (``proportional``
RoPE), and take their values from the key projection (``full_values_from_keys``: no ``v`` projection). The last
``num_kv_shared_layers`` layers have no key or value projections: they attend to the keys and values of the
last earlier layer of their type, carried through the layer scan as ``SharedKV``.

Per-layer inputs (``per_layer_input_size = p``; Gemma 4 E2B / E4B): each token gets, for every layer, a
``p``-vector ``e_i = (norm(x0 @ W / sqrt(d))_i + E[token]_i * sqrt(p)) / sqrt(2)`` from a second embedding table
``E: [V', L * p]`` and a projection ``W: [d, L * p]`` of the scaled token embedding ``x0`` (``PerLayerInputs``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from tailjax.models.attention import attention
from tailjax.models.cache import KVCache
from tailjax.models.config import ModelConfig
from tailjax.models.layers import MLP, BlockOutput, RMSNorm, axes, gated, linear, rms_normalize, rope_frequencies, \
    rotary
from tailjax.models.moe import MoE

Array = jax.Array
SharedKV = dict[str, tuple[Array, Array]]  # layer type -> ([B, T, kv, hd] keys after RoPE, values after their norm)


def initial_shared_kv(cfg: ModelConfig, batch: int, length: int, dtype) -> SharedKV:
  """Zeros for every layer type the shared layers read (none when the model shares nothing): the scan's carry
  needs its shapes before the first layer writes it."""
  if not cfg.num_kv_shared_layers:
    return {}
  out = {}
  for kind in sorted({cfg.layer_type(i) for i in range(cfg.num_layers)}):
    hd, kv = cfg.attention_dims(kind)
    out[kind] = (jnp.zeros((batch, length, kv, hd), dtype), jnp.zeros((batch, length, kv, hd), dtype))
  return out


class Gemma4Attention(nnx.Module):
  """Softmax attention of Gemma 4 (see the module docstring): ``q, o`` always; ``k`` and ``k_norm`` unless the
  layer shares keys and values; ``v`` unless it shares them or is a full layer with values from the keys."""

  def __init__(self, cfg: ModelConfig, layer: int, dtype, param_dtype, rngs: nnx.Rngs):
    self.layer_type = cfg.layer_type(layer)
    d, h = cfg.hidden_size, cfg.num_heads
    hd, kv = cfg.attention_dims(self.layer_type)
    self.q = linear(d, h * hd, cfg.qkv_bias, ("embed", "heads"), dtype, param_dtype, rngs)
    self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
    self.shared = cfg.kv_shared(layer)
    if not self.shared:
      self.k = linear(d, kv * hd, cfg.qkv_bias, ("embed", "kv_heads"), dtype, param_dtype, rngs)
      self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
      if not (cfg.full_values_from_keys and self.layer_type == "full"):
        self.v = linear(d, kv * hd, cfg.qkv_bias, ("embed", "kv_heads"), dtype, param_dtype, rngs)
    self.o = linear(h * hd, d, cfg.o_bias, ("heads", "embed"), dtype, param_dtype, rngs)
    self.cfg = cfg

  def __call__(self, x: Array, positions: Array, mask: Array, shared: SharedKV, cache: KVCache | None = None
               ) -> tuple[Array, SharedKV, KVCache | None]:
    """``x: [B, T, d]`` -> (``[B, T, d]``, ``shared`` with this layer's keys and values when others reuse them, the
    ``cache``). Decoding (``tailjax.models.cache``), ``mask`` is ``[B, T, S]``, the cache's keys and values are what
    is shared, and a sharing layer has no cache of its own."""
    cfg = self.cfg
    b, t, _ = x.shape
    hd, kv = cfg.attention_dims(self.layer_type)
    length = mask.shape[-1]  # T, or the cache's slots
    inv_freq, rope_scale = rope_frequencies(cfg, length, self.layer_type)
    q = rotary(self.q_norm(self.q(x).reshape(b, t, cfg.num_heads, hd)), positions, inv_freq, rope_scale)
    if self.shared:
      k, v = shared[self.layer_type]
    else:
      k = self.k(x).reshape(b, t, kv, hd)
      v = self.v(x).reshape(b, t, kv, hd) if hasattr(self, "v") else k
      k = rotary(self.k_norm(k), positions, inv_freq, rope_scale)
      v = rms_normalize(v, cfg.rms_norm_eps)
      if cache is not None:
        cache = cache.write(k, v)
        k, v = cache.k, cache.v
      if self.layer_type in shared:  # the last layer of this type before the shared ones is what they read
        shared = {**shared, self.layer_type: (k.astype(shared[self.layer_type][0].dtype),
                                              v.astype(shared[self.layer_type][1].dtype))}
    window = cfg.sliding_window if self.layer_type == "sliding" else None
    out = attention(q, k, v, mask, window, scale=1.0)
    return self.o(out.reshape(b, t, cfg.num_heads * hd)), shared, cache


class Gemma4Block(nnx.Module):
  """One Gemma 4 layer (the module docstring gives its arithmetic). ``moe`` and its three norms exist in MoE
  layers, ``per_layer_*`` when the model has per-layer inputs."""

  def __init__(self, cfg: ModelConfig, layer: int, dtype, param_dtype, rngs: nnx.Rngs):
    norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.attn_norm, self.attn_post_norm, self.mlp_norm, self.mlp_post_norm = norm(), norm(), norm(), norm()
    self.attn = Gemma4Attention(cfg, layer, dtype, param_dtype, rngs)
    wide = cfg.shared_kv_mlp_factor if cfg.kv_shared(layer) else 1
    self.mlp = MLP(cfg, dtype, param_dtype, rngs, width=cfg.intermediate_size * wide)
    if cfg.is_moe_layer(layer):
      self.moe = MoE(cfg, dtype, param_dtype, rngs)
      self.moe_norm, self.mlp_post_norm_1, self.moe_post_norm = norm(), norm(), norm()
    if cfg.per_layer_input_size:
      p = cfg.per_layer_input_size
      self.per_layer_gate = linear(cfg.hidden_size, p, False, ("embed", None), dtype, param_dtype, rngs)
      self.per_layer_projection = linear(p, cfg.hidden_size, False, (None, "embed"), dtype, param_dtype, rngs)
      self.per_layer_norm = norm()
    self.layer_scalar = nnx.Param(jnp.ones(1, jnp.float32), **axes(None))
    self.layer_type = cfg.layer_type(layer)
    self.cfg = cfg

  def __call__(self, x: Array, positions: Array, masks: dict[str, Array], per_layer: Array | None,
               shared: SharedKV, cache: KVCache | None = None) -> BlockOutput:
    """``per_layer: [B, T, p]`` this layer's inputs (or None) -> ``BlockOutput``."""
    h, shared, cache = self.attn(self.attn_norm(x), positions, masks[self.layer_type], shared, cache)
    x = x + self.attn_post_norm(h)
    h, experts = self.mlp(self.mlp_norm(x)), None
    if hasattr(self, "moe"):
      routed, experts = self.moe(self.moe_norm(x), router_input=x)
      h = self.mlp_post_norm_1(h) + self.moe_post_norm(routed)
    x = x + self.mlp_post_norm(h)
    if per_layer is not None:
      h = gated(self.cfg, self.per_layer_gate(x), per_layer.astype(x.dtype))
      x = x + self.per_layer_norm(self.per_layer_projection(h))
    return BlockOutput(x * self.layer_scalar[...].astype(x.dtype), experts, shared, cache)


class PerLayerInputs(nnx.Module):
  """``(tokens: [B, T], x0: [B, T, d] scaled token embeddings)`` -> ``[B, T, L, p]`` every layer's input
  (the module docstring). ``embedding: [V', L * p]``, ``projection: [d, L * p]``, ``norm`` over ``p``."""

  def __init__(self, cfg: ModelConfig, dtype, param_dtype, rngs: nnx.Rngs):
    width = cfg.num_layers * cfg.per_layer_input_size
    self.embedding = nnx.Embed(cfg.per_layer_vocab_size, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                               embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", None),
                                                                      eager_sharding=False))
    self.projection = linear(cfg.hidden_size, width, False, ("embed", None), dtype, param_dtype, rngs)
    self.norm = RMSNorm(cfg.per_layer_input_size, cfg.rms_norm_eps)
    self.cfg = cfg
    self.dtype = dtype

  def __call__(self, tokens: Array, x0: Array) -> Array:
    cfg = self.cfg
    shape = (*tokens.shape, cfg.num_layers, cfg.per_layer_input_size)
    embed_scale = jnp.asarray(math.sqrt(cfg.per_layer_input_size), self.dtype)  # rounded, as transformers does
    token_part = (self.embedding(tokens) * embed_scale).reshape(shape)
    context = self.norm((self.projection(x0) * cfg.hidden_size**-0.5).reshape(shape))
    return (context + token_part) * 2**-0.5
