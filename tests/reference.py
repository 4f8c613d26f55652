"""Float64 NumPy/SciPy references that the JAX code is checked against."""

import numpy as np
from scipy.special import log_softmax, logsumexp


def f64(x) -> np.ndarray:
  return np.asarray(x, dtype=np.float64)


def cross_entropy(logits, targets):
  lp = log_softmax(f64(logits), axis=-1)
  return -np.take_along_axis(lp, np.asarray(targets)[..., None], axis=-1)[..., 0]


def kl(ref_logits, cand_logits):
  """KL(softmax(ref) || softmax(cand)); exact up to float64 rounding on the given (float32) logits."""
  lp, lq = log_softmax(f64(ref_logits), axis=-1), log_softmax(f64(cand_logits), axis=-1)
  p = np.exp(lp)
  return np.sum(np.where(p > 0, p * (lp - lq), 0.0), axis=-1)


def kl_probs(p, q):
  p, q = f64(p), f64(q)
  return np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - np.log(q)), 0.0), axis=-1)


def jensen_shannon(ref_logits, cand_logits, beta):
  lp, lq = log_softmax(f64(ref_logits), -1), log_softmax(f64(cand_logits), -1)
  lm = np.logaddexp(np.log(beta) + lp, np.log1p(-beta) + lq)
  kl_to_m = lambda l: np.sum(np.exp(l) * (l - lm), axis=-1)
  return beta * kl_to_m(lp) + (1 - beta) * kl_to_m(lq)


def topk_kl(student_logits, teacher_logits, k, normalization, temperature=1.0):
  """The three top-K KL forms, written directly from their definitions over probabilities."""
  lp = log_softmax(f64(teacher_logits) / temperature, axis=-1)
  lq = log_softmax(f64(student_logits) / temperature, axis=-1)
  ids = np.argsort(-lp, axis=-1, kind="stable")[..., :k]
  p_k, q_k = np.exp(np.take_along_axis(lp, ids, -1)), np.exp(np.take_along_axis(lq, ids, -1))
  mass_p, mass_q = p_k.sum(-1, keepdims=True), q_k.sum(-1, keepdims=True)
  if normalization == "full":
    p_hat = p_k / mass_p
    return np.sum(p_hat * (np.log(p_hat) - np.log(q_k)), axis=-1)
  if normalization == "topk":
    return kl_probs(p_k / mass_p, q_k / mass_q)
  assert normalization == "tail"
  return kl_probs(np.concatenate([p_k, 1 - mass_p], -1), np.concatenate([q_k, 1 - mass_q], -1))


def lse(x, axis=-1):
  return logsumexp(f64(x), axis=axis)


def attention(q, k, v, mask):
  """Softmax attention, grouped query heads: ``q: [B, T, H, d]``, ``k, v: [B, S, K, d]``, ``mask: [B, T, S]``."""
  q, k, v = f64(q), f64(k), f64(v)
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  scores = np.where(np.asarray(mask)[:, None], scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  return np.einsum("bhts,bshd->bthd", p / p.sum(-1, keepdims=True), v)
