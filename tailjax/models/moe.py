"""Sparse mixture-of-experts MLP: a softmax top-k router and grouped expert matmuls.

Routing (Qwen3-MoE, Mixtral, gpt-oss; GLM's, Gemma 4's and Llama 4's variants below): ``p = softmax(x @ router + b)`` over ``E`` experts in float32; each
token goes to its ``k`` most probable experts (ties: the lower id, as ``lax.top_k``), with
weights ``p_i`` or, with ``norm_topk_prob``, ``p_i / sum_topk p`` (Mixtral always renormalises:
``softmax`` over the chosen logits is the same thing). The output is
``sum_i w_i * down_i(glu(gate_i(x), up_i(x)))`` (``layers.gated``; gpt-oss adds a bias to each of the
three projections), exactly these ``k`` experts per token.

Grouping (``expert_outputs``): the ``N * k`` (token, expert) assignments are sorted by expert.
On a CPU they are laid out in tiles of ``TILE`` rows, each tile holding one expert's rows (an
expert's last tile is padded), and a scan over the tiles runs the tile's expert on it: the work
is that of the active parameters plus at most one padded tile per expert, never every expert on
every token. On accelerators the sorted rows go through ``lax.ragged_dot`` (grouped matmuls),
which on this CPU measured 8x slower than one dense matmul of the same rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tailjax.models.config import ModelConfig
from tailjax.models.layers import MLP, axes, gated, rms_normalize

Array = jax.Array

TILE = 128


class Routing(NamedTuple):
  """Which experts each of ``N`` tokens goes to: ``experts, weights: [N, k]``; ``probs: [N, E]`` float32."""

  experts: Array
  weights: Array
  probs: Array


class ExpertWeights(NamedTuple):
  """Every expert's kernels, ``[in, out]`` stacked on a leading ``E`` axis: ``gate, up: [E, d, I]``,
  ``down: [E, I, d]``; their biases ``gate_bias, up_bias: [E, I]``, ``down_bias: [E, d]`` or None."""

  gate: Array
  up: Array
  down: Array
  gate_bias: Array | None = None
  up_bias: Array | None = None
  down_bias: Array | None = None


def route(x: Array, router: Array, k: int, norm_topk_prob: bool, bias: Array | None = None) -> Routing:
  """``x: [N, d]``, ``router: [d, E]`` (and ``bias: [E]``) -> ``Routing`` (weights in float32): softmax top-k."""
  logits = jnp.dot(x, router.astype(x.dtype))
  if bias is not None:
    logits = logits + bias.astype(logits.dtype)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, k)
  if norm_topk_prob:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return Routing(experts.astype(jnp.int32), weights, probs)


def route_sigmoid_groups(x: Array, router: Array, correction: Array, cfg: ModelConfig) -> Routing:
  """GLM-4.5 (DeepSeek-V3's router): ``s = sigmoid(x @ router)`` in float32; experts are split into
  ``G`` groups, a group scored by the sum of its two best ``s + correction``, a token keeps its best
  ``g`` groups and takes the ``k`` best ``s + correction`` among their experts; the weights are those
  experts' ``s`` (renormalised with ``norm_topk_prob``), times ``routed_scaling_factor``."""
  scores = jax.nn.sigmoid(jnp.dot(x.astype(jnp.float32), router.astype(jnp.float32)))  # [N, E]
  n, e = scores.shape
  groups, chosen = cfg.router_groups
  choice = scores + correction.astype(jnp.float32)
  group_scores = jnp.sum(jax.lax.top_k(choice.reshape(n, groups, e // groups), 2)[0], axis=-1)  # [N, G]
  _, best = jax.lax.top_k(group_scores, chosen)
  keep = jnp.zeros((n, groups), bool).at[jnp.arange(n)[:, None], best].set(True)
  choice = jnp.where(jnp.repeat(keep, e // groups, axis=1), choice, -jnp.inf)
  _, experts = jax.lax.top_k(choice, cfg.num_experts_per_tok)
  weights = jnp.take_along_axis(scores, experts, axis=1)
  if cfg.norm_topk_prob:
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
  return Routing(experts.astype(jnp.int32), weights * cfg.routed_scaling_factor, scores)


def route_scaled_softmax(x: Array, router: Array, scale: Array, per_expert_scale: Array, cfg: ModelConfig) -> Routing:
  """Gemma 4: the softmax top-k of ``(rms_normalize(x) * scale / sqrt(d)) @ router``, its weights renormalised to
  sum to 1, then each times its expert's ``per_expert_scale``. ``x: [N, d]``, ``scale: [d]``, ``per_expert_scale:
  [E]``."""
  h = rms_normalize(x, cfg.rms_norm_eps, scale.astype(jnp.float32) * x.shape[-1]**-0.5)
  routing = route(h, router, cfg.num_experts_per_tok, True)
  return routing._replace(weights=routing.weights * per_expert_scale.astype(jnp.float32)[routing.experts])


def route_sigmoid_inputs(x: Array, router: Array, k: int) -> Routing:
  """Llama 4: the top-k of ``x @ router`` with weights ``sigmoid(logit)`` (float32), which scale each chosen
  expert's *input* (``MoE`` applies them there); ``probs`` holds every expert's sigmoid."""
  logits = jnp.dot(x, router.astype(x.dtype)).astype(jnp.float32)
  top, experts = jax.lax.top_k(logits, k)
  return Routing(experts.astype(jnp.int32), jax.nn.sigmoid(top), jax.nn.sigmoid(logits))


class TileLayout(NamedTuple):
  """``M`` assignments grouped by expert into ``tiles`` tiles of ``tile`` rows.

  ``slot: [M]`` the row of each assignment in the tiled layout; ``source: [tiles * tile]`` the
  assignment each row holds (``valid`` where it holds one); ``expert: [tiles]`` each tile's expert.
  """

  slot: Array
  source: Array
  valid: Array
  expert: Array


def tile_layout(experts: Array, num_experts: int, tile: int) -> TileLayout:
  """Lay out ``experts: [M]`` (an expert id per assignment) in expert-pure tiles.

  At most ``ceil(M / tile) + num_experts`` tiles are needed (each expert pads one tile at most),
  a static bound, so the layout has static shapes whatever the routing.
  """
  m = experts.shape[0]
  sizes = jnp.bincount(experts, length=num_experts)
  padded = -(-sizes // tile) * tile
  ends = jnp.cumsum(padded)
  order = jnp.argsort(experts, stable=True)  # assignments grouped by expert
  rank = jnp.arange(m) - (jnp.cumsum(sizes) - sizes)[experts[order]]  # position inside its expert's group
  slot = jnp.zeros(m, jnp.int32).at[order].set(((ends - padded)[experts[order]] + rank).astype(jnp.int32))
  tiles = -(-m // tile) + num_experts
  source = jnp.zeros(tiles * tile, jnp.int32).at[slot].set(jnp.arange(m, dtype=jnp.int32))
  valid = jnp.zeros(tiles * tile, bool).at[slot].set(True)
  expert = jnp.minimum(jnp.searchsorted(ends, jnp.arange(tiles) * tile, side="right"), num_experts - 1)
  return TileLayout(slot, source, valid, expert.astype(jnp.int32))


class MoE(nnx.Module):
  """``num_experts`` gated experts of width ``moe_intermediate_size`` behind a top-k router.

  Parameters: ``router: [d, E]``; ``gate, up: [E, d, I]``; ``down: [E, I, d]`` (each expert's
  kernels in tailjax's ``[in, out]`` layout, stacked on a leading ``experts`` axis); with
  ``cfg.moe_bias`` also ``router_bias: [E]``, ``gate_bias, up_bias: [E, I]``, ``down_bias: [E, d]``; with
  the sigmoid-groups router ``score_correction: [E]``; with the scaled-softmax router ``router_scale: [d]`` and
  ``per_expert_scale: [E]``; with ``cfg.shared_expert_size`` a dense ``shared`` MLP (and with
  ``cfg.shared_expert_gate`` its gate ``shared_gate: [d, 1]``).
  """

  def __init__(self, cfg: ModelConfig, dtype, param_dtype, rngs: nnx.Rngs):
    d, m, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
    self.router = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (d, e), param_dtype),
                            **axes("embed", None))
    self.gate = nnx.Param(init(rngs.params(), (e, d, m), param_dtype), **axes("experts", "embed", "mlp"))
    self.up = nnx.Param(init(rngs.params(), (e, d, m), param_dtype), **axes("experts", "embed", "mlp"))
    self.down = nnx.Param(init(rngs.params(), (e, m, d), param_dtype), **axes("experts", "mlp", "embed"))
    if cfg.router == "sigmoid_groups":  # added to the scores only to choose experts (GLM: e_score_correction_bias)
      self.score_correction = nnx.Param(jnp.zeros(e, jnp.float32), **axes(None))
    if cfg.router == "scaled_softmax":  # Gemma 4
      self.router_scale = nnx.Param(jnp.ones(d, jnp.float32), **axes("norm"))
      self.per_expert_scale = nnx.Param(jnp.ones(e, jnp.float32), **axes(None))
    if cfg.shared_expert_size:
      self.shared = MLP(cfg, dtype, param_dtype, rngs, width=cfg.shared_expert_size)
    if cfg.shared_expert_gate:
      self.shared_gate = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (d, 1), param_dtype),
                                   **axes("embed", None))
    if cfg.moe_bias:
      zeros = lambda *shape: jnp.zeros(shape, param_dtype)
      self.router_bias = nnx.Param(zeros(e), **axes(None))
      self.gate_bias = nnx.Param(zeros(e, m), **axes("experts", "mlp"))
      self.up_bias = nnx.Param(zeros(e, m), **axes("experts", "mlp"))
      self.down_bias = nnx.Param(zeros(e, d), **axes("experts", "embed"))
    self.num_experts = e
    self.k = cfg.num_experts_per_tok
    self.norm_topk_prob = cfg.norm_topk_prob
    self.cfg = cfg
    self.dtype = dtype

  def __call__(self, x: Array, router_input: Array | None = None) -> tuple[Array, Array]:
    """``x: [..., d]`` -> (``[..., d]``, the chosen experts ``[..., k]``). ``router_input: [..., d]`` (default ``x``)
    is what the router sees (Gemma 4 routes the residual stream and feeds the experts its normalised copy)."""
    lead, d = x.shape[:-1], x.shape[-1]
    x = x.reshape(-1, d).astype(self.dtype)
    router_input = x if router_input is None else router_input.reshape(-1, d).astype(self.dtype)
    value = lambda name: getattr(self, name)[...].astype(self.dtype) if hasattr(self, name) else None
    if self.cfg.router == "sigmoid_groups":
      routing = route_sigmoid_groups(router_input, self.router[...], self.score_correction[...], self.cfg)
    elif self.cfg.router == "sigmoid_inputs":
      routing = route_sigmoid_inputs(router_input, self.router[...], self.k)
    elif self.cfg.router == "scaled_softmax":
      routing = route_scaled_softmax(router_input, self.router[...], self.router_scale[...],
                                     self.per_expert_scale[...], self.cfg)
    else:
      routing = route(router_input, self.router[...], self.k, self.norm_topk_prob, value("router_bias"))
    weights = ExpertWeights(*(value(name) for name in ExpertWeights._fields))
    glu = lambda g, u: gated(self.cfg, g, u)
    if self.cfg.router == "sigmoid_inputs":  # each (token, expert) pair its own input row, scaled by its weight
      rows = (x[:, None, :] * routing.weights[..., None].astype(x.dtype)).reshape(-1, d)
      out = expert_outputs(rows, routing.experts.reshape(-1, 1), weights, glu).reshape(-1, self.k, d)
      y = jnp.sum(out.astype(jnp.float32), axis=1).astype(x.dtype)
    else:
      out = expert_outputs(x, routing.experts, weights, glu)
      y = jnp.einsum("nkd,nk->nd", out.astype(jnp.float32), routing.weights).astype(x.dtype)
    if self.cfg.shared_expert_size:
      shared = self.shared(x)
      if self.cfg.shared_expert_gate:
        shared = jax.nn.sigmoid(jnp.dot(x, self.shared_gate[...].astype(x.dtype))) * shared
      y = y + shared
    return y.reshape(*lead, d), routing.experts.reshape(*lead, self.k)


def expert_outputs(x: Array, experts: Array, weights: ExpertWeights, glu: Callable[[Array, Array], Array],
                   implementation: str | None = None) -> Array:
  """Each token through each of its experts: ``x: [N, d]``, ``experts: [N, k]`` ->  ``[N, k, d]``,
  ``down(glu(gate(x), up(x)))`` with each projection's bias when ``weights`` has one.

  ``implementation``: ``"tiles"`` (expert-pure tiles and a scan; the CPU's choice) or ``"ragged"``
  (one ``lax.ragged_dot`` per projection over the assignments sorted by expert: grouped GEMMs,
  the accelerators' choice); None picks by the default backend. Both are exact.
  """
  implementation = implementation or ("tiles" if jax.default_backend() == "cpu" else "ragged")
  n, k = experts.shape
  flat = experts.reshape(-1)
  w = weights
  if implementation == "ragged":
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=w.gate.shape[0]).astype(jnp.int32)
    rows, owner = x[order // k], flat[order]  # each sorted row and its expert
    project = lambda h, kernel, bias: jax.lax.ragged_dot(h, kernel, sizes) + (0 if bias is None else bias[owner])
    h = glu(project(rows, w.gate, w.gate_bias), project(rows, w.up, w.up_bias))
    out = project(h, w.down, w.down_bias)
    return jnp.zeros_like(out).at[order].set(out).reshape(n, k, -1)
  tile = min(TILE, n * k)
  layout = tile_layout(flat, w.gate.shape[0], tile)
  rows = jnp.where(layout.valid[:, None], x[layout.source // k], 0).reshape(-1, tile, x.shape[-1])

  def expert_tile(_, inputs):
    h, e = inputs  # [tile, d], the tile's expert
    pick = lambda a: 0 if a is None else jax.lax.dynamic_index_in_dim(a, e, keepdims=False)
    h = glu(h @ pick(w.gate) + pick(w.gate_bias), h @ pick(w.up) + pick(w.up_bias))
    return None, h @ pick(w.down) + pick(w.down_bias)

  _, out = jax.lax.scan(expert_tile, None, (rows, layout.expert))
  return out.reshape(-1, out.shape[-1])[layout.slot].reshape(n, k, -1)  # back to [token, choice]
