"""Mergeable softmax statistics over vocabulary blocks.

Everything tailjax computes per token (log-sum-exp, KL divergence, entropy, arg-max) is a
reduction over the vocabulary. Written as *block state -> merge -> finish*, the
same arithmetic serves the materialized losses (one block holding the whole
vocabulary) and the fused head (a scan over blocks of the unembedding), so both
paths agree to rounding and share one precise KL.

Precise KL. With ``a`` and ``b`` the reference and candidate logits, ``p = softmax(a)``
and ``delta = a - b``::

    KL(p || q) = E_p[delta] + log E_p[exp(-delta)]          (exact for any logits)

Centring ``e = delta - c`` at ``c ~ E_p[delta]`` and writing
``phi(e) = exp(-e) - 1 + e >= 0`` gives, with ``m = E_p[e]`` and ``S = E_p[phi(e)]``::

    KL = m + log1p(S - m)

``phi`` is evaluated by its Taylor series near zero, so ``S`` carries full float32
relative precision however small the KL is; the rounding residual ``m`` cancels to
first order. The textbook ``sum p (log p - log q)`` subtracts numbers of size ~1 to
get ~1e-8 and returns noise (often negative). Block states merge by re-centring
(a Chan-style parallel update of the exponential moment), which adds only
non-negative terms. Where the KL is large (> 1) the textbook form is already
accurate and cannot overflow, so it is used there.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

# Largest exponent used in the small-KL form; beyond it the textbook form takes over.
_MAX_EXP = 80.0
# |e| below which phi(e) is evaluated by its Taylor series.
_SERIES_RADIUS = 0.25
# KL above which the textbook form is accurate to float32 rounding and is used.
_LARGE_KL = 1.0


def _two_diff(a: Array, b: Array) -> tuple[Array, Array]:
  """Error-free ``a - b = hi + lo`` (Knuth's TwoSum), so large logit offsets lose nothing."""
  hi = a - b
  b_virtual = a - hi
  a_virtual = hi + b_virtual
  lo = (a - a_virtual) + (b_virtual - b)
  return hi, lo


def _phi_series(e: Array) -> Array:
  """``exp(-e) - 1 + e`` by Horner's rule on its Taylor series (for |e| <= 0.25)."""
  # e^2/2! - e^3/3! + ... + e^10/10!: truncation error < 1e-12 relative at |e| = 0.25.
  coeffs = (1 / 3628800, -1 / 362880, 1 / 40320, -1 / 5040, 1 / 720, -1 / 120, 1 / 24, -1 / 6, 1 / 2)
  acc = jnp.zeros_like(e)
  for c in coeffs:
    acc = acc * e + c
  return acc * e * e


class LseState(NamedTuple):
  """Running log-sum-exp: ``lse = max + log(sum)``; shapes ``[...]``."""

  max: Array
  sum: Array


class KLState(NamedTuple):
  """Running KL(ref || cand) moments over part of the vocabulary; shapes ``[...]``.

  ``w = sum exp(a - ref.max)`` is the reference's normaliser; ``center`` is the
  weighted mean of ``delta`` it was centred on; ``phi`` and ``resid`` are the
  ``w``-weighted sums of ``phi(delta - center)`` and ``delta - center``.
  """

  ref: LseState
  cand: LseState
  center: Array
  phi: Array
  resid: Array


class ArgmaxState(NamedTuple):
  """Running (max, first index of the max); shapes ``[...]``."""

  value: Array
  index: Array


def lse_block(z: Array) -> LseState:
  """``z: [..., B]`` float32 logits (``-inf`` where invalid) -> state."""
  m = jax.lax.stop_gradient(jnp.max(z, axis=-1))
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  return LseState(m, jnp.sum(jnp.exp(z - m_safe[..., None]), axis=-1))


def lse_merge(s: LseState, t: LseState) -> LseState:
  m = jnp.maximum(s.max, t.max)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  return LseState(m, s.sum * jnp.exp(s.max - m_safe) + t.sum * jnp.exp(t.max - m_safe))


def lse_finish(s: LseState) -> Array:
  return s.max + jnp.log(s.sum)


def kl_block(a: Array, b: Array) -> KLState:
  """``a, b: [..., B]`` float32 reference / candidate logits (``-inf`` where invalid) -> state."""
  ref, cand = lse_block(a), lse_block(b)
  m = jnp.where(jnp.isfinite(ref.max), ref.max, 0.0)[..., None]
  log_w = a - m
  w = jnp.exp(log_w)
  # Where the reference's mass underflows to 0 (-inf, or a large finite negative such as -1e9 or finfo.min: JAX
  # code masks both ways) its token adds nothing to E_p; only the candidate's mass there counts, exactly as for -inf.
  # Differencing a -1e9 logit would leave rounding of size ~64 in the exponent below.
  held = w > 0
  comparable = held & (b > -jnp.inf)
  hi, lo = _two_diff(a, b)
  hi = jnp.where(comparable, hi, 0.0)
  # Any centre gives the same KL; the weighted mean keeps e small. No gradient flows through it.
  center = jax.lax.stop_gradient(jnp.sum(w * hi, axis=-1) / ref.sum)[..., None]
  e = jnp.where(comparable, (hi - center) + lo, 0.0)
  # w exp(-e) = exp(b - m + center) as one exponent: finite where w underflows, and where the
  # reference rules a token out (a = -inf) that the candidate still gives mass to.
  w_exp = jnp.exp(jnp.minimum(jnp.where(comparable, log_w - e, b - m + center), _MAX_EXP))
  small = comparable & (jnp.abs(e) <= _SERIES_RADIUS)
  term = jnp.where(small, w * _phi_series(jnp.where(small, e, 0.0)), w_exp - w + w * e)
  # A candidate that rules out (-inf) a token the reference allows is infinitely far away.
  term = jnp.where(held & (b == -jnp.inf), jnp.inf, term)
  center = center[..., 0]
  return KLState(ref, cand, center, jnp.sum(term, axis=-1), jnp.sum(w * e, axis=-1))


def _phi(e: Array) -> Array:
  """``exp(-e) - 1 + e``: series near zero, ``expm1`` form elsewhere (exponent capped)."""
  small = jnp.abs(e) <= _SERIES_RADIUS
  return jnp.where(small, _phi_series(jnp.where(small, e, 0.0)), jnp.expm1(jnp.minimum(-e, _MAX_EXP)) + e)


def _recenter(s: KLState, scale: Array, center: Array) -> tuple[Array, Array]:
  """``(phi, resid)`` sums of ``s``, rescaled by ``scale`` and re-centred on ``center``.

  Uses ``phi(e - x) = exp(x) phi(e) + phi(-x) - expm1(x) e`` with ``x = center - s.center``.
  """
  x = center - s.center
  w = s.ref.sum * scale
  resid = s.resid * scale
  grow = jnp.minimum(x, _MAX_EXP)
  phi = jnp.exp(grow) * (s.phi * scale) + w * _phi(-x) - jnp.expm1(grow) * resid
  return phi, resid - w * x


def kl_merge(s: KLState, t: KLState) -> KLState:
  ref = lse_merge(s.ref, t.ref)
  m = jnp.where(jnp.isfinite(ref.max), ref.max, 0.0)
  scale_s, scale_t = jnp.exp(s.ref.max - m), jnp.exp(t.ref.max - m)
  ws, wt = s.ref.sum * scale_s, t.ref.sum * scale_t
  center = (ws * s.center + wt * t.center) / (ws + wt)
  phi_s, resid_s = _recenter(s, scale_s, center)
  phi_t, resid_t = _recenter(t, scale_t, center)
  return KLState(ref, lse_merge(s.cand, t.cand), center, phi_s + phi_t, resid_s + resid_t)


def kl_finish(s: KLState) -> Array:
  """State -> ``[...]`` KL(ref || cand) >= 0 (``inf`` where the candidate rules out a reference token)."""
  w = s.ref.sum
  mean_e, mean_phi = s.resid / w, s.phi / w
  small_form = mean_e + jnp.log1p(mean_phi - mean_e)
  textbook = s.center + mean_e + lse_finish(s.cand) - lse_finish(s.ref)
  use_textbook = (textbook > _LARGE_KL) | ~jnp.isfinite(small_form)
  kl = jnp.where(use_textbook, textbook, small_form)
  return jnp.where(s.phi == jnp.inf, jnp.inf, jnp.maximum(kl, 0.0))


def argmax_block(z: Array, offset: Array | int = 0) -> ArgmaxState:
  """``z: [..., B]`` -> (max, offset + first arg-max)."""
  return ArgmaxState(jnp.max(z, axis=-1), jnp.argmax(z, axis=-1).astype(jnp.int32) + offset)


def argmax_merge(s: ArgmaxState, t: ArgmaxState) -> ArgmaxState:
  """``t`` covers later vocabulary ids than ``s``: ties keep ``s`` (first occurrence wins)."""
  take_t = t.value > s.value
  return ArgmaxState(jnp.where(take_t, t.value, s.value), jnp.where(take_t, t.index, s.index))


class EntropyState(NamedTuple):
  """Running entropy of ``softmax(z)``: the log-sum-exp state, ``weighted = sum exp(z - max) (z - max)`` (<= 0) and
  ``rest = sum - 1``, the mass beside one maximal entry, kept apart (-1 where every entry is -inf); shapes ``[...]``.

  ``H = log1p(rest) - weighted / sum`` adds two non-negative terms: on a near-certain token (``rest`` ~ H ~ 1e-8)
  nothing cancels, where ``log(sum)`` would round ``1 + rest`` to float32 first."""

  lse: LseState
  weighted: Array
  rest: Array


def entropy_block(z: Array) -> EntropyState:
  """``z: [..., B]`` float32 logits (``-inf`` where invalid) -> state."""
  s = lse_block(z)
  m_safe = jnp.where(jnp.isfinite(s.max), s.max, 0.0)[..., None]
  e = jnp.exp(z - m_safe)
  below = z < s.max[..., None]
  ties = jnp.sum(z == s.max[..., None], axis=-1) - 1  # other entries at the maximum, each of mass 1
  rest = jnp.where(jnp.isfinite(s.max), jnp.sum(jnp.where(below, e, 0.0), axis=-1) + ties, -1.0)
  return EntropyState(s, jnp.sum(jnp.where(e > 0, e * (z - m_safe), 0.0), axis=-1), rest)


def entropy_merge(s: EntropyState, t: EntropyState) -> EntropyState:
  """Both parts re-expressed about the common max: ``sum e^(z - m') (z - m') = r (T + W (max - m'))``,
  ``r = e^(max - m')``; ``rest`` is the higher part's plus the whole of the other's (``1 + rest``, scaled)."""
  m = jnp.maximum(s.lse.max, t.lse.max)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)

  def moved(x: EntropyState) -> Array:
    shift = jnp.where(jnp.isfinite(x.lse.max), x.lse.max - m_safe, 0.0)
    return jnp.exp(shift) * (x.weighted + x.lse.sum * shift)

  s_higher = s.lse.max >= t.lse.max
  rest = jnp.where(s_higher, s.rest + (1 + t.rest) * jnp.exp(t.lse.max - m_safe),
                   t.rest + (1 + s.rest) * jnp.exp(s.lse.max - m_safe))
  return EntropyState(lse_merge(s.lse, t.lse), moved(s) + moved(t), rest)


def entropy_finish(s: EntropyState) -> Array:
  """``H(softmax(z))`` in nats, >= 0: ``log1p(rest) - weighted / sum``."""
  return jnp.maximum(jnp.log1p(s.rest) - s.weighted / s.lse.sum, 0.0)


# ---------------------------------------------------------------------------------------------
# Jensen-Shannon: a second pass, once both normalisers and the KL state are known.
#
# JS(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2, sums per vocabulary entry
#
#     d = 1/2 [p log(2p / (p + q)) + q log(2q / (p + q))]  >= 0.
#
# The mixture needs normalised p and q, so no block state merges without them: ``js_block`` takes the
# reference's and candidate's log-normalisers and ``kl_shift`` of the finished KL state. With
# ``delta = log q - log p`` taken from the KL state's centred, error-free logit differences (not from two
# rounded log-probabilities), and ``u = expm1(delta)``, ``v = expm1(-delta)``, ``L(x) = log1p(x) - x``:
#
#     d = -1/2 p [L(u/2) + (1 + u) L(v/2)]                       (|delta| <= 1/4; the linear terms cancel exactly)
#     d = 1/2 [p (log 2 - softplus(delta)) + q (delta + log 2 - softplus(delta))]          (elsewhere)
#
# Both ``L`` terms are <= 0, so near p = q (d ~ p delta^2 / 8) nothing cancels: JS keeps float32 relative
# precision however small it is, like the KL.


class KLShift(NamedTuple):
  """From a finished KL state, per token: ``log q_i - log p_i = -((a_i - b_i) - center) - offset``."""

  center: Array
  offset: Array


def kl_shift(s: KLState) -> KLShift:
  """``offset = log1p(E_p[phi(e)] - E_p[e])`` (the small-KL form, precise), or where the KL is large the
  normalisers' difference ``center + lse(b) - lse(a)``: the same number, as ``kl_finish`` chooses."""
  w = s.ref.sum
  mean_e, mean_phi = s.resid / w, s.phi / w
  small = jnp.log1p(mean_phi - mean_e)
  textbook = s.center + lse_finish(s.cand) - lse_finish(s.ref)
  use_textbook = (textbook + mean_e > _LARGE_KL) | ~jnp.isfinite(mean_e + small)
  return KLShift(s.center, jnp.where(use_textbook, textbook, small))


def _log1p_minus_x(x: Array) -> Array:
  """``log1p(x) - x`` by its Taylor series, for |x| <= 0.15 (truncation < 1e-10 relative)."""
  acc = jnp.zeros_like(x)
  for k in range(14, 1, -1):
    acc = acc * x + (-1.0)**(k + 1) / k
  return acc * x * x


def js_block(a: Array, b: Array, ref_lse: Array, cand_lse: Array, shift: KLShift) -> Array:
  """``a, b: [..., B]`` reference / candidate logits (``-inf`` where invalid), the full-vocabulary log-normalisers
  and ``kl_shift`` ``[...]`` -> this block's share ``[...]`` of JS(p, q) (see above)."""
  p, q = jnp.exp(a - ref_lse[..., None]), jnp.exp(b - cand_lse[..., None])
  both = (p > 0) & (q > 0)  # a mass that underflows (-inf, -1e9, finfo.min) leaves the other's alone, as in kl_block
  hi, lo = _two_diff(a, b)
  delta = jnp.where(both, -((hi - shift.center[..., None]) + lo) - shift.offset[..., None], 0.0)
  near = both & (jnp.abs(delta) <= 0.25)
  d = jnp.where(near, delta, 0.0)
  u, v = jnp.expm1(d), jnp.expm1(-d)
  close = -0.5 * p * (_log1p_minus_x(u / 2) + (1 + u) * _log1p_minus_x(v / 2))
  soft = jax.nn.softplus(jnp.where(both, delta, 0.0))
  log2 = jnp.log(2.0)
  far = 0.5 * (p * (log2 - soft) + q * (delta + log2 - soft))
  alone = 0.5 * log2 * jnp.where(a > -jnp.inf, p, 0.0) + 0.5 * log2 * jnp.where(b > -jnp.inf, q, 0.0)
  return jnp.sum(jnp.where(near, close, jnp.where(both, far, alone)), axis=-1)
