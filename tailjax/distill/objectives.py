"""The per-token losses a student trains on: ``token_losses``, from hidden states through the fused head
(``tailjax.head``: no ``[tokens, vocab]`` logits, forward or backward). With p the teacher's and q the student's
distribution at temperature T (``softmax(z / T)``):

- ``ce``: ``-log q(target)`` at T = 1 (no teacher);
- ``kl``: ``KL(p || q)`` (forward, mass-covering);
- ``topk``: the teacher's top-K probabilities renormalized against the student's full softmax (the paper's);
- ``reverse_kl``: ``KL(q || p)`` (mode-seeking);
- ``jsd``: ``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q`` (GKD's generalized JSD).

Every objective but ``ce`` is multiplied by ``T^2`` when ``t2_scaling`` is set (Hinton et al. 2015: the
gradients of a divergence at temperature T shrink as ``1 / T^2``; the factor keeps them comparable across
temperatures); without it, the divergence at T as is.
"""

from __future__ import annotations

import jax

from tailjax import head
from tailjax.losses import TopK
from tailjax.models import Decoder


def token_losses(student: Decoder, batch: dict[str, jax.Array], *, objective: str, vocab_size: int,
                 topk: int | None = None, temperature: float = 1.0, teacher: Decoder | None = None,
                 block_size: int = head.DEFAULT_BLOCK_SIZE, beta: float = 0.5, t2_scaling: bool = False) -> jax.Array:
  """Per-token loss ``[B, T]`` of a batch of packed windows (``tokens``/``segments``: ``[B, T + 1]``), by
  ``objective`` (the module docstring).

  With ``topk_ids``/``topk_logprobs`` (``[B, T, k]``) in the batch, the teacher's top-K is
  read from them; otherwise ``teacher`` runs here, as a constant.
  """
  inputs, segments, targets = batch["tokens"][:, :-1], batch["segments"][:, :-1], batch["tokens"][:, 1:]
  hidden, unembedding = student(inputs, segments), student.output_head()
  if objective == "ce":
    return head.cross_entropy(hidden, unembedding, targets, vocab_size=vocab_size, block_size=block_size)
  scale = temperature**2 if t2_scaling else 1.0
  options = dict(temperature=temperature, vocab_size=vocab_size, block_size=block_size)
  if "topk_ids" in batch:
    top = TopK(batch["topk_ids"], batch["topk_logprobs"])
  else:
    teacher_hidden = jax.lax.stop_gradient(teacher(inputs, segments))
    teacher_unembedding = jax.lax.stop_gradient(teacher.output_head())
    pair = dict(teacher_hidden=teacher_hidden, teacher_unembedding=teacher_unembedding, student_hidden=hidden,
                student_unembedding=unembedding, **options)
    if objective == "kl":
      return scale * head.kl_divergence(ref_hidden=teacher_hidden, ref_unembedding=teacher_unembedding,
                                        cand_hidden=hidden, cand_unembedding=unembedding, **options)
    if objective == "reverse_kl":
      return scale * head.reverse_kl_divergence(**pair)
    if objective == "jsd":
      return scale * head.generalized_jensen_shannon(**pair, beta=beta)
    top = head.teacher_topk(teacher_hidden, teacher_unembedding, topk, **options)
  return scale * head.topk_kl_divergence(student_hidden=hidden, student_unembedding=unembedding, teacher=top,
                                         **options)
