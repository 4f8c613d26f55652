"""A Flax NNX decoder that returns hidden states and exposes its unembedding.

tailjax never asks a model for ``[tokens, vocab]`` logits on the hot path: the model
stops at the final norm, and ``tailjax.head`` reads the unembedding blockwise (with the
model's ``final_logit_softcap``, when it has one: ``Decoder.output_head``).
The layers live in ``layers``, ``attention`` and ``moe``; a block is the family's
arrangement of them, chosen by ``ModelConfig`` (see its docstring).

Blocks are stacked, as in Flax's scan-over-layers example: a model's layers repeat with some
period ``p`` (1 for Llama or Qwen3; 6 for Gemma 3's five sliding layers and one global; 1 after
GLM-4.5's dense first layers, which stand apart), so ``Decoder.layers`` holds a ``Stack`` of ``p``
blocks whose parameters carry a leading ``[repeats]`` axis, applied by one ``jax.lax.scan``, with
``Stack``s of their own for a prefix and for the layers left over. XLA compiles one period, not the
depth: an 80-layer model traces and compiles as fast as a 1-layer one. ``stack_layout`` and ``slot`` say where layer
``i`` lives (loaders and checkpoint conversion use them).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tailjax.head import EmbeddingRows, OutputHead
from tailjax.models.attention import Attention, Retention
from tailjax.models.cache import DecodeCache, LayerCache, layer_cache, slot_inputs
from tailjax.models.config import ModelConfig
from tailjax.models.deltanet import GatedDeltaNet, runs
from tailjax.models.gemma4 import Gemma4Block, PerLayerInputs, SharedKV, initial_shared_kv
from tailjax.models.layers import MLP, BlockOutput, RMSNorm, axes
from tailjax.models.mla import MultiLatentAttention
from tailjax.models.moe import MoE

Array = jax.Array


class DecoderOutput(NamedTuple):
  """What one forward pass gives: ``hidden: [B, T, d]`` final-norm states and, per MoE layer in order,
  ``experts: [B, T, k]`` the experts each token was routed to (empty for a dense model)."""

  hidden: Array
  experts: tuple[Array, ...]


class StreamInputs(NamedTuple):
  """The residual stream as the first layer gets it: ``x: [B, T, d]`` embedded tokens, ``positions: [B, T]``,
  ``masks`` per layer type, ``per_layer: [B, T, L, p]`` inputs (Gemma 4, else None), ``shared`` keys and values."""

  x: Array
  positions: Array
  masks: dict[str, Array]
  per_layer: Array | None
  shared: SharedKV


class StackOutput(NamedTuple):
  """A ``Stack``'s ``x: [B, T, d]`` output; per MoE layer in layer order ``[B, T, k]`` chosen experts; ``shared``
  keys and values (Gemma 4); ``caches`` per block of the period, ``[repeats]``-stacked (None outside decoding)."""

  x: Array
  experts: tuple[Array, ...]
  shared: SharedKV
  caches: tuple[LayerCache, ...]


class DecodeStep(NamedTuple):
  """``Decoder.decode``'s result: ``hidden: [B, T, d]`` final-norm states of the new tokens; ``cache`` updated."""

  hidden: Array
  cache: DecodeCache


class Block(nnx.Module):
  """Pre-norm residual block: ``x + mixer(norm(x))``, then ``x + mlp(norm(x))``.

  With ``sandwich_norms`` (Gemma 2/3) each branch's output is normalised too before it joins
  the residual: ``x + post_norm(mixer(pre_norm(x)))``.
  """

  def __init__(self, cfg: ModelConfig, layer: int, dtype, param_dtype, rngs: nnx.Rngs):
    norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_unit_offset)
    mixers = {"retention": Retention, "mla": MultiLatentAttention, "softmax": Attention}
    mixer = GatedDeltaNet if cfg.layer_type(layer) == "linear" else mixers[cfg.attention]
    self.attn_norm = norm()
    self.attn = mixer(cfg, layer, dtype, param_dtype, rngs)
    self.mlp_norm = norm()
    self.mlp = MoE(cfg, dtype, param_dtype, rngs) if cfg.is_moe_layer(layer) else MLP(cfg, dtype, param_dtype, rngs)
    if cfg.sandwich_norms:
      self.attn_post_norm = norm()
      self.mlp_post_norm = norm()
    self.sandwich = cfg.sandwich_norms
    self.layer_type = cfg.layer_type(layer)

  def __call__(self, x: Array, positions: Array, masks: dict[str, Array], per_layer: Array | None,
               shared: SharedKV, cache: LayerCache = None) -> BlockOutput:
    """``masks``: per layer type what its mixer may see (``Decoder.forward``; ``Decoder.decode``, with the mixer's
    ``cache``) -> ``BlockOutput`` (``shared`` as it came: per-layer inputs and shared keys and values are Gemma 4's,
    ``tailjax.models.gemma4``)."""
    del per_layer
    h, cache = self.attn(self.attn_norm(x), positions, masks[self.layer_type], cache)
    x = x + (self.attn_post_norm(h) if self.sandwich else h)
    h, experts = self.mlp(self.mlp_norm(x)) if isinstance(self.mlp, MoE) else (self.mlp(self.mlp_norm(x)), None)
    return BlockOutput(x + (self.mlp_post_norm(h) if self.sandwich else h), experts, shared, cache)


class StackSpan(NamedTuple):
  """Layers ``first + r * period + j`` for ``r < repeats``, ``j < period``: one ``Stack``."""

  first: int
  period: int
  repeats: int


class LayerSlot(NamedTuple):
  """Where one layer's parameters are: ``Decoder.layers[stack].blocks[position]``, row ``row`` of the leading axis."""

  stack: int
  row: int
  position: int


@functools.lru_cache(maxsize=64)
def stack_layout(cfg: ModelConfig) -> tuple[StackSpan, ...]:
  """Layers grouped so that as few distinct blocks as possible are compiled: an optional prefix of ``q``
  layers kept apart (GLM-4.5's dense first layers), then the shortest period ``p`` such that layer ``i``
  is built like layer ``q + (i - q) mod p`` (same mixer window and RoPE, dense or MoE) repeated, then the
  layers left over (a prefix of the period). ``q`` minimises ``q + p + leftover``, the smallest on ties."""
  depth = cfg.num_layers
  kind = [(cfg.layer_type(i), cfg.is_moe_layer(i), cfg.kv_shared(i), cfg.uses_rope(i)) for i in range(depth)]

  def period(q: int) -> int:
    rest = kind[q:]
    return next(p for p in range(1, len(rest) + 1) if all(rest[i] == rest[i % p] for i in range(len(rest))))

  periods = [period(q) for q in range(depth)]
  q = min(range(depth), key=lambda q: (q + periods[q] + (depth - q) % periods[q], q))
  p = periods[q]
  spans = [StackSpan(0, q, 1)] if q else []
  spans.append(StackSpan(q, p, (depth - q) // p))
  if (depth - q) % p:
    spans.append(StackSpan(depth - (depth - q) % p, (depth - q) % p, 1))
  return tuple(spans)


def slot(cfg: ModelConfig, layer: int) -> LayerSlot:
  """Where layer ``layer`` lives in ``stack_layout(cfg)``."""
  for stack, span in enumerate(stack_layout(cfg)):
    if layer < span.first + span.period * span.repeats:
      row, position = divmod(layer - span.first, span.period)
      return LayerSlot(stack, row, position)
  raise IndexError(f"layer {layer} of a {cfg.num_layers}-layer model")


class ScanRows(NamedTuple):
  """A stack's blocks split for ``jax.lax.scan`` over their rows. XLA:CPU computes every half-precision op in
  float32, the scan's row slicing included, so a stacked bfloat16 parameter would be converted whole before
  the loop: a float32 copy of the model beside it. On a CPU the rows travel as their 16-bit integers instead
  (sliced as they are) and ``blocks`` restores one row's dtypes inside the loop."""

  graph: nnx.GraphDef
  rows: nnx.State  # every parameter with its leading [repeats] axis; half precision as uint16 on a CPU
  dtypes: nnx.State  # every parameter's own dtype

  @classmethod
  def of(cls, blocks: nnx.Module) -> ScanRows:
    graph, rows = nnx.split(blocks)
    dtypes = jax.tree.map(lambda a: a.dtype, rows)
    on_cpu = jax.default_backend() == "cpu"
    bits = lambda a: jax.lax.bitcast_convert_type(a, jnp.uint16) if on_cpu and a.dtype in HALF else a
    return cls(graph, jax.tree.map(bits, rows), dtypes)

  def blocks(self, row: nnx.State) -> nnx.Module:
    """One row of ``rows`` (inside the scan) -> that row's blocks."""
    restore = lambda a, dtype: a if a.dtype == dtype else jax.lax.bitcast_convert_type(a, dtype)
    return nnx.merge(self.graph, jax.tree.map(restore, row, self.dtypes))


HALF = (jnp.bfloat16, jnp.float16)


class Stack(nnx.Module):
  """``span.repeats`` x ``span.period`` blocks: ``blocks[j]`` holds layers ``first + r * period + j`` as row ``r``
  of every parameter (logical axis None: each device keeps all rows of its shards). One ``jax.lax.scan``
  over the rows runs the period's blocks in order, carrying the residual stream and the shared keys and values
  (Gemma 4; empty for every other family)."""

  def __init__(self, cfg: ModelConfig, span: StackSpan, dtype, param_dtype, rngs: nnx.Rngs):
    block = Gemma4Block if cfg.block == "gemma4" else Block

    @nnx.split_rngs(splits=span.repeats)
    @nnx.vmap(in_axes=0, out_axes=0, axis_size=span.repeats, transform_metadata={nnx.PARTITION_NAME: None})
    def build(rngs):
      return nnx.List([block(cfg, span.first + j, dtype, param_dtype, rngs) for j in range(span.period)])

    self.blocks = build(rngs)
    self.span = span

  def __call__(self, x: Array, positions: Array, masks: dict[str, Array], per_layer: Array | None = None,
               shared: SharedKV | None = None, caches: tuple[LayerCache, ...] | None = None) -> StackOutput:
    """``per_layer: [B, T, L, p]`` every layer's inputs (Gemma 4) or None; ``caches`` per block of the period, with a
    leading ``[repeats]`` axis (decoding: ``Decoder.decode``) -> ``StackOutput``."""
    split = ScanRows.of(self.blocks)
    repeats = self.span.repeats
    per_layer = self.row_inputs(per_layer)
    caches = (None,) * self.span.period if caches is None else caches

    def run(carry, inputs):
      (x, shared), (row, inputs, caches) = carry, inputs
      routed, updated = [], []
      for j, block in enumerate(split.blocks(row)):
        out = block(x, positions, masks, None if inputs is None else inputs[j], shared, caches[j])
        x, shared = out.x, out.shared
        updated.append(out.cache)
        if out.experts is not None:
          routed.append(out.experts)
      return (x, shared), (tuple(routed), tuple(updated))

    # routed: [repeats, B, T, k]
    (x, shared), (routed, caches) = jax.lax.scan(run, (x, shared or {}), (split.rows, per_layer, caches))
    return StackOutput(x, tuple(experts[r] for r in range(repeats) for experts in routed), shared, caches)

  def row_inputs(self, per_layer: Array | None) -> Array | None:
    """Every layer's per-layer inputs ``[B, T, L, p]`` (Gemma 4) -> this stack's ``[repeats, period, B, T, p]``:
    row r's inputs beside its parameters (None stays None)."""
    if per_layer is None:
      return None
    first, period, repeats = self.span
    b, t, _, p = per_layer.shape
    per_layer = per_layer[:, :, first:first + period * repeats].reshape(b, t, repeats, period, p)
    return per_layer.transpose(2, 3, 0, 1, 4)


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
    if cfg.per_layer_input_size:
      self.per_layer_inputs = PerLayerInputs(cfg, dtype, param_dtype, rngs)
    self.layers = nnx.List([Stack(cfg, span, dtype, param_dtype, rngs) for span in stack_layout(cfg)])
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
    x, positions, masks, per_layer, shared = self.stream_inputs(tokens, segment_ids)
    routed = []
    for stack in self.layers:
      x, experts, shared, _ = stack(x, positions, masks, per_layer, shared)
      routed.extend(experts)
    return DecoderOutput(self.norm(x), tuple(routed))

  def init_cache(self, start: Array, length: int) -> DecodeCache:
    """An empty cache of ``length`` slots for rows whose prompts start at slots ``start: [B]`` (left padding before
    them; ``tailjax.models.cache``)."""
    batch = start.shape[0]

    def stacked(layer: int, repeats: int) -> LayerCache:
      return jax.tree.map(lambda z: jnp.zeros((repeats, *z.shape), z.dtype),
                          layer_cache(self.cfg, layer, batch, length, self.dtype))

    layers = tuple(tuple(stacked(span.first + j, span.repeats) for j in range(span.period))
                   for span in stack_layout(self.cfg))
    return DecodeCache(layers, jnp.asarray(start, jnp.int32), jnp.zeros((), jnp.int32))

  def decode(self, tokens: Array, cache: DecodeCache) -> DecodeStep:
    """``tokens: [B, T]`` written at the cache's next ``T`` slots (a left-padded prompt, then one token a step) ->
    ``DecodeStep``: their hidden states equal a ``forward`` of every slot so far at the same slots."""
    b, t = tokens.shape
    positions, masks = slot_inputs(self.cfg, cache.start, cache.index, t, cache.length)
    x, per_layer = self.embedded(tokens)
    shared = initial_shared_kv(self.cfg, b, cache.length, x.dtype)
    layers = []
    for stack, caches in zip(self.layers, cache.layers, strict=True):
      x, _, shared, caches = stack(x, positions, masks, per_layer, shared, caches)
      layers.append(caches)
    return DecodeStep(self.norm(x), DecodeCache(tuple(layers), cache.start, cache.index + t))

  def stream_inputs(self, tokens: Array, segment_ids: Array | None = None) -> StreamInputs:
    """What the first layer gets (``forward``'s arguments as there): the embedded tokens and every layer's
    positions, masks, per-layer inputs and shared keys and values."""
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
    # softmax layers: [B, T, T] visible keys; linear layers: [B, T] document runs (a state per document)
    masks = {"full": causal[None] & visible | eye, "linear": runs(segment_ids, (b, t))}
    if self.cfg.sliding_window is not None:
      near = index[:, None] - index[None, :] < self.cfg.sliding_window
      masks["sliding"] = (causal & near)[None] & visible | eye
    if self.cfg.attention_chunk_size:  # Llama 4: aligned chunks of the document's positions
      chunk = positions // self.cfg.attention_chunk_size  # [B, T]
      masks["chunked"] = causal[None] & visible & (chunk[:, :, None] == chunk[:, None, :]) | eye
    x, per_layer = self.embedded(tokens)
    return StreamInputs(x, positions, masks, per_layer, initial_shared_kv(self.cfg, b, t, x.dtype))

  def embedded(self, tokens: Array) -> tuple[Array, Array | None]:
    """``tokens: [B, T]`` -> (``[B, T, d]`` embeddings as the first layer reads them, ``[B, T, L, p]`` per-layer
    inputs of Gemma 4 or None)."""
    x = self.embed(tokens)
    if self.cfg.scale_embeddings:  # Gemma: sqrt(d), rounded to the compute dtype as Hugging Face does
      x = x * jnp.asarray(self.cfg.hidden_size**0.5, self.dtype).astype(x.dtype)
    return x, self.per_layer_inputs(tokens, x) if self.cfg.per_layer_input_size else None

  def block(self, layer: int) -> Block:
    """Layer ``layer`` alone, as an ordinary ``Block`` holding a copy of its row of the stacked parameters
    (to inspect or test one layer; changing it changes nothing in the model)."""
    where = slot(self.cfg, layer)
    graph, rows = nnx.split(self.layers[where.stack].blocks[where.position])
    return nnx.merge(graph, jax.tree.map(lambda x: x[where.row], rows))

  def unembedding(self) -> Array:
    """``[d, V]`` output matrix (the transposed embedding when tied)."""
    return self.embed.embedding[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]

  def output_head(self) -> OutputHead:
    """The unembedding with the model's final-logit soft-cap: what ``tailjax.head`` functions take; a tied
    embedding as its rows (``EmbeddingRows``), so no transposed copy of it is ever made."""
    tied = self.cfg.tie_word_embeddings
    matrix = EmbeddingRows(self.embed.embedding[...]) if tied else self.lm_head[...]
    return OutputHead(matrix, self.cfg.final_logit_softcap)
