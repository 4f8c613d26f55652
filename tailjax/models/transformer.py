"""A Flax NNX decoder that returns hidden states and exposes its unembedding.

tailjax never asks a model for ``[tokens, vocab]`` logits on the hot path: the model
stops at the final norm, and ``tailjax.head`` reads the unembedding blockwise (with the
model's ``final_logit_softcap``, when it has one: ``Decoder.output_head``).
The layers live in ``layers``, ``attention`` and ``moe``; a block is the family's
arrangement of them, chosen by ``ModelConfig`` (see its docstring).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tailjax.head import EmbeddingRows, OutputHead
from tailjax.models.attention import Attention, Retention
from tailjax.models.config import ModelConfig
from tailjax.models.layers import MLP, RMSNorm, axes
from tailjax.models.moe import MoE

Array = jax.Array


class DecoderOutput(NamedTuple):
  """What one forward pass gives: ``hidden: [B, T, d]`` final-norm states and, per MoE layer in order,
  ``experts: [B, T, k]`` the experts each token was routed to (empty for a dense model)."""

  hidden: Array
  experts: tuple[Array, ...]


class Block(nnx.Module):
  """Pre-norm residual block: ``x + mixer(norm(x))``, then ``x + mlp(norm(x))``.

  With ``sandwich_norms`` (Gemma 2/3) each branch's output is normalised too before it joins
  the residual: ``x + post_norm(mixer(pre_norm(x)))``.
  """

  def __init__(self, cfg: ModelConfig, layer: int, dtype, param_dtype, rngs: nnx.Rngs):
    norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_unit_offset)
    mixer = Retention if cfg.attention == "retention" else Attention
    self.attn_norm = norm()
    self.attn = mixer(cfg, cfg.layer_type(layer), dtype, param_dtype, rngs)
    self.mlp_norm = norm()
    self.mlp = MoE(cfg, dtype, param_dtype, rngs) if cfg.is_moe_layer(layer) else MLP(cfg, dtype, param_dtype, rngs)
    if cfg.sandwich_norms:
      self.attn_post_norm = norm()
      self.mlp_post_norm = norm()
    self.sandwich = cfg.sandwich_norms
    self.layer_type = cfg.layer_type(layer)

  def __call__(self, x: Array, positions: Array, masks: dict[str, Array]) -> tuple[Array, Array | None]:
    """-> (the block's output, ``[B, T, k]`` chosen experts of an MoE block, else None)."""
    h = self.attn(self.attn_norm(x), positions, masks[self.layer_type])
    x = x + (self.attn_post_norm(h) if self.sandwich else h)
    h, experts = self.mlp(self.mlp_norm(x)) if isinstance(self.mlp, MoE) else (self.mlp(self.mlp_norm(x)), None)
    return x + (self.mlp_post_norm(h) if self.sandwich else h), experts


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
    self.blocks = nnx.List([Block(cfg, i, dtype, param_dtype, rngs) for i in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_unit_offset)
    if not cfg.tie_word_embeddings:
      init = nnx.initializers.lecun_normal()
      self.lm_head = nnx.Param(init(rngs.params(), (cfg.hidden_size, cfg.vocab_size), param_dtype),
                               **axes("embed", "vocab"))
    self.dtype = dtype

  def __call__(self, tokens: Array, segment_ids: Array | None = None) -> Array:
    """``tokens: [B, T]`` int -> ``[B, T, d]`` hidden states (``forward(...).hidden``)."""
    return self.forward(tokens, segment_ids).hidden

  def forward(self, tokens: Array, segment_ids: Array | None = None) -> DecoderOutput:
    """``tokens: [B, T]`` int -> ``DecoderOutput``.

    ``segment_ids: [B, T]`` (optional) keeps packed documents apart and marks padding
    with 0: a token attends to earlier tokens of its own non-zero segment only, and
    positions restart at each segment.
    """
    b, t = tokens.shape
    index = jnp.arange(t)
    causal = index[:, None] >= index[None, :]
    if segment_ids is None:
      visible = jnp.ones((b, t, t), bool)
      positions = jnp.broadcast_to(index, (b, t))
    else:
      visible = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] > 0)
      starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
      positions = index[None] - jax.lax.cummax(jnp.where(starts, index[None], 0), axis=1)
    eye = jnp.eye(t, dtype=bool)[None]  # every row keeps itself: no all-masked softmax
    masks = {"full": causal[None] & visible | eye}
    if self.cfg.sliding_window is not None:
      near = index[:, None] - index[None, :] < self.cfg.sliding_window
      masks["sliding"] = (causal & near)[None] & visible | eye
    x = self.embed(tokens)
    if self.cfg.scale_embeddings:  # Gemma: sqrt(d), rounded to the compute dtype as Hugging Face does
      x = x * jnp.asarray(self.cfg.hidden_size**0.5, self.dtype).astype(x.dtype)
    routed = []
    for block in self.blocks:
      x, experts = block(x, positions, masks)
      if experts is not None:
        routed.append(experts)
    return DecoderOutput(self.norm(x), tuple(routed))

  def unembedding(self) -> Array:
    """``[d, V]`` output matrix (the transposed embedding when tied)."""
    return self.embed.embedding[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]

  def output_head(self) -> OutputHead:
    """The unembedding with the model's final-logit soft-cap: what ``tailjax.head`` functions take; a tied
    embedding as its rows (``EmbeddingRows``), so no transposed copy of it is ever made."""
    tied = self.cfg.tie_word_embeddings
    matrix = EmbeddingRows(self.embed.embedding[...]) if tied else self.lm_head[...]
    return OutputHead(matrix, self.cfg.final_logit_softcap)
