"""Per-token losses and fidelity measures on materialized logits.

Every function takes logits shaped ``[..., T, V]`` (bfloat16, float16 and float32 are
computed in float32; float64 stays float64), returns one value per token shaped ``[..., T]``, and accepts a
boolean ``where: [..., T]`` mask: masked tokens give 0. All are pure ``jnp`` and
safe under ``jit``, ``vmap`` and ``grad``.

Functions of two distributions take both by keyword only, named by role: ``ref_logits`` (the reference, the
distribution a KL is taken from) and ``cand_logits`` (the candidate) for evaluation; ``teacher`` and
``student_logits`` for top-K distillation. ``tailjax.head`` follows the same rule, so a caller cannot swap
them silently.

``vocab_size`` declares the true vocabulary when a model pads its unembedding
(e.g. Qwen2's 152064 rows for 151936 tokens): logits are sliced to it. Two models
whose vocabularies differ otherwise cannot be compared and raise ``ValueError``.

For the same quantities without ever holding ``[tokens, vocab]`` logits, see
``tailjax.head``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from tailjax import online

Array = jax.Array
TopKNormalization = Literal["full", "topk", "tail"]


class TopK(NamedTuple):
  """A teacher's top-K next-token distribution, as cached for distillation.

  ids: ``[..., T, K]`` int32 token ids, most probable first.
  logprobs: ``[..., T, K]`` float32 log-probabilities under the teacher's *full*
    vocabulary normalizer (at the distillation temperature), so that
    ``1 - sum(exp(logprobs))`` is the teacher's mass outside the top K.
  """

  ids: Array
  logprobs: Array


def slice_vocab(logits: Array, vocab_size: int | None, name: str = "logits") -> Array:
  """``[..., V_padded]`` -> ``[..., vocab_size]`` in at least float32; error if the model has fewer ids."""
  logits = jnp.asarray(logits)
  if vocab_size is not None:
    if logits.shape[-1] < vocab_size:
      raise ValueError(f"{name} have {logits.shape[-1]} vocabulary entries, fewer than the declared "
                       f"vocab_size={vocab_size}")
    logits = logits[..., :vocab_size]
  return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def match_vocab(*, ref_logits: Array, cand_logits: Array, vocab_size: int | None = None) -> tuple[Array, Array]:
  """Slices two models' logits to one vocabulary, or explains why they cannot share one."""
  v_ref, v_cand = jnp.shape(ref_logits)[-1], jnp.shape(cand_logits)[-1]
  if vocab_size is None and v_ref != v_cand:
    raise ValueError(f"vocabulary mismatch: reference has {v_ref} entries, candidate has {v_cand}; "
                     "if one is only padded, pass the true vocab_size to slice both")
  return slice_vocab(ref_logits, vocab_size, "reference logits"), slice_vocab(
      cand_logits, vocab_size, "candidate logits")


@jax.custom_jvp
def _kl(a: Array, b: Array) -> Array:
  """Precise ``KL(softmax(a) || softmax(b))`` over the last axis, with exact derivatives.

  Differentiating the precise forward formula would only add rounding noise; the
  closed forms are ``dKL/db = q - p`` and ``dKL/da = p (log p - log q - KL)``.
  """
  return online.kl_finish(online.kl_block(a, b))


@_kl.defjvp
def _kl_jvp(primals, tangents):
  a, b = primals
  da, db = tangents
  kl = _kl(a, b)
  log_p, log_q = jax.nn.log_softmax(a, axis=-1), jax.nn.log_softmax(b, axis=-1)
  p, q = jnp.exp(log_p), jnp.exp(log_q)
  d_a = jnp.where(p > 0, p * (log_p - log_q - kl[..., None]), 0.0)
  return kl, jnp.sum(d_a * da, axis=-1) + jnp.sum((q - p) * db, axis=-1)


def _masked(values: Array, where: Array | None) -> Array:
  return values if where is None else jnp.where(where, values, 0.0)


def _take(values: Array, ids: Array) -> Array:
  """``values: [..., V]``, ``ids: [...]`` or ``[..., K]`` -> the values at ``ids``."""
  squeeze = ids.ndim == values.ndim - 1
  ids = ids[..., None] if squeeze else ids
  out = jnp.take_along_axis(values, ids.astype(jnp.int32), axis=-1)
  return out[..., 0] if squeeze else out


def cross_entropy(logits: Array, targets: Array, *, where: Array | None = None,
                  vocab_size: int | None = None) -> Array:
  """``-log softmax(logits)[target]``.

  Args:
    logits: ``[..., T, V]``.
    targets: ``[..., T]`` integer token ids.
  Returns:
    ``[..., T]`` nats.
  """
  logits = slice_vocab(logits, vocab_size)
  lse = online.lse_finish(online.lse_block(logits))
  return _masked(lse - _take(logits, targets), where)


def kl_divergence(*, ref_logits: Array, cand_logits: Array, where: Array | None = None,
                  vocab_size: int | None = None) -> Array:
  """``KL(softmax(ref) || softmax(cand))`` per token, never negative.

  Accurate to float32 relative precision down to 1e-8 and below (see
  ``tailjax.online``), where the textbook formula returns rounding noise.

  Args:
    ref_logits, cand_logits: ``[..., T, V]``.
  Returns:
    ``[..., T]`` nats.
  """
  a, b = match_vocab(ref_logits=ref_logits, cand_logits=cand_logits, vocab_size=vocab_size)
  return _masked(_kl(a, b), where)


def reverse_kl_divergence(*, ref_logits: Array, cand_logits: Array, where: Array | None = None,
               vocab_size: int | None = None) -> Array:
  """``KL(softmax(cand) || softmax(ref))``: mode-seeking; shapes as ``kl_divergence``."""
  return kl_divergence(ref_logits=cand_logits, cand_logits=ref_logits, where=where, vocab_size=vocab_size)


def jensen_shannon(*, ref_logits: Array, cand_logits: Array, beta: float = 0.5, where: Array | None = None,
                   vocab_size: int | None = None) -> Array:
  """Skewed Jensen-Shannon divergence ``beta KL(p||m) + (1-beta) KL(q||m)``, ``m = beta p + (1-beta) q``.

  Bounded by ``log 2`` at ``beta = 0.5``; shapes as ``kl_divergence``.
  """
  if not 0.0 < beta < 1.0:
    raise ValueError(f"beta must lie in (0, 1), got {beta}")
  a, b = match_vocab(ref_logits=ref_logits, cand_logits=cand_logits, vocab_size=vocab_size)
  log_p, log_q = jax.nn.log_softmax(a, axis=-1), jax.nn.log_softmax(b, axis=-1)
  log_m = jnp.logaddexp(jnp.log(beta) + log_p, jnp.log1p(-beta) + log_q)
  js = beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
  return _masked(js, where)


def top1_agreement(*, ref_logits: Array, cand_logits: Array, where: Array | None = None,
                   vocab_size: int | None = None) -> Array:
  """1.0 where both models' arg-max token is the same, else 0.0 (ties: lowest id wins in each)."""
  a, b = match_vocab(ref_logits=ref_logits, cand_logits=cand_logits, vocab_size=vocab_size)
  same = jnp.argmax(a, axis=-1) == jnp.argmax(b, axis=-1)
  return _masked(same.astype(jnp.float32), where)


def target_logprob_delta(*, ref_logits: Array, cand_logits: Array, targets: Array, where: Array | None = None,
                         vocab_size: int | None = None) -> Array:
  """``log p_cand(target) - log p_ref(target)``: the *direction* of a disagreement.

  KLD measures how much two distributions differ; this says whether the candidate
  moved probability towards (> 0) or away from (< 0) the token that actually came.
  """
  a, b = match_vocab(ref_logits=ref_logits, cand_logits=cand_logits, vocab_size=vocab_size)
  return _masked(cross_entropy(a, targets) - cross_entropy(b, targets), where)


def teacher_topk(teacher_logits: Array, k: int, *, temperature: float = 1.0,
                 vocab_size: int | None = None) -> TopK:
  """``[..., T, V]`` teacher logits -> its top-``k`` ids and full-vocabulary log-probs at ``temperature``."""
  logits = slice_vocab(teacher_logits, vocab_size, "teacher logits") / temperature
  if not 0 < k <= logits.shape[-1]:
    raise ValueError(f"k={k} must lie in [1, {logits.shape[-1]}] (the teacher's vocabulary)")
  values, ids = jax.lax.top_k(logits, k)
  return TopK(ids.astype(jnp.int32), values - online.lse_finish(online.lse_block(logits))[..., None])


def topk_kl_from_logprobs(*, teacher: TopK, student_topk_logprobs: Array,
                          normalization: TopKNormalization = "full") -> Array:
  """Top-K KL from the teacher's and the student's log-probs at the teacher's top-K ids.

  With ``l`` the teacher's top-K log-probs (mass ``M = sum exp(l)``), ``p^ = exp(l) / M``
  the renormalized teacher, ``lq`` the student's full-vocabulary log-probs at the same
  ids (mass ``Q``) and ``q^ = exp(lq) / Q``:

  - ``"full"`` (the paper's form): ``sum_i p^_i (log p^_i - lq_i) = KL(p^ || q^) - log Q``.
    The student's full softmax is the model; mass it puts outside the top K only
    enters through ``Q``.
  - ``"topk"``: ``KL(p^ || q^)``: the student is renormalized over the same K ids and
    is free outside them.
  - ``"tail"``: KL over K + 1 buckets, the K ids plus one bucket holding everything
    else (``1 - M`` against ``1 - Q``), with the teacher *not* renormalized.

  The three agree in the limit ``K = V``, where they equal the full KL. By the chain rule
  of KL, the full KL equals ``"tail"`` plus the mass-weighted KL inside the tail.

  Args:
    teacher: ``TopK`` with ``[..., K]`` fields.
    student_topk_logprobs: ``[..., K]``.
  Returns:
    ``[...]`` nats, never negative.
  """
  l = slice_vocab(teacher.logprobs, None)
  lq = slice_vocab(student_topk_logprobs, None)
  if normalization == "tail":
    l_tail = _log1mexp(online.lse_finish(online.lse_block(l)))
    lq_tail = _log1mexp(online.lse_finish(online.lse_block(lq)))
    l = jnp.concatenate([l, l_tail[..., None]], axis=-1)
    lq = jnp.concatenate([lq, lq_tail[..., None]], axis=-1)
  kl = _kl(l, lq)
  if normalization == "full":
    kl = kl + jnp.maximum(-online.lse_finish(online.lse_block(lq)), 0.0)
  elif normalization not in ("topk", "tail"):
    raise ValueError(f"normalization must be 'full', 'topk' or 'tail', got {normalization!r}")
  return kl


def _log1mexp(x: Array) -> Array:
  """``log(1 - exp(x))`` for ``x <= 0``, accurate at both ends (Maechler 2012)."""
  x = jnp.minimum(x, 0.0)
  return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def topk_kl_divergence(*, student_logits: Array, teacher: Array | TopK, k: int | None = None,
                       normalization: TopKNormalization = "full", temperature: float = 1.0,
                       where: Array | None = None, vocab_size: int | None = None) -> Array:
  """Top-K renormalized KL for distillation (see ``topk_kl_from_logprobs`` for the math).

  Args:
    student_logits: ``[..., T, V]``.
    teacher: ``[..., T, V]`` teacher logits (then ``k`` is required), or a cached ``TopK``
      computed at the same ``temperature``.
    normalization: ``"full"`` (default, the paper's), ``"topk"`` or ``"tail"``.
    temperature: divides both models' logits. The customary ``temperature**2`` gradient
      scale is left to the caller.
  Returns:
    ``[..., T]`` nats.
  """
  if not isinstance(teacher, TopK):
    if k is None:
      raise ValueError("k is required when the teacher is given as logits")
    teacher = teacher_topk(teacher, k, temperature=temperature, vocab_size=vocab_size)
  student = slice_vocab(student_logits, vocab_size, "student logits") / temperature
  student_logprobs = student - online.lse_finish(online.lse_block(student))[..., None]
  kl = topk_kl_from_logprobs(teacher=teacher, student_topk_logprobs=_take(student_logprobs, teacher.ids),
                             normalization=normalization)
  return _masked(kl, where)
