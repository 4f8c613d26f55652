"""Per-token losses from hidden states and the unembedding, blockwise over the vocabulary.

A model's logits ``hidden @ unembedding`` are ``[tokens, vocab]``: 8192 tokens of a
152k vocabulary are 5 GB in float32, more than the model. Here the vocabulary is
scanned in blocks of ``block_size`` columns; each block's logits live only inside
one scan step and feed the mergeable states of ``tailjax.online``. Peak temporary
memory is ``[tokens, block_size]``, whatever the vocabulary.

Shapes: ``hidden: [..., T, d]``; ``unembedding: [d, V]``, or for a tied embedding
``EmbeddingRows(embedding)``: the ``[V, d]`` rows read block by block, never transposed
whole (a transposed ``[d, V]`` copy is a vocabulary matrix more in memory: 113 MB per
SmolLM2 model in float32, 1.3 GB per Gemma-3-4B in bfloat16); ``targets``/``where``: ``[..., T]``. Results are
float32 ``[..., T]`` and match ``tailjax.losses`` on the materialized logits to
float32 rounding. ``vocab_size`` restricts a padded unembedding to the true
vocabulary. Wherever an unembedding is taken, an ``OutputHead`` may stand instead: the
unembedding with the model's final-logit soft-cap (Gemma 2: logits ``c * tanh(z / c)``),
applied to every block before any softmax, in the forward and the backward pass.

Two models are passed by keyword only, as in ``tailjax.losses``: ``ref_hidden`` / ``ref_unembedding`` and
``cand_hidden`` / ``cand_unembedding``; ``student_hidden`` / ``student_unembedding`` against a ``teacher``.

Training paths have custom VJPs whose backward passes are blockwise too: the
gradient never materializes ``[tokens, vocab]`` either.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from tailjax import losses, online
from tailjax.losses import TopK, TopKNormalization

Array = jax.Array

DEFAULT_BLOCK_SIZE = 4096
# The eval pass (``candidates_token_stats``) keeps about fourteen block-wide arrays alive per step (two KL states
# per candidate, the reference's entropy, three top-10s): at 1024 columns its temporaries stay below the plain
# KL's at 4096. Measured on the SmolLM2 eval step (3 models, 4 x 512 tokens, CPU): 480 MB at 4096, 248 at 2048,
# 170 at 1024, the same time (7.0 s) at each.
STATS_BLOCK_SIZE = 1024


@struct.dataclass
class EmbeddingRows:
  """A tied model's unembedding as its embedding's rows, ``[V, d]``: it stands for the ``[d, V]`` transpose
  (``shape``, ``ndim`` and ``dtype`` are the transpose's) and blocks of it are cut from the rows."""

  rows: Array  # [V, d]

  @property
  def shape(self) -> tuple[int, int]:
    return self.rows.shape[::-1]

  @property
  def ndim(self) -> int:
    return self.rows.ndim

  @property
  def dtype(self):
    return self.rows.dtype

  def astype(self, dtype) -> EmbeddingRows:
    return EmbeddingRows(self.rows.astype(dtype))


def _columns(unembedding: Array | EmbeddingRows, start: Array, size: int) -> Array:
  """Columns ``[start, start + size)`` of the ``[d, V]`` unembedding -> ``[d, size]``."""
  if isinstance(unembedding, EmbeddingRows):
    return jax.lax.dynamic_slice_in_dim(unembedding.rows, start, size, axis=0).T
  return jax.lax.dynamic_slice_in_dim(unembedding, start, size, axis=1)


def _add_columns(grad: Array | EmbeddingRows, start: Array, block: Array) -> Array | EmbeddingRows:
  """``grad[:, start:start + size] += block`` (``block: [d, size]``), in ``grad``'s own layout."""
  if isinstance(grad, EmbeddingRows):
    rows = jax.lax.dynamic_slice_in_dim(grad.rows, start, block.shape[1], axis=0) + block.T
    return EmbeddingRows(jax.lax.dynamic_update_slice_in_dim(grad.rows, rows, start, axis=0))
  cols = jax.lax.dynamic_slice_in_dim(grad, start, block.shape[1], axis=1) + block
  return jax.lax.dynamic_update_slice_in_dim(grad, cols, start, axis=1)


def _zeros(unembedding: Array | EmbeddingRows) -> Array | EmbeddingRows:
  return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), unembedding)


@struct.dataclass
class OutputHead:
  """A model's output layer: ``unembedding: [d, V]`` (or ``EmbeddingRows``) and the soft-cap of its logits.

  A pytree whose soft-cap is static, so it passes through ``jax.jit`` as a constant.
  """

  unembedding: Array | EmbeddingRows
  softcap: float | None = struct.field(pytree_node=False, default=None)


class _Logits(NamedTuple):
  """How a model's raw logits ``z`` become the logits of the distribution: ``cap(z) / temperature``."""

  temperature: float = 1.0
  softcap: float | None = None

  def apply(self, z: Array) -> Array:
    if self.softcap is not None:
      z = self.softcap * jnp.tanh(z / self.softcap)
    return z / self.temperature if self.temperature != 1.0 else z

  def slope(self, z: Array) -> Array | float:
    """d(logits)/d(raw logits), given the (masked, ``-inf`` where not owned) logits ``z``."""
    if self.softcap is None:
      return 1.0 / self.temperature
    capped = z * self.temperature / self.softcap  # tanh(raw / cap)
    return jnp.where(jnp.isfinite(z), (1.0 - capped * capped) / self.temperature, 0.0)


def _split(head: Array | OutputHead, temperature: float = 1.0) -> tuple[Array, _Logits]:
  """An unembedding or ``OutputHead`` -> (``[d, V]`` matrix, its logits transform)."""
  if isinstance(head, OutputHead):
    return head.unembedding, _Logits(float(temperature), head.softcap)
  return head, _Logits(float(temperature))


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


class _Vocab(NamedTuple):
  """How a vocabulary of ``size`` ids is cut into ``count`` blocks of ``block`` columns."""

  size: int
  block: int
  count: int

  def columns(self, b: Array) -> tuple[Array, Array]:
    """Block ``b`` -> (first column it reads, ``[block]`` mask of columns it owns).

    The last block is shifted left to stay inside the vocabulary, so every block
    reads exactly ``block`` columns; columns an earlier block owns are masked.
    """
    nominal = b * self.block
    start = jnp.minimum(nominal, self.size - self.block)
    return start, start + jnp.arange(self.block) >= nominal


def _vocab(unembedding: Array, vocab_size: int | None, block_size: int, min_block: int = 1) -> _Vocab:
  if unembedding.ndim != 2:
    raise ValueError(f"unembedding must be [d, V], got shape {unembedding.shape}")
  size = unembedding.shape[1] if vocab_size is None else vocab_size
  if size > unembedding.shape[1]:
    raise ValueError(f"unembedding has {unembedding.shape[1]} columns, fewer than vocab_size={size}")
  block = min(max(block_size, min_block), size)
  return _Vocab(size, block, -(-size // block))


def _block_logits(hidden: Array, unembedding: Array, vocab: _Vocab, b: Array,
                  form: _Logits = _Logits()) -> tuple[Array, Array, Array]:
  """``[N, d]`` x block ``b`` -> (``[N, block]`` float32 logits, ``-inf`` where not owned; start; mask)."""
  start, owned = vocab.columns(b)
  w = _columns(unembedding, start, vocab.block)
  z = form.apply(jnp.dot(hidden, w, preferred_element_type=jnp.float32))
  return jnp.where(owned, z, -jnp.inf), start, owned


def _reduce_blocks(vocab: _Vocab, block_state, merge):
  """``merge``-fold of ``block_state(b)`` over all blocks, in vocabulary order."""
  first = block_state(jnp.asarray(0))
  out, _ = jax.lax.scan(lambda acc, b: (merge(acc, block_state(b)), None), first, jnp.arange(1, vocab.count))
  return out


def _gather_owned(z: Array, ids: Array, start: Array, vocab: _Vocab, b: Array) -> Array:
  """Values of ``z: [N, block]`` at global ``ids: [N, K]`` this block owns, else 0."""
  local = ids - start
  owned = (ids >= b * vocab.block) & (local < vocab.block)
  picked = jnp.take_along_axis(z, jnp.clip(local, 0, vocab.block - 1), axis=-1)
  return jnp.where(owned, picked, 0.0)


def _flatten(hidden: Array, *per_token: Array | None):
  lead = hidden.shape[:-1]
  flat = [None if x is None else jnp.reshape(x, (-1,) + x.shape[len(lead):]) for x in per_token]
  return lead, jnp.reshape(hidden, (-1, hidden.shape[-1])), flat


def _finish(lead: tuple[int, ...], values: Array, where: Array | None) -> Array:
  values = jnp.reshape(values, lead)
  return values if where is None else jnp.where(where, values, 0.0)


# ---------------------------------------------------------------------------------------------
# Student log-probabilities at chosen ids (CE: the target; top-K KL: the teacher's ids).


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gathered_logprobs(hidden: Array, unembedding: Array, ids: Array, vocab: _Vocab, form: _Logits) -> Array:
  """``log_softmax(form(hidden @ unembedding))`` at ``ids: [N, K]`` -> ``[N, K]``."""
  return _gathered_logprobs_fwd(hidden, unembedding, ids, vocab, form)[0]


def _logprobs_pass(hidden, unembedding, ids, vocab, form, argmax: bool):
  """One pass: (``[N, K]`` log-probs at ``ids``, ``[N]`` log-sum-exp, ``[N]`` arg-max id or None)."""

  def block_state(b):
    z, start, _ = _block_logits(hidden, unembedding, vocab, b, form)
    arg = online.argmax_block(z, start) if argmax else None
    return online.lse_block(z), _gather_owned(z, ids, start, vocab, b), arg

  def merge(s, t):
    return online.lse_merge(s[0], t[0]), s[1] + t[1], online.argmax_merge(s[2], t[2]) if argmax else None

  lse_state, picked, arg = _reduce_blocks(vocab, block_state, merge)
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
    z, start, _ = _block_logits(hidden, unembedding, vocab, b, form)
    q = jnp.exp(z - lse[:, None])
    local = ids - start
    owned = (ids >= b * vocab.block) & (local < vocab.block)
    g_z = (-q * g_total).at[jnp.arange(n)[:, None], jnp.clip(local, 0, vocab.block - 1)].add(
        jnp.where(owned, g_logprobs, 0.0))
    return _accumulate(grads, hidden, unembedding, g_z * form.slope(z), start, vocab)

  d_hidden, d_unembedding = jax.lax.fori_loop(0, vocab.count, step, _zero_grads(hidden, unembedding))
  return d_hidden.astype(hidden.dtype), d_unembedding.astype(unembedding.dtype), None


_gathered_logprobs.defvjp(_gathered_logprobs_fwd, _gathered_logprobs_bwd)


def _zero_grads(hidden: Array, unembedding: Array | EmbeddingRows) -> tuple[Array, Array | EmbeddingRows]:
  return jnp.zeros(hidden.shape, jnp.float32), _zeros(unembedding)


def _accumulate(grads, hidden, unembedding, g_z, start, vocab):
  """Adds block ``g_z = dL/dlogits: [N, block]`` to (d_hidden, d_unembedding)."""
  d_hidden, d_unembedding = grads
  w = _columns(unembedding, start, vocab.block)
  d_hidden = d_hidden + jnp.dot(g_z.astype(w.dtype), w.T, preferred_element_type=jnp.float32)
  d_w = jnp.dot(hidden.T, g_z.astype(hidden.dtype), preferred_element_type=jnp.float32)
  return d_hidden, _add_columns(d_unembedding, start, d_w)


def cross_entropy(hidden: Array, unembedding: Array | OutputHead, targets: Array, *, where: Array | None = None,
                  vocab_size: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE) -> Array:
  """``-log softmax(hidden @ unembedding)[target]`` -> ``[..., T]``; differentiable, blockwise both ways."""
  unembedding, form = _split(unembedding)
  lead, h, (t,) = _flatten(hidden, targets)
  vocab = _vocab(unembedding, vocab_size, block_size)
  logprobs = _gathered_logprobs(h, unembedding, t.astype(jnp.int32)[:, None], vocab, form)
  return _finish(lead, -logprobs[:, 0], where)


def logprobs_and_argmax(hidden: Array, unembedding: Array | OutputHead, ids: Array, *,
                        vocab_size: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[Array, Array]:
  """``log_softmax(hidden @ unembedding)`` at ``ids: [..., T, K]`` -> ``[..., T, K]``, and the arg-max id
  ``[..., T]`` (first of ties), in one pass over the vocabulary. For evaluation: no custom gradient."""
  unembedding, form = _split(unembedding)
  lead, h, (i,) = _flatten(hidden, ids)
  vocab = _vocab(unembedding, vocab_size, block_size)
  logprobs, _, argmax = _logprobs_pass(h, unembedding, i.astype(jnp.int32), vocab, form, argmax=True)
  return jnp.reshape(logprobs, lead + i.shape[-1:]), jnp.reshape(argmax, lead)


def topk_kl_divergence(*, student_hidden: Array, student_unembedding: Array | OutputHead, teacher: TopK,
                       normalization: TopKNormalization = "full", temperature: float = 1.0,
                       where: Array | None = None, vocab_size: int | None = None,
                       block_size: int = DEFAULT_BLOCK_SIZE) -> Array:
  """Top-K KL of a student against a cached teacher ``TopK`` (see ``tailjax.losses``) -> ``[..., T]``.

  Differentiable in the student's hidden states and unembedding, blockwise both ways.
  """
  student_unembedding, form = _split(student_unembedding, temperature)
  lead, h, (ids, teacher_logprobs) = _flatten(student_hidden, teacher.ids, teacher.logprobs)
  vocab = _vocab(student_unembedding, vocab_size, block_size)
  student_logprobs = _gathered_logprobs(h, student_unembedding, ids.astype(jnp.int32), vocab, form)
  kl = losses.topk_kl_from_logprobs(teacher=TopK(ids, teacher_logprobs), student_topk_logprobs=student_logprobs,
                                    normalization=normalization)
  return _finish(lead, kl, where)


# ---------------------------------------------------------------------------------------------
# Full KL between two models, differentiable in the candidate (student).


def _kl_state(ref_hidden, ref_unembedding, cand_hidden, cand_unembedding, vocab, forms) -> online.KLState:

  def block_state(b):
    a, _, _ = _block_logits(ref_hidden, ref_unembedding, vocab, b, forms[0])
    c, _, _ = _block_logits(cand_hidden, cand_unembedding, vocab, b, forms[1])
    return online.kl_block(a, c)

  return _reduce_blocks(vocab, block_state, online.kl_merge)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _kl(ref_hidden, ref_unembedding, cand_hidden, cand_unembedding, vocab, forms):
  """``forms``: the (reference, candidate) ``_Logits``."""
  return online.kl_finish(_kl_state(ref_hidden, ref_unembedding, cand_hidden, cand_unembedding, vocab, forms))


def _kl_fwd(ref_hidden, ref_unembedding, cand_hidden, cand_unembedding, vocab, forms):
  state = _kl_state(ref_hidden, ref_unembedding, cand_hidden, cand_unembedding, vocab, forms)
  lse = (online.lse_finish(state.ref), online.lse_finish(state.cand))
  return online.kl_finish(state), (ref_hidden, ref_unembedding, cand_hidden, cand_unembedding, lse)


def _kl_bwd(vocab, forms, residuals, g_kl):
  """dKL/dz_cand = q - p; the reference is held fixed (its cotangents are zero)."""
  ref_hidden, ref_unembedding, cand_hidden, cand_unembedding, (lse_ref, lse_cand) = residuals

  def step(b, grads):
    a, _, _ = _block_logits(ref_hidden, ref_unembedding, vocab, b, forms[0])
    c, start, _ = _block_logits(cand_hidden, cand_unembedding, vocab, b, forms[1])
    g_z = (jnp.exp(c - lse_cand[:, None]) - jnp.exp(a - lse_ref[:, None])) * g_kl[:, None]
    return _accumulate(grads, cand_hidden, cand_unembedding, g_z * forms[1].slope(c), start, vocab)

  d_hidden, d_unembedding = jax.lax.fori_loop(0, vocab.count, step, _zero_grads(cand_hidden, cand_unembedding))
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
  return _finish(lead, _kl(*args), where)


def _frozen_and_trained(frozen_hidden, frozen_unembedding, hidden, unembedding, temperature, vocab_size, block_size):
  """A frozen model's and a trained model's heads -> (leading shape, the kernels' arguments: the frozen side behind
  ``stop_gradient``, both ``[N, d]``, the vocabulary blocks, the (frozen, trained) logit forms)."""
  (frozen_unembedding, frozen_form), (unembedding, form) = (_split(frozen_unembedding, temperature),
                                                            _split(unembedding, temperature))
  lead, h_frozen, _ = _flatten(frozen_hidden)
  _, h, _ = _flatten(hidden)
  vocab = _vocab_pair(frozen_unembedding, unembedding, vocab_size, block_size)
  return lead, (jax.lax.stop_gradient(h_frozen), jax.lax.stop_gradient(frozen_unembedding), h, unembedding, vocab,
                (frozen_form, form))


def _vocab_pair(ref_unembedding: Array, cand_unembedding: Array, vocab_size: int | None, block_size: int,
                min_block: int = 1) -> _Vocab:
  v_ref, v_cand = ref_unembedding.shape[-1], cand_unembedding.shape[-1]
  if vocab_size is None and v_ref != v_cand:
    raise ValueError(f"vocabulary mismatch: reference unembedding has {v_ref} columns, candidate has {v_cand}; "
                     "if one is only padded, pass the true vocab_size")
  _vocab(ref_unembedding, vocab_size, block_size, min_block)
  return _vocab(cand_unembedding, vocab_size, block_size, min_block)


# ---------------------------------------------------------------------------------------------
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
    a, _, _ = _block_logits(t_hidden, t_unembedding, vocab, b, forms[0])
    c, _, _ = _block_logits(s_hidden, s_unembedding, vocab, b, forms[1])
    return online.lse_block(a), online.lse_block(c)

  lse_t, lse_s = (online.lse_finish(x) for x in _reduce_blocks(
      vocab, norms, lambda x, y: (online.lse_merge(x[0], y[0]), online.lse_merge(x[1], y[1]))))

  def terms(b):
    a, _, _ = _block_logits(t_hidden, t_unembedding, vocab, b, forms[0])
    c, _, _ = _block_logits(s_hidden, s_unembedding, vocab, b, forms[1])
    lp, lq, lr = _log_ratio(a, c, lse_t, lse_s, beta)
    return _expect(lp, lp, lr), _expect(lq, lq, lr)

  on_p, on_q = _reduce_blocks(vocab, terms, lambda x, y: (x[0] + y[0], x[1] + y[1]))
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
    a, _, _ = _block_logits(t_hidden, t_unembedding, vocab, b, forms[0])
    c, start, _ = _block_logits(s_hidden, s_unembedding, vocab, b, forms[1])
    _, lq, lr = _log_ratio(a, c, lse_t, lse_s, beta)
    q = jnp.exp(lq)
    g_z = jnp.where(q > 0, weight * q * ((lq - lr) - on_q[:, None]), 0.0) * g[:, None]
    return _accumulate(grads, s_hidden, s_unembedding, g_z * forms[1].slope(c), start, vocab)

  d_hidden, d_unembedding = jax.lax.fori_loop(0, vocab.count, step, _zero_grads(s_hidden, s_unembedding))
  return (jnp.zeros_like(t_hidden), jax.tree.map(jnp.zeros_like, t_unembedding), d_hidden.astype(s_hidden.dtype),
          d_unembedding.astype(s_unembedding.dtype))


_student_divergence.defvjp(_student_divergence_fwd, _student_divergence_bwd)


def _from_teacher(teacher_hidden, teacher_unembedding, student_hidden, student_unembedding, temperature, where,
                  vocab_size, block_size, beta) -> Array:
  lead, args = _frozen_and_trained(teacher_hidden, teacher_unembedding, student_hidden, student_unembedding,
                                   temperature, vocab_size, block_size)
  return _finish(lead, _student_divergence(*args, beta), where)


def reverse_kl_divergence(*, teacher_hidden: Array, teacher_unembedding: Array | OutputHead, student_hidden: Array,
                          student_unembedding: Array | OutputHead, temperature: float = 1.0, where: Array | None = None,
                          vocab_size: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE) -> Array:
  """``KL(q || p)`` per token, q the student's ``softmax(z / T)``, p the teacher's -> ``[..., T]`` (mode-seeking:
  the student is penalised for mass where the teacher has little). Differentiable in the student only, blockwise
  both ways; float32 sums (a training objective; the precise KL of evaluation is ``kl_divergence``)."""
  return _from_teacher(teacher_hidden, teacher_unembedding, student_hidden, student_unembedding, temperature, where,
                       vocab_size, block_size, None)


def generalized_jensen_shannon(*, teacher_hidden: Array, teacher_unembedding: Array | OutputHead,
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


# ---------------------------------------------------------------------------------------------
# Evaluation and teacher extraction (no gradients).


def token_stats(*, ref_hidden: Array, ref_unembedding: Array | OutputHead, cand_hidden: Array,
                cand_unembedding: Array | OutputHead, targets: Array, where: Array | None = None,
                vocab_size: int | None = None, block_size: int = STATS_BLOCK_SIZE,
                jensen_shannon: bool = False) -> TokenStats:
  """KLD, both CEs, top-1 agreement, the target log-prob delta and the reference's top-1 probability, in one
  pass over the vocabulary (``candidates_token_stats``)."""
  (stats,) = candidates_token_stats(ref_hidden=ref_hidden, ref_unembedding=ref_unembedding,
                                    candidates=[(cand_hidden, cand_unembedding)], targets=targets, where=where,
                                    vocab_size=vocab_size, block_size=block_size, jensen_shannon=jensen_shannon)
  return stats


def candidates_token_stats(*, ref_hidden: Array, ref_unembedding: Array | OutputHead,
                           candidates: list[tuple[Array, Array | OutputHead]],
                           targets: Array, where: Array | None = None, vocab_size: int | None = None,
                           block_size: int = STATS_BLOCK_SIZE, reference_topk: int | None = None,
                           jensen_shannon: bool = False):
  """``token_stats`` of each ``(hidden, unembedding)`` candidate, all in one pass over the vocabulary.

  Each block of the reference's logits is computed once, however many candidates share it.
  With ``reference_topk=k`` the same pass also keeps the reference's top-``k`` (what
  ``teacher_topk`` returns, for ``tailjax.refcache``) and the result is ``(stats, TopK)``.
  ``jensen_shannon``: also JS(p_ref, p_cand), from a second pass (the mixture needs both normalisers first):
  the logits are computed twice.
  """
  if not candidates:
    raise ValueError("candidates_token_stats needs at least one (hidden, unembedding) candidate")
  k = reference_topk or 0
  ref_unembedding, ref_form = _split(ref_unembedding)
  lead, h_ref, (t,) = _flatten(ref_hidden, targets)
  cands = [(_flatten(h)[1], *_split(u)) for h, u in candidates]
  vocab, *_ = [_vocab_pair(ref_unembedding, u, vocab_size, block_size, min_block=k) for _, u, _ in cands]
  if reference_topk is not None and not 0 < k <= vocab.size:
    raise ValueError(f"reference_topk={k} must lie in [1, {vocab.size}] (the vocabulary)")
  ids = t.astype(jnp.int32)[:, None]

  top_k = max(k, OVERLAP_K)  # the reference's top-k serves the cache and the overlaps

  def block_state(b):
    a, start, _ = _block_logits(h_ref, ref_unembedding, vocab, b, ref_form)
    per_cand = []
    for h, u, form in cands:
      c, _, _ = _block_logits(h, u, vocab, b, form)
      target = _gather_owned(c, ids, start, vocab, b)[:, 0]
      per_cand.append((online.kl_block(a, c), online.argmax_block(c, start), target, online.kl_block(c, a),
                       _topk_block(c, start, OVERLAP_K)))
    ref = (online.argmax_block(a, start), _gather_owned(a, ids, start, vocab, b)[:, 0], online.entropy_block(a),
           _topk_block(a, start, top_k))
    return ref, per_cand

  def merge(s, t):
    per_cand = [(online.kl_merge(x[0], y[0]), online.argmax_merge(x[1], y[1]), x[2] + y[2],
                 online.kl_merge(x[3], y[3]), _topk_merge(x[4], y[4], OVERLAP_K)) for x, y in zip(s[1], t[1])]
    (arg_s, target_s, entropy_s, top_s), (arg_t, target_t, entropy_t, top_t) = s[0], t[0]
    return (online.argmax_merge(arg_s, arg_t), target_s + target_t, online.entropy_merge(entropy_s, entropy_t),
            _topk_merge(top_s, top_t, top_k)), per_cand

  (arg_ref, target_ref, entropy, top), per_cand = _reduce_blocks(vocab, block_state, merge)
  ref_ids = top[1][:, :OVERLAP_K]
  ref_lse = online.lse_finish(entropy.lse)  # the reference's normaliser, once for every candidate
  ref_ce, confidence = ref_lse - target_ref, jnp.exp(arg_ref.value - ref_lse)
  ref_entropy = online.entropy_finish(entropy)
  js = [None] * len(cands)
  if jensen_shannon:
    finished = [(online.lse_finish(x[0].cand), online.kl_shift(x[0])) for x in per_cand]

    def js_state(b):
      a, _, _ = _block_logits(h_ref, ref_unembedding, vocab, b, ref_form)
      return [online.js_block(a, _block_logits(h, u, vocab, b, form)[0], ref_lse, lse, shift)
              for (h, u, form), (lse, shift) in zip(cands, finished)]

    js = _reduce_blocks(vocab, js_state, lambda s, t: [x + y for x, y in zip(s, t)])
  stats = []
  for (kl, arg_cand, target_cand, reverse, (_, cand_ids)), js_cand in zip(per_cand, js):
    cand_ce = online.lse_finish(kl.cand) - target_cand
    agree = (arg_ref.index == arg_cand.index).astype(jnp.float32)
    shared = lambda n: jnp.sum(jnp.any(ref_ids[:, :n, None] == cand_ids[:, None, :n], axis=-1), axis=-1) / n
    top1_in_top5 = jnp.any(cand_ids[:, :5] == ref_ids[:, :1], axis=-1).astype(jnp.float32)
    values = (online.kl_finish(kl), ref_ce, cand_ce, agree, ref_ce - cand_ce, confidence, online.kl_finish(reverse),
              ref_entropy, shared(5), shared(OVERLAP_K), top1_in_top5, js_cand)
    stats.append(TokenStats(*(None if v is None else _finish(lead, v, where) for v in values)))
  if not k:
    return stats
  values, top_ids = top[0][:, :k], top[1][:, :k]
  logprobs = values - ref_lse[:, None]
  return stats, TopK(jnp.reshape(top_ids, lead + (k,)), jnp.reshape(logprobs, lead + (k,)))


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
  unembedding, form = _split(unembedding, temperature)
  lead, h, _ = _flatten(hidden)
  vocab = _vocab(unembedding, vocab_size, block_size, min_block=k)
  if not 0 < k <= vocab.size:
    raise ValueError(f"k={k} must lie in [1, {vocab.size}] (the teacher's vocabulary)")

  def block_state(b):
    z, start, _ = _block_logits(h, unembedding, vocab, b, form)
    return online.lse_block(z), _topk_block(z, start, k)

  lse_state, (values, ids) = _reduce_blocks(
      vocab, block_state, lambda s, t: (online.lse_merge(s[0], t[0]), _topk_merge(s[1], t[1], k)))
  logprobs = values - online.lse_finish(lse_state)[:, None]
  return TopK(jnp.reshape(ids, lead + (k,)), jnp.reshape(logprobs, lead + (k,)))
