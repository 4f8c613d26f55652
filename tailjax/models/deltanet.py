"""Gated DeltaNet: the linear-attention mixer of Qwen3.5 / Qwen3.6's hybrid layers (Yang, Kautz and
Hatamizadeh, "Gated Delta Networks", 2024), as transformers' ``Qwen3_5GatedDeltaNet`` computes it.

Per value head a state ``S: [dk, dv]`` is carried along the window. At token ``t``, with the key and
query L2-normalised (the query then scaled by ``dk**-0.5``), decay ``a_t = exp(g_t)`` and write
strength ``b_t`` in (0, 1)::

    S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T        o_t = S_t^T q_t

i.e. the state first decays, then the value it predicts for ``k_t`` is moved a step ``b_t`` towards
``v_t`` (the delta rule). ``gated_delta_rule_recurrent`` runs exactly that, token by token.

``gated_delta_rule`` computes the same outputs chunk by chunk (``C`` tokens, 64 by default), the form
used for training-length windows: within a chunk, with ``G_i = g_1 + ... + g_i`` (inclusive, from
the chunk's start) and ``D_ij = exp(G_i - G_j)`` for ``i >= j``, the state's corrections
``u_i = b_i (v_i - k_i^T exp(g_i) S_{i-1})`` satisfy the unit lower-triangular system (the UT
transform)::

    u_i + sum_{j < i} b_i (k_i . k_j) D_ij u_j = b_i v_i - b_i exp(G_i) k_i^T S_0

so ``U = T (b V) - T (b exp(G) K) S_0`` with ``T = (I + A)^-1`` (``unit_lower_inverse``, by forward substitution
as the FLA kernels and transformers do), and

    o_i = exp(G_i) q_i^T S_0 + sum_{j <= i} D_ij (q_i . k_j) u_j
    S_C = exp(G_C) S_0 + sum_j exp(G_C - G_j) k_j u_j^T.

A ``jax.lax.scan`` carries ``S`` over the chunks: the work is ``T/C`` chunks of ``C x C`` and
``C x dk x dv`` products, linear in the window (``benchmarks/deltanet.py``). Packed documents
(``segments``) reset the state: a pair ``(i, j)`` in different documents gets ``D_ij = 0`` and a
document that starts inside a chunk does not see ``S_0``, by masks rather than by ``g = -inf``
(differences of huge cumulative sums would cost the decays their digits). Everything runs in float32
(float64 inputs in float64).

Before the rule, the projected ``q, k, v`` pass a short depthwise causal convolution (``K`` taps,
4 in Qwen3.5) and SiLU; after it, each head's output is RMS-normalised and gated by ``silu(z)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tailjax.models.cache import DeltaCache
from tailjax.models.config import ModelConfig
from tailjax.models.layers import RMSNorm, axes, linear

Array = jax.Array

CHUNK = 64


class DeltaRuleOutput(NamedTuple):
  """``out: [B, T, Hv, dv]`` the read of each token's state; ``state: [B, Hv, dk, dv]`` the state after the
  window's last token (float32; float64 for float64 inputs)."""

  out: Array
  state: Array


def _prepare(q: Array, k: Array, v: Array, g: Array, beta: Array):
  """Key/query heads repeated to the value heads (each of ``Hk`` serving ``Hv / Hk`` consecutive value heads),
  in float32 (float64 stays float64), ``[B, H, T, ...]``; q and k L2-normalised as transformers does
  (``x / sqrt(|x|^2 + 1e-6)``), q scaled by ``dk**-0.5``."""
  heads = v.shape[2]
  dtype = jnp.result_type(q.dtype, jnp.float32)
  q, k = (jnp.repeat(x, heads // x.shape[2], axis=2) for x in (q, k))
  q, k, v, g, beta = (jnp.swapaxes(x.astype(dtype), 1, 2) for x in (q, k, v, g, beta))
  l2 = lambda x: x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-6)
  return l2(q) * q.shape[-1]**-0.5, l2(k), v, g, beta


def runs(segments: Array | None, shape: tuple[int, int]) -> Array:
  """``[B, T]`` ids of contiguous runs of equal ``segments`` (0, 1, 2, ... along each row): two tokens share
  a state only if they share a run. None: one run per row."""
  if segments is None:
    return jnp.zeros(shape, jnp.int32)
  starts = jnp.concatenate([jnp.zeros((shape[0], 1), jnp.int32),
                            (segments[:, 1:] != segments[:, :-1]).astype(jnp.int32)], axis=1)
  return jnp.cumsum(starts, axis=1)


def gated_delta_rule_recurrent(q: Array, k: Array, v: Array, g: Array, beta: Array, segments: Array | None = None,
                               state: Array | None = None) -> DeltaRuleOutput:
  """The gated delta rule token by token (the definition; see the module docstring).

  ``q, k: [B, T, Hk, dk]``, ``v: [B, T, Hv, dv]`` (``Hv`` a multiple of ``Hk``), ``g: [B, T, Hv]`` log decays
  (<= 0), ``beta: [B, T, Hv]`` write strengths, ``segments: [B, T]`` (a change of value starts a new document
  and a fresh state), ``state: [B, Hv, dk, dv]`` before the first token (default zeros)."""
  b, t, heads, dv = v.shape
  q, k, v, g, beta = _prepare(q, k, v, g, beta)
  run = runs(segments, (b, t))
  fresh = jnp.concatenate([jnp.zeros((b, 1), bool), run[:, 1:] != run[:, :-1]], axis=1)  # [B, T]
  state = jnp.zeros((b, heads, q.shape[-1], dv), q.dtype) if state is None else state.astype(q.dtype)

  def step(s, x):
    q_t, k_t, v_t, g_t, b_t, fresh_t = x  # [B, H, dk], [B, H, dk], [B, H, dv], [B, H], [B, H], [B]
    s = jnp.where(fresh_t[:, None, None, None], 0.0, s * jnp.exp(g_t)[..., None, None])
    delta = (v_t - jnp.einsum("bhkv,bhk->bhv", s, k_t)) * b_t[..., None]
    s = s + k_t[..., :, None] * delta[..., None, :]
    return s, jnp.einsum("bhkv,bhk->bhv", s, q_t)

  per_token = lambda x: jnp.moveaxis(x, 2, 0)  # [B, H, T, ...] -> [T, B, H, ...]
  state, out = jax.lax.scan(step, state, (*map(per_token, (q, k, v, g, beta)), fresh.T))
  return DeltaRuleOutput(jnp.moveaxis(out, 0, 1), state)  # [T, B, H, dv] -> [B, T, H, dv]


@jax.custom_vjp
def unit_lower_inverse(a: Array) -> Array:
  """``T = (I + A)^-1`` for strictly lower-triangular ``a: [..., C, C]`` (what lies on or above the diagonal is
  ignored), by forward substitution: row ``i`` of ``T`` is ``e_i - sum_{j<i} A_ij T_j``, rows in order (``C``
  steps of a ``[C] x [C, C]`` product). Its derivative needs no residual but ``T``: ``dT = -T dA T``, so the
  cotangent of ``A`` is ``-T^T dT̄ T^T`` below the diagonal.

  Not ``lax.linalg.triangular_solve``: jaxlib's CPU kernel for it runs its batch on XLA's intra-op pool and,
  with two solves in flight on a 2-core host, each waits on work queued behind the other (a deadlock seen on
  the gradient of ``gated_delta_rule``, whose two solves run concurrently)."""
  c = a.shape[-1]
  a = jnp.tril(a, -1)

  def row(i, t):
    return t.at[..., i, :].set(jnp.eye(c, dtype=a.dtype)[i] - jnp.einsum("...j,...jk->...k", a[..., i, :], t))

  return jax.lax.fori_loop(1, c, row, jnp.broadcast_to(jnp.eye(c, dtype=a.dtype), a.shape))


def _inverse_forward(a):
  t = unit_lower_inverse(a)
  return t, t


def _inverse_backward(t, cotangent):
  t_transposed = jnp.swapaxes(t, -1, -2)
  return (jnp.tril(-(t_transposed @ cotangent @ t_transposed), -1),)


unit_lower_inverse.defvjp(_inverse_forward, _inverse_backward)


def gated_delta_rule(q: Array, k: Array, v: Array, g: Array, beta: Array, segments: Array | None = None,
                     state: Array | None = None, chunk: int = CHUNK) -> DeltaRuleOutput:
  """``gated_delta_rule_recurrent``'s outputs, computed ``chunk`` tokens at a time (the module docstring);
  same arguments. The window is padded to whole chunks with tokens that neither decay nor write."""
  b, t, heads, dv = v.shape
  q, k, v, g, beta = _prepare(q, k, v, g, beta)
  dk = q.shape[-1]
  run = runs(segments, (b, t))
  pad = -t % chunk
  q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (q, k, v))
  g, beta = (jnp.pad(x, ((0, 0), (0, 0), (0, pad))) for x in (g, beta))
  run = jnp.pad(run, ((0, 0), (0, pad)), mode="edge")
  n = (t + pad) // chunk
  q, k, v = (x.reshape(b, heads, n, chunk, x.shape[-1]) for x in (q, k, v))
  g, beta = (x.reshape(b, heads, n, chunk) for x in (g, beta))
  run = run.reshape(b, 1, n, chunk)

  before = jnp.concatenate([run[:, :, :1, :1], run[:, :, :-1, -1:]], axis=2)  # [B, 1, N, 1]: S_0's run
  reads_state = run == before  # [B, 1, N, C]: the state entering the chunk reaches token i
  below = jnp.tril(jnp.ones((chunk, chunk), bool))
  linked = below & (run[..., :, None] == run[..., None, :])  # [B, 1, N, C, C]: i >= j, one document
  cum = jnp.cumsum(g, axis=-1)  # G: [B, H, N, C]
  decay = jnp.exp(jnp.where(linked, cum[..., :, None] - cum[..., None, :], -jnp.inf))  # D_ij
  from_start = jnp.where(reads_state, jnp.exp(cum), 0.0)  # exp(G_i), 0 past a document start
  to_end = jnp.where(run == run[..., -1:], jnp.exp(cum[..., -1:] - cum), 0.0)  # exp(G_C - G_j)

  dot = lambda x, y: jnp.einsum("bhncd,bhnsd->bhncs", x, y)
  inverse = unit_lower_inverse(dot(k, k) * decay * beta[..., None])  # T = (I + A)^-1: [B, H, N, C, C]
  written = inverse @ (v * beta[..., None])  # T (b V): [B, H, N, C, dv]
  corrected = inverse @ (k * (beta * from_start)[..., None])  # T (b exp(G) K): [B, H, N, C, dk]
  inside = dot(q, k) * decay  # [B, H, N, C, C], the diagonal included
  q_state = q * from_start[..., None]
  k_state = k * to_end[..., None]
  carried = jnp.where(reads_state[..., -1], jnp.exp(cum[..., -1]), 0.0)  # exp(G_C): [B, H, N]

  def step(s, x):  # s: [B, H, dk, dv]
    written, corrected, inside, q_state, k_state, carried = x
    u = written - corrected @ s  # [B, H, C, dv]
    out = q_state @ s + inside @ u
    return s * carried[..., None, None] + jnp.swapaxes(k_state, -1, -2) @ u, out

  state = jnp.zeros((b, heads, dk, dv), q.dtype) if state is None else state.astype(q.dtype)
  per_chunk = lambda x: jnp.moveaxis(x, 2, 0)  # [B, H, N, ...] -> [N, B, H, ...]
  state, out = jax.lax.scan(step, state, tuple(map(per_chunk, (written, corrected, inside, q_state, k_state,
                                                               carried))))
  out = jnp.moveaxis(out, 0, 2).reshape(b, heads, n * chunk, dv)[:, :, :t]
  return DeltaRuleOutput(jnp.swapaxes(out, 1, 2), state)


def causal_conv(x: Array, kernel: Array, run: Array) -> Array:
  """Depthwise causal convolution: ``x: [B, T, C]``, ``kernel: [K, C]`` (tap ``K - 1`` on the token itself),
  ``run: [B, T]`` (``runs``: no tap reaches into an earlier document) -> ``[B, T, C]`` in float32."""
  taps, t = kernel.shape[0], x.shape[1]
  x32 = jnp.pad(x.astype(jnp.float32), ((0, 0), (taps - 1, 0), (0, 0)))
  run = jnp.pad(run, ((0, 0), (taps - 1, 0)), constant_values=-1)
  out = 0.0
  for j in range(taps):  # x[t - (K - 1 - j)] * kernel[j]
    same = (run[:, j:j + t] == run[:, taps - 1:])[..., None]
    out = out + jnp.where(same, x32[:, j:j + t], 0.0) * kernel[j].astype(jnp.float32)
  return out


class GatedDeltaNet(nnx.Module):
  """Qwen3.5's linear-attention layer: ``x -> q, k, v`` (``linear_num_key_heads`` heads of
  ``linear_key_head_dim`` for q and k, ``linear_num_value_heads`` of ``linear_value_head_dim`` for v), each
  through the causal convolution (``conv_q, conv_k, conv_v: [K, width]``) and SiLU; ``g = -exp(A_log) *
  softplus(a(x) + dt_bias)``, ``beta = sigmoid(b(x))`` per value head; the gated delta rule; per head
  ``RMSNorm(o) * silu(z(x))``; the output projection ``o``."""

  def __init__(self, cfg: ModelConfig, layer: int, dtype, param_dtype, rngs: nnx.Rngs):
    del layer
    d, hk, hv = cfg.hidden_size, cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv, taps = cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_conv_kernel
    project = lambda width, names=("embed", "heads"): linear(d, width, False, names, dtype, param_dtype, rngs)
    self.q, self.k, self.v, self.z = project(hk * dk), project(hk * dk), project(hv * dv), project(hv * dv)
    self.b, self.a = project(hv), project(hv)
    conv = lambda width: nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (taps, width), param_dtype),
                                   **axes(None, "heads"))
    self.conv_q, self.conv_k, self.conv_v = conv(hk * dk), conv(hk * dk), conv(hv * dv)
    self.dt_bias = nnx.Param(jnp.ones(hv, jnp.float32), **axes("heads"))
    self.A_log = nnx.Param(jnp.log(jnp.linspace(1.0, 16.0, hv, dtype=jnp.float32)), **axes("heads"))
    self.norm = RMSNorm(dv, cfg.rms_norm_eps)
    self.o = linear(hv * dv, d, False, ("heads", "embed"), dtype, param_dtype, rngs)
    self.cfg = cfg

  def __call__(self, x: Array, positions: Array, run: Array, cache: DeltaCache | None = None
               ) -> tuple[Array, DeltaCache | None]:
    """``x: [B, T, d]``; ``positions`` unused (no RoPE); ``run: [B, T]`` document runs (``runs``) -> (``[B, T, d]``,
    the cache). Decoding (``tailjax.models.cache``), ``run`` is 1 on tokens and 0 on left padding: the convolutions
    continue from ``cache``'s last inputs (padding reads as zeros) and the rule from its state, which the last
    token's replace."""
    del positions
    cfg = self.cfg
    b, t, _ = x.shape
    hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads

    def conv(proj, kernel, past):  # past: [B, K - 1, width] the inputs before these tokens (decoding), else None
      if past is None:
        return jax.nn.silu(causal_conv(proj(x), kernel[...], run)), None
      inputs = jnp.concatenate([past, jnp.where((run > 0)[..., None], proj(x), 0).astype(past.dtype)], axis=1)
      taps = past.shape[1]
      out = causal_conv(inputs, kernel[...], jnp.zeros(inputs.shape[:2], jnp.int32))[:, taps:]
      return jax.nn.silu(out), inputs[:, inputs.shape[1] - taps:]

    pasts = (None,) * 3 if cache is None else (cache.conv_q, cache.conv_k, cache.conv_v)
    (q, conv_q), (k, conv_k), (v, conv_v) = (
        conv(proj, kernel, past) for proj, kernel, past in zip((self.q, self.k, self.v),
                                                               (self.conv_q, self.conv_k, self.conv_v), pasts))
    q = q.reshape(b, t, hk, cfg.linear_key_head_dim)
    k = k.reshape(b, t, hk, cfg.linear_key_head_dim)
    v = v.reshape(b, t, hv, cfg.linear_value_head_dim)
    g = -jnp.exp(self.A_log[...]) * jax.nn.softplus(self.a(x).astype(jnp.float32) + self.dt_bias[...])
    beta = jax.nn.sigmoid(self.b(x).astype(jnp.float32))
    # one new token: the recurrence, rather than a chunk padded to 64
    rule = gated_delta_rule_recurrent if cache is not None and t == 1 else gated_delta_rule
    result = rule(q, k, v, g, beta, run, state=None if cache is None else cache.state)  # out: [B, T, Hv, dv]
    if cache is not None:
      cache = DeltaCache(result.state.astype(jnp.float32), conv_q, conv_k, conv_v)
    z = self.z(x).reshape(b, t, hv, cfg.linear_value_head_dim)
    out = self.norm(result.out) * jax.nn.silu(z.astype(jnp.float32))
    return self.o(out.reshape(b, t, hv * cfg.linear_value_head_dim).astype(x.dtype)), cache
