"""Decoders of one layout run layer by layer together: where a candidate's residual stream leaves the reference's.

A quantized candidate has the reference's architecture, so its residual stream after layer ``l`` can be compared
with the reference's, token by token: which layer breaks. ``forward_together`` runs the reference and such
candidates through each ``Stack`` in one ``jax.lax.scan`` (their blocks side by side in the scan body), so no
model's per-layer states are ever stored: per layer and token only two numbers per candidate leave the scan,

    rel_error    = ||h_cand - h_ref|| / ||h_ref||
    cos_distance = 1 - cos(h_cand, h_ref) = ||h_cand/||h_cand|| - h_ref/||h_ref||||^2 / 2

(the second form keeps its precision near 0, where float32 ``1 - cos`` would round to nothing), computed in
float32 over the hidden dimension. Each model's ``DecoderOutput`` equals its own ``Decoder.forward``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tailjax.models.config import ModelConfig
from tailjax.models.transformer import Decoder, DecoderOutput, ScanRows, stack_layout

Array = jax.Array


class LayerDivergence(NamedTuple):
  """Per candidate, layer (in order) and token: ``rel_error, cos_distance: [C, L, B, T]`` of the residual stream
  after that layer against the reference's."""

  rel_error: Array
  cos_distance: Array


def same_layout(a: ModelConfig, b: ModelConfig) -> bool:
  """Whether two models' layers line up one to one (same stacks, same width): a candidate rounded from the
  reference, or another quantization of the same checkpoint."""
  return stack_layout(a) == stack_layout(b) and a.hidden_size == b.hidden_size and a.num_layers == b.num_layers


def divergence(ref: Array, cand: Array) -> tuple[Array, Array]:
  """``ref, cand: [..., d]`` -> ``rel_error, cos_distance: [...]`` (module docstring), float32."""
  r, c = ref.astype(jnp.float32), cand.astype(jnp.float32)
  norm_r = jnp.sqrt(jnp.sum(r * r, axis=-1))
  norm_c = jnp.sqrt(jnp.sum(c * c, axis=-1))
  tiny = jnp.finfo(jnp.float32).tiny
  rel = jnp.sqrt(jnp.sum((c - r)**2, axis=-1)) / jnp.maximum(norm_r, tiny)
  unit = c / jnp.maximum(norm_c, tiny)[..., None] - r / jnp.maximum(norm_r, tiny)[..., None]
  return rel, 0.5 * jnp.sum(unit * unit, axis=-1)


def forward_together(models: Sequence[Decoder], tokens: Array) -> tuple[list[DecoderOutput], LayerDivergence]:
  """``models``: the reference then candidates of its layout (``same_layout``); ``tokens: [B, T]`` ->
  (each model's ``DecoderOutput``, ``LayerDivergence`` of each candidate against the reference)."""
  for model in models[1:]:
    if not same_layout(models[0].cfg, model.cfg):
      raise ValueError("forward_together needs models whose layers line up (same layout and width)")
  inputs = [m.stream_inputs(tokens) for m in models]
  xs, shared = [i.x for i in inputs], [i.shared for i in inputs]
  routed: list[list[Array]] = [[] for _ in models]
  rel, dist = [], []  # per stack: [repeats, period, C, B, T]
  for s, stack in enumerate(models[0].layers):
    period, repeats = stack.span.period, stack.span.repeats
    splits = [ScanRows.of(m.layers[s].blocks) for m in models]
    per_layer = [m.layers[s].row_inputs(i.per_layer) for m, i in zip(models, inputs)]

    def run(carry, row_inputs, splits=splits, period=period):
      (xs, shared), (rows, per_layer) = carry, row_inputs
      blocks = [split.blocks(row) for split, row in zip(splits, rows)]
      xs, shared, chosen, rel, dist = list(xs), list(shared), [[] for _ in xs], [], []
      for j in range(period):
        for i, (block, inp) in enumerate(zip(blocks, inputs)):
          out = block[j](xs[i], inp.positions, inp.masks, None if per_layer[i] is None else per_layer[i][j],
                         shared[i])
          xs[i], shared[i] = out.x, out.shared
          if out.experts is not None:
            chosen[i].append(out.experts)
        r, d = zip(*(divergence(xs[0], x) for x in xs[1:]))
        rel.append(jnp.stack(r))
        dist.append(jnp.stack(d))
      return (tuple(xs), tuple(shared)), (tuple(map(tuple, chosen)), jnp.stack(rel), jnp.stack(dist))

    (xs, shared), (chosen, r, d) = jax.lax.scan(run, (tuple(xs), tuple(s or {} for s in shared)),
                                                (tuple(split.rows for split in splits), per_layer))
    for i, experts in enumerate(chosen):  # [repeats, B, T, k] per MoE block -> layer order
      routed[i].extend(e[row] for row in range(repeats) for e in experts)
    rel.append(r)
    dist.append(d)
  # [repeats, period, C, B, T] per stack -> [C, L, B, T] in layer order
  layers = lambda parts: jnp.concatenate([p.reshape(-1, *p.shape[2:]) for p in parts]).transpose(1, 0, 2, 3)
  outputs = [DecoderOutput(m.norm(x), tuple(r)) for m, x, r in zip(models, xs, routed)]
  return outputs, LayerDivergence(layers(rel), layers(dist))
