"""Evaluation and teacher extraction, no gradients: every per-token statistic of ``tailjax eval`` for several
candidates against one reference in one pass over the vocabulary (``candidates_token_stats``), and a teacher's
top-K (``teacher_topk``)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tailjax import online
from tailjax.head.blocks import (DEFAULT_BLOCK_SIZE, STATS_BLOCK_SIZE, OutputHead, block_logits, finish, flatten,
                                 gather_owned, reduce_blocks, split_head, vocab_blocks, vocab_pair)
from tailjax.losses import TopK

Array = jax.Array


OVERLAP_K = 10  # the widest top-K overlap reported (top-5 and top-10)


class TokenStats(NamedTuple):
  """Everything ``tailjax eval`` needs per token, from one pass over the vocabulary; each ``[..., T]``."""

  kld: Array  # KL(ref || cand)
  ref_ce: Array  # -log p_ref(target)
  cand_ce: Array  # -log p_cand(target)
  top1_agreement: Array  # 1.0 where both arg-max tokens agree
  logprob_delta: Array  # log p_cand(target) - log p_ref(target)
  ref_top1_prob: Array  # p_ref of its own arg-max token: how confident the reference is
  # From a model reference only (None against stored log-probs):
  reverse_kld: Array | None = None  # KL(cand || ref), as precise as kld
  ref_entropy: Array | None = None  # H(p_ref)
  top5_overlap: Array | None = None  # |top-5(ref) ∩ top-5(cand)| / 5 (ties: the lower token id ranks first)
  top10_overlap: Array | None = None  # |top-10(ref) ∩ top-10(cand)| / 10
  top1_in_top5: Array | None = None  # 1.0 where the reference's top-1 is among the candidate's top 5
  jensen_shannon: Array | None = None  # JS(p_ref, p_cand) in nats, when asked: a second pass (online.js_block)


class CandidatesStats(NamedTuple):
  """What one vocabulary pass gives (``candidates_token_stats``): each candidate's ``TokenStats``, in order, and
  the reference's top-K (``reference_topk``: ids and log-probs, ``[..., T, k]``) when asked, else None."""

  candidates: list[TokenStats]
  reference_topk: TopK | None = None


def token_stats(*, ref_hidden: Array, ref_unembedding: Array | OutputHead, cand_hidden: Array,
                cand_unembedding: Array | OutputHead, targets: Array, where: Array | None = None,
                vocab_size: int | None = None, block_size: int = STATS_BLOCK_SIZE,
                jensen_shannon: bool = False) -> TokenStats:
  """KLD, both CEs, top-1 agreement, the target log-prob delta and the reference's top-1 probability, in one
  pass over the vocabulary (``candidates_token_stats``)."""
  (stats,) = candidates_token_stats(ref_hidden=ref_hidden, ref_unembedding=ref_unembedding,
                                    candidates=[(cand_hidden, cand_unembedding)], targets=targets, where=where,
                                    vocab_size=vocab_size, block_size=block_size,
                                    jensen_shannon=jensen_shannon).candidates
  return stats


def candidates_token_stats(*, ref_hidden: Array, ref_unembedding: Array | OutputHead,
                           candidates: list[tuple[Array, Array | OutputHead]],
                           targets: Array, where: Array | None = None, vocab_size: int | None = None,
                           block_size: int = STATS_BLOCK_SIZE, reference_topk: int | None = None,
                           jensen_shannon: bool = False) -> CandidatesStats:
  """``token_stats`` of each ``(hidden, unembedding)`` candidate, all in one pass over the vocabulary.

  Each block of the reference's logits is computed once, however many candidates share it.
  With ``reference_topk=k`` the same pass also keeps the reference's top-``k`` (what ``teacher_topk`` returns, for
  ``tailjax.eval.reference_cache``) in ``CandidatesStats.reference_topk``.
  ``jensen_shannon``: also JS(p_ref, p_cand), from a second pass (the mixture needs both normalisers first):
  the logits are computed twice.
  """
  if not candidates:
    raise ValueError("candidates_token_stats needs at least one (hidden, unembedding) candidate")
  k = reference_topk or 0
  ref_unembedding, ref_form = split_head(ref_unembedding)
  lead, h_ref, (t,) = flatten(ref_hidden, targets)
  cands = [(flatten(h)[1], *split_head(u)) for h, u in candidates]
  vocab, *_ = [vocab_pair(ref_unembedding, u, vocab_size, block_size, min_block=k) for _, u, _ in cands]
  if reference_topk is not None and not 0 < k <= vocab.size:
    raise ValueError(f"reference_topk={k} must lie in [1, {vocab.size}] (the vocabulary)")
  ids = t.astype(jnp.int32)[:, None]

  top_k = max(k, OVERLAP_K)  # the reference's top-k serves the cache and the overlaps

  def block_state(b):
    a, start, _ = block_logits(h_ref, ref_unembedding, vocab, b, ref_form)
    per_cand = []
    for h, u, form in cands:
      c, _, _ = block_logits(h, u, vocab, b, form)
      target = gather_owned(c, ids, start, vocab, b)[:, 0]
      per_cand.append((online.kl_block(a, c), online.argmax_block(c, start), target, online.kl_block(c, a),
                       _topk_block(c, start, OVERLAP_K)))
    ref = (online.argmax_block(a, start), gather_owned(a, ids, start, vocab, b)[:, 0], online.entropy_block(a),
           _topk_block(a, start, top_k))
    return ref, per_cand

  def merge(s, t):
    per_cand = [(online.kl_merge(x[0], y[0]), online.argmax_merge(x[1], y[1]), x[2] + y[2],
                 online.kl_merge(x[3], y[3]), _topk_merge(x[4], y[4], OVERLAP_K)) for x, y in zip(s[1], t[1])]
    (arg_s, target_s, entropy_s, top_s), (arg_t, target_t, entropy_t, top_t) = s[0], t[0]
    return (online.argmax_merge(arg_s, arg_t), target_s + target_t, online.entropy_merge(entropy_s, entropy_t),
            _topk_merge(top_s, top_t, top_k)), per_cand

  (arg_ref, target_ref, entropy, top), per_cand = reduce_blocks(vocab, block_state, merge)
  ref_ids = top[1][:, :OVERLAP_K]
  ref_lse = online.lse_finish(entropy.lse)  # the reference's normaliser, once for every candidate
  ref_ce, confidence = ref_lse - target_ref, jnp.exp(arg_ref.value - ref_lse)
  ref_entropy = online.entropy_finish(entropy)
  js = [None] * len(cands)
  if jensen_shannon:
    finished = [(online.lse_finish(x[0].cand), online.kl_shift(x[0])) for x in per_cand]

    def js_state(b):
      a, _, _ = block_logits(h_ref, ref_unembedding, vocab, b, ref_form)
      return [online.js_block(a, block_logits(h, u, vocab, b, form)[0], ref_lse, lse, shift)
              for (h, u, form), (lse, shift) in zip(cands, finished)]

    js = reduce_blocks(vocab, js_state, lambda s, t: [x + y for x, y in zip(s, t)])
  stats = []
  for (kl, arg_cand, target_cand, reverse, (_, cand_ids)), js_cand in zip(per_cand, js):
    cand_ce = online.lse_finish(kl.cand) - target_cand
    agree = (arg_ref.index == arg_cand.index).astype(jnp.float32)
    shared = lambda n: jnp.sum(jnp.any(ref_ids[:, :n, None] == cand_ids[:, None, :n], axis=-1), axis=-1) / n
    top1_in_top5 = jnp.any(cand_ids[:, :5] == ref_ids[:, :1], axis=-1).astype(jnp.float32)
    values = (online.kl_finish(kl), ref_ce, cand_ce, agree, ref_ce - cand_ce, confidence, online.kl_finish(reverse),
              ref_entropy, shared(5), shared(OVERLAP_K), top1_in_top5, js_cand)
    stats.append(TokenStats(*(None if v is None else finish(lead, v, where) for v in values)))
  if not k:
    return CandidatesStats(stats)
  values, top_ids = top[0][:, :k], top[1][:, :k]
  logprobs = values - ref_lse[:, None]
  return CandidatesStats(stats, TopK(jnp.reshape(top_ids, lead + (k,)), jnp.reshape(logprobs, lead + (k,))))


def _topk_block(z: Array, start: Array, k: int) -> tuple[Array, Array]:
  """``[N, block]`` logits -> their top-``k`` (values, global ids); a block narrower than ``k`` is padded with
  ``-inf`` at id -1, which every real id outranks."""
  width = z.shape[-1]
  if width < k:
    z = jnp.pad(z, ((0, 0), (0, k - width)), constant_values=-jnp.inf)
  values, local = jax.lax.top_k(z, k)
  return values, jnp.where(local < width, local.astype(jnp.int32) + start, -1)


def _topk_merge(s: tuple[Array, Array], t: tuple[Array, Array], k: int) -> tuple[Array, Array]:
  """Top-``k`` of two blocks' top-``k``; ``t`` holds later ids, so ties keep ``s`` (lower ids) first."""
  values, pos = jax.lax.top_k(jnp.concatenate([s[0], t[0]], axis=-1), k)
  return values, jnp.take_along_axis(jnp.concatenate([s[1], t[1]], axis=-1), pos, axis=-1)


def teacher_topk(hidden: Array, unembedding: Array | OutputHead, k: int, *, temperature: float = 1.0,
                 vocab_size: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE) -> TopK:
  """A teacher's top-``k`` ids and full-vocabulary log-probs -> ``TopK`` with ``[..., T, k]`` fields."""
  unembedding, form = split_head(unembedding, temperature)
  lead, h, _ = flatten(hidden)
  vocab = vocab_blocks(unembedding, vocab_size, block_size, min_block=k)
  if not 0 < k <= vocab.size:
    raise ValueError(f"k={k} must lie in [1, {vocab.size}] (the teacher's vocabulary)")

  def block_state(b):
    z, start, _ = block_logits(h, unembedding, vocab, b, form)
    return online.lse_block(z), _topk_block(z, start, k)

  lse_state, (values, ids) = reduce_blocks(
      vocab, block_state, lambda s, t: (online.lse_merge(s[0], t[0]), _topk_merge(s[1], t[1], k)))
  logprobs = values - online.lse_finish(lse_state)[:, None]
  return TopK(jnp.reshape(ids, lead + (k,)), jnp.reshape(logprobs, lead + (k,)))
