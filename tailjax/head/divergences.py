"""Full-vocabulary divergences between a frozen model and a trained one, differentiable in the trained one only:
KL(ref || cand) (as precise as ``tailjax.losses``), reverse KL and GKD's generalized Jensen-Shannon."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tailjax import online
from tailjax.head.blocks import (DEFAULT_BLOCK_SIZE, OutputHead, accumulate, block_logits, finish, flatten,
                                 reduce_blocks, split_head, vocab_pair, zero_grads)

Array = jax.Array


def _frozen_and_trained(frozen_hidden, frozen_unembedding, hidden, unembedding, temperature, vocab_size, block_size):
  """A frozen model's and a trained model's heads -> (leading shape, the kernels' arguments: the frozen side behind
  ``stop_gradient``, both ``[N, d]``, the vocabulary blocks, the (frozen, trained) logit forms)."""
  (frozen_unembedding, frozen_form), (unembedding, form) = (split_head(frozen_unembedding, temperature),
                                                            split_head(unembedding, temperature))
  lead, h_frozen, _ = flatten(frozen_hidden)
  _, h, _ = flatten(hidden)
  vocab = vocab_pair(frozen_unembedding, unembedding, vocab_size, block_size)
  return lead, (jax.lax.stop_gradient(h_frozen), jax.lax.stop_gradient(frozen_unembedding), h, unembedding, vocab,
                (frozen_form, form))


def _kl_state(ref_hidden, ref_unembedding, cand_hidden, cand_unembedding, vocab, forms) -> online.KLState:

  def block_state(b):
    a, _, _ = block_logits(ref_hidden, ref_unembedding, vocab, b, forms[0])
    c, _, _ = block_logits(cand_hidden, cand_unembedding, vocab, b, forms[1])
    return online.kl_block(a, c)

  return reduce_blocks(vocab, block_state, online.kl_merge)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _kl(ref_hidden, ref_unembedding, cand_hidden, cand_unembedding, vocab, forms):
  """``forms``: the (reference, candidate) ``Logits``."""
  return online.kl_finish(_kl_state(ref_hidden, ref_unembedding, cand_hidden, cand_unembedding, vocab, forms))


def _kl_fwd(ref_hidden, ref_unembedding, cand_hidden, cand_unembedding, vocab, forms):
  state = _kl_state(ref_hidden, ref_unembedding, cand_hidden, cand_unembedding, vocab, forms)
  lse = (online.lse_finish(state.ref), online.lse_finish(state.cand))
  return online.kl_finish(state), (ref_hidden, ref_unembedding, cand_hidden, cand_unembedding, lse)


def _kl_bwd(vocab, forms, residuals, g_kl):
  """dKL/dz_cand = q - p; the reference is held fixed (its cotangents are zero)."""
  ref_hidden, ref_unembedding, cand_hidden, cand_unembedding, (lse_ref, lse_cand) = residuals

  def step(b, grads):
    a, _, _ = block_logits(ref_hidden, ref_unembedding, vocab, b, forms[0])
    c, start, _ = block_logits(cand_hidden, cand_unembedding, vocab, b, forms[1])
    g_z = (jnp.exp(c - lse_cand[:, None]) - jnp.exp(a - lse_ref[:, None])) * g_kl[:, None]
    return accumulate(grads, cand_hidden, cand_unembedding, g_z * forms[1].slope(c), start, vocab)

  d_hidden, d_unembedding = jax.lax.fori_loop(0, vocab.count, step, zero_grads(cand_hidden, cand_unembedding))
  return (jnp.zeros_like(ref_hidden), jax.tree.map(jnp.zeros_like, ref_unembedding), d_hidden.astype(cand_hidden.dtype),
          d_unembedding.astype(cand_unembedding.dtype))


_kl.defvjp(_kl_fwd, _kl_bwd)


def kl_divergence(*, ref_hidden: Array, ref_unembedding: Array | OutputHead, cand_hidden: Array,
                  cand_unembedding: Array | OutputHead, temperature: float = 1.0, where: Array | None = None,
                  vocab_size: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE) -> Array:
  """``KL(softmax(ref / T) || softmax(cand / T))`` per token -> ``[..., T]``, precise as ``tailjax.losses``.

  Differentiable in the candidate (student) only: the reference is a frozen teacher
  and is treated as a constant (``stop_gradient``).
  """
  lead, args = _frozen_and_trained(ref_hidden, ref_unembedding, cand_hidden, cand_unembedding, temperature,
                                   vocab_size, block_size)
  return finish(lead, _kl(*args), where)


# Student-side divergences from a frozen teacher: reverse KL and generalized Jensen-Shannon.
#
# With p the teacher's and q the student's distribution, r = p (reverse KL) or r = m = beta p + (1 - beta) q
# (generalized JSD), the value is w E_q[log q / r] (+ beta E_p[log p / m] for the JSD) and its derivative in the
# student's logits is  w q_j (log(q_j / r_j) - E_q[log q / r])  with w = 1 (reverse KL) or 1 - beta (JSD): the
# teacher's term moves with q only through m, and those derivatives cancel. So the forward pass keeps
# E_q[log q / r] per token and the backward pass rebuilds each block of q and r from the two log-normalisers.


def _log_ratio(a, c, lse_t, lse_s, beta):
  """Block logits ``a`` (teacher), ``c`` (student) -> (log p, log q, log r), ``-inf`` where the block owns nothing."""
  lp, lq = a - lse_t[:, None], c - lse_s[:, None]
  lr = lp if beta is None else jnp.logaddexp(jnp.log(beta) + lp, jnp.log1p(-beta) + lq)
  return lp, lq, lr


def _expect(weights_log, x, y):
  """``sum exp(weights_log) * (x - y)`` over a block, 0 where the weight is 0 (owned columns only)."""
  w = jnp.exp(weights_log)
  return jnp.sum(jnp.where(w > 0, w * (x - y), 0.0), axis=-1)


def _student_state(t_hidden, t_unembedding, s_hidden, s_unembedding, vocab, forms, beta):
  """Two passes: the log-normalisers, then ``(E_p[log p / r], E_q[log q / r])`` per token."""

  def norms(b):
    a, _, _ = block_logits(t_hidden, t_unembedding, vocab, b, forms[0])
    c, _, _ = block_logits(s_hidden, s_unembedding, vocab, b, forms[1])
    return online.lse_block(a), online.lse_block(c)

  lse_t, lse_s = (online.lse_finish(x) for x in reduce_blocks(
      vocab, norms, lambda x, y: (online.lse_merge(x[0], y[0]), online.lse_merge(x[1], y[1]))))

  def terms(b):
    a, _, _ = block_logits(t_hidden, t_unembedding, vocab, b, forms[0])
    c, _, _ = block_logits(s_hidden, s_unembedding, vocab, b, forms[1])
    lp, lq, lr = _log_ratio(a, c, lse_t, lse_s, beta)
    return _expect(lp, lp, lr), _expect(lq, lq, lr)

  on_p, on_q = reduce_blocks(vocab, terms, lambda x, y: (x[0] + y[0], x[1] + y[1]))
  return (lse_t, lse_s), on_p, on_q


def _student_value(on_p, on_q, beta):
  return on_q if beta is None else beta * on_p + (1 - beta) * on_q


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _student_divergence(t_hidden, t_unembedding, s_hidden, s_unembedding, vocab, forms, beta):
  """Reverse KL (``beta`` None) or generalized JSD(``beta``) -> ``[N]`` (the section comment)."""
  _, on_p, on_q = _student_state(t_hidden, t_unembedding, s_hidden, s_unembedding, vocab, forms, beta)
  return _student_value(on_p, on_q, beta)


def _student_divergence_fwd(t_hidden, t_unembedding, s_hidden, s_unembedding, vocab, forms, beta):
  lse, on_p, on_q = _student_state(t_hidden, t_unembedding, s_hidden, s_unembedding, vocab, forms, beta)
  return _student_value(on_p, on_q, beta), (t_hidden, t_unembedding, s_hidden, s_unembedding, lse, on_q)


def _student_divergence_bwd(vocab, forms, beta, residuals, g):
  t_hidden, t_unembedding, s_hidden, s_unembedding, (lse_t, lse_s), on_q = residuals
  weight = 1.0 if beta is None else 1.0 - beta

  def step(b, grads):
    a, _, _ = block_logits(t_hidden, t_unembedding, vocab, b, forms[0])
    c, start, _ = block_logits(s_hidden, s_unembedding, vocab, b, forms[1])
    _, lq, lr = _log_ratio(a, c, lse_t, lse_s, beta)
    q = jnp.exp(lq)
    g_z = jnp.where(q > 0, weight * q * ((lq - lr) - on_q[:, None]), 0.0) * g[:, None]
    return accumulate(grads, s_hidden, s_unembedding, g_z * forms[1].slope(c), start, vocab)

  d_hidden, d_unembedding = jax.lax.fori_loop(0, vocab.count, step, zero_grads(s_hidden, s_unembedding))
  return (jnp.zeros_like(t_hidden), jax.tree.map(jnp.zeros_like, t_unembedding), d_hidden.astype(s_hidden.dtype),
          d_unembedding.astype(s_unembedding.dtype))


_student_divergence.defvjp(_student_divergence_fwd, _student_divergence_bwd)


def _from_teacher(teacher_hidden, teacher_unembedding, student_hidden, student_unembedding, temperature, where,
                  vocab_size, block_size, beta) -> Array:
  lead, args = _frozen_and_trained(teacher_hidden, teacher_unembedding, student_hidden, student_unembedding,
                                   temperature, vocab_size, block_size)
  return finish(lead, _student_divergence(*args, beta), where)


def reverse_kl_divergence(*, teacher_hidden: Array, teacher_unembedding: Array | OutputHead, student_hidden: Array,
                          student_unembedding: Array | OutputHead, temperature: float = 1.0, where: Array | None = None,
                          vocab_size: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE) -> Array:
  """``KL(q || p)`` per token, q the student's ``softmax(z / T)``, p the teacher's -> ``[..., T]`` (mode-seeking:
  the student is penalised for mass where the teacher has little). Differentiable in the student only, blockwise
  both ways; float32 sums (a training objective; the precise KL of evaluation is ``kl_divergence``)."""
  return _from_teacher(teacher_hidden, teacher_unembedding, student_hidden, student_unembedding, temperature, where,
                       vocab_size, block_size, None)


def jensen_shannon(*, teacher_hidden: Array, teacher_unembedding: Array | OutputHead,
                               student_hidden: Array, student_unembedding: Array | OutputHead, beta: float,
                               temperature: float = 1.0, where: Array | None = None, vocab_size: int | None = None,
                               block_size: int = DEFAULT_BLOCK_SIZE) -> Array:
  """``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``, per token -> ``[..., T]`` (GKD's
  generalized JSD, Agarwal et al. 2024: near forward KL as beta -> 0, near reverse KL as beta -> 1, once divided
  by its scale; 0.5 is the symmetric Jensen-Shannon). Differentiable in the student only, blockwise."""
  if not 0 < beta < 1:
    raise ValueError(f"beta={beta}: the generalized Jensen-Shannon divergence needs 0 < beta < 1")
  return _from_teacher(teacher_hidden, teacher_unembedding, student_hidden, student_unembedding, temperature, where,
                       vocab_size, block_size, float(beta))
