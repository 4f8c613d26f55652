"""A Flax NNX decoder that returns hidden states and exposes its unembedding.

tailjax never asks a model for ``[tokens, vocab]`` logits on the hot path: the model
stops at the final norm, and ``tailjax.head`` reads the unembedding blockwise.
Layouts follow Hugging Face's Llama so that checkpoints map one-to-one: a linear
layer's kernel is ``[in, out]`` (the transpose of PyTorch's weight), and rotary
embeddings rotate the two halves of each head (``rotate_half``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tailjax.models.config import ModelConfig

Array = jax.Array


class RMSNorm(nnx.Module):
  """``x / rms(x) * scale``, computed in float32 whatever the activation dtype."""

  def __init__(self, dim: int, eps: float):
    self.scale = nnx.Param(jnp.ones(dim, jnp.float32))
    self.eps = eps

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...]).astype(x.dtype)


def rotary(x: Array, positions: Array, theta: float) -> Array:
  """Rotary position embedding on ``x: [B, T, heads, head_dim]`` at ``positions: [B, T]``."""
  half = x.shape[-1] // 2
  inv_freq = theta**(-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, half]
  cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query causal self-attention; softmax in float32."""

  def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
    d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    linear = lambda i, o, bias: nnx.Linear(i, o, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.q = linear(d, h * hd, cfg.qkv_bias)
    self.k = linear(d, kv * hd, cfg.qkv_bias)
    self.v = linear(d, kv * hd, cfg.qkv_bias)
    self.o = linear(h * hd, d, False)
    self.cfg = cfg

  def __call__(self, x: Array, positions: Array, mask: Array) -> Array:
    cfg = self.cfg
    b, t, _ = x.shape
    groups = cfg.num_heads // cfg.num_kv_heads
    q = rotary(self.q(x).reshape(b, t, cfg.num_heads, cfg.head_dim), positions, cfg.rope_theta)
    k = rotary(self.k(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim), positions, cfg.rope_theta)
    v = self.v(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    q = q.reshape(b, t, cfg.num_kv_heads, groups, cfg.head_dim)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * cfg.head_dim**-0.5
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, t, cfg.num_heads * cfg.head_dim)
    return self.o(out)


class MLP(nnx.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
    linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.gate = linear(cfg.hidden_size, cfg.intermediate_size)
    self.up = linear(cfg.hidden_size, cfg.intermediate_size)
    self.down = linear(cfg.intermediate_size, cfg.hidden_size)

  def __call__(self, x: Array) -> Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.attn = Attention(cfg, dtype, rngs)
    self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.mlp = MLP(cfg, dtype, rngs)

  def __call__(self, x: Array, positions: Array, mask: Array) -> Array:
    x = x + self.attn(self.attn_norm(x), positions, mask)
    return x + self.mlp(self.mlp_norm(x))


class Decoder(nnx.Module):
  """Token ids -> final-norm hidden states; ``unembedding()`` gives the ``[d, V]`` output matrix."""

  def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, dtype, rngs) for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    if not cfg.tie_word_embeddings:
      self.lm_head = nnx.Param(
          nnx.initializers.lecun_normal()(rngs.params(), (cfg.hidden_size, cfg.vocab_size), dtype))

  def __call__(self, tokens: Array, segment_ids: Array | None = None) -> Array:
    """``tokens: [B, T]`` int -> ``[B, T, d]``.

    ``segment_ids: [B, T]`` (optional) keeps packed documents apart and marks padding
    with 0: a token attends to earlier tokens of its own non-zero segment only, and
    positions restart at each segment.
    """
    b, t = tokens.shape
    causal = jnp.tril(jnp.ones((t, t), bool))[None]
    if segment_ids is None:
      mask = jnp.broadcast_to(causal, (b, t, t))
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    else:
      same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] > 0)
      mask = causal & same | jnp.eye(t, dtype=bool)[None]  # every row keeps itself: no all-masked softmax
      starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
      index = jnp.arange(t)[None]
      positions = index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x, positions, mask)
    return self.norm(x)

  def unembedding(self) -> Array:
    """``[d, V]`` output matrix (the transposed embedding when tied)."""
    return self.embed.embedding[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]
