"""Log-probabilities at chosen ids, blockwise both ways: a token's cross-entropy (the target), top-K KL (the teacher's
ids), and evaluation's log-probs with the arg-max in the same pass."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tailjax import losses, online
from tailjax.head.blocks import (DEFAULT_BLOCK_SIZE, Logits, OutputHead, Vocab, accumulate, block_logits, finish,
                                 flatten, gather_owned, reduce_blocks, split_head, vocab_blocks, zero_grads)
from tailjax.losses import TopK, TopKNormalization

Array = jax.Array


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gathered_logprobs(hidden: Array, unembedding: Array, ids: Array, vocab: Vocab, form: Logits) -> Array:
  """``log_softmax(form(hidden @ unembedding))`` at ``ids: [N, K]`` -> ``[N, K]``."""
  return _gathered_logprobs_fwd(hidden, unembedding, ids, vocab, form)[0]


def _logprobs_pass(hidden, unembedding, ids, vocab, form, argmax: bool):
  """One pass: (``[N, K]`` log-probs at ``ids``, ``[N]`` log-sum-exp, ``[N]`` arg-max id or None)."""

  def block_state(b):
    z, start, _ = block_logits(hidden, unembedding, vocab, b, form)
    arg = online.argmax_block(z, start) if argmax else None
    return online.lse_block(z), gather_owned(z, ids, start, vocab, b), arg

  def merge(s, t):
    return online.lse_merge(s[0], t[0]), s[1] + t[1], online.argmax_merge(s[2], t[2]) if argmax else None

  lse_state, picked, arg = reduce_blocks(vocab, block_state, merge)
  lse = online.lse_finish(lse_state)
  return picked - lse[:, None], lse, None if arg is None else arg.index


def _gathered_logprobs_fwd(hidden, unembedding, ids, vocab, form):
  logprobs, lse, _ = _logprobs_pass(hidden, unembedding, ids, vocab, form, argmax=False)
  return logprobs, (hidden, unembedding, ids, lse)


def _gathered_logprobs_bwd(vocab, form, residuals, g_logprobs):
  """d/dz_v of ``sum_k G_k (z_{id_k} - lse(z))`` is ``G`` scattered to the ids minus ``q_v sum_k G_k``."""
  hidden, unembedding, ids, lse = residuals
  n = hidden.shape[0]
  g_total = jnp.sum(g_logprobs, axis=-1, keepdims=True)

  def step(b, grads):
    z, start, _ = block_logits(hidden, unembedding, vocab, b, form)
    q = jnp.exp(z - lse[:, None])
    local = ids - start
    owned = (ids >= b * vocab.block) & (local < vocab.block)
    g_z = (-q * g_total).at[jnp.arange(n)[:, None], jnp.clip(local, 0, vocab.block - 1)].add(
        jnp.where(owned, g_logprobs, 0.0))
    return accumulate(grads, hidden, unembedding, g_z * form.slope(z), start, vocab)

  d_hidden, d_unembedding = jax.lax.fori_loop(0, vocab.count, step, zero_grads(hidden, unembedding))
  return d_hidden.astype(hidden.dtype), d_unembedding.astype(unembedding.dtype), None


_gathered_logprobs.defvjp(_gathered_logprobs_fwd, _gathered_logprobs_bwd)


def cross_entropy(hidden: Array, unembedding: Array | OutputHead, targets: Array, *, where: Array | None = None,
                  vocab_size: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE) -> Array:
  """``-log softmax(hidden @ unembedding)[target]`` -> ``[..., T]``; differentiable, blockwise both ways."""
  unembedding, form = split_head(unembedding)
  lead, h, (t,) = flatten(hidden, targets)
  vocab = vocab_blocks(unembedding, vocab_size, block_size)
  logprobs = _gathered_logprobs(h, unembedding, t.astype(jnp.int32)[:, None], vocab, form)
  return finish(lead, -logprobs[:, 0], where)


def logprobs_and_argmax(hidden: Array, unembedding: Array | OutputHead, ids: Array, *,
                        vocab_size: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[Array, Array]:
  """``log_softmax(hidden @ unembedding)`` at ``ids: [..., T, K]`` -> ``[..., T, K]``, and the arg-max id
  ``[..., T]`` (first of ties), in one pass over the vocabulary. For evaluation: no custom gradient."""
  unembedding, form = split_head(unembedding)
  lead, h, (i,) = flatten(hidden, ids)
  vocab = vocab_blocks(unembedding, vocab_size, block_size)
  logprobs, _, argmax = _logprobs_pass(h, unembedding, i.astype(jnp.int32), vocab, form, argmax=True)
  return jnp.reshape(logprobs, lead + i.shape[-1:]), jnp.reshape(argmax, lead)


def topk_kl_divergence(*, student_hidden: Array, student_unembedding: Array | OutputHead, teacher: TopK,
                       normalization: TopKNormalization = "full", temperature: float = 1.0,
                       where: Array | None = None, vocab_size: int | None = None,
                       block_size: int = DEFAULT_BLOCK_SIZE) -> Array:
  """Top-K KL of a student against a cached teacher ``TopK`` (see ``tailjax.losses``) -> ``[..., T]``.

  Differentiable in the student's hidden states and unembedding, blockwise both ways.
  """
  student_unembedding, form = split_head(student_unembedding, temperature)
  lead, h, (ids, teacher_logprobs) = flatten(student_hidden, teacher.ids, teacher.logprobs)
  vocab = vocab_blocks(student_unembedding, vocab_size, block_size)
  student_logprobs = _gathered_logprobs(h, student_unembedding, ids.astype(jnp.int32), vocab, form)
  kl = losses.topk_kl_from_logprobs(teacher=TopK(ids, teacher_logprobs), student_topk_logprobs=student_logprobs,
                                    normalization=normalization)
  return finish(lead, kl, where)
