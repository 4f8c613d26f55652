"""The per-token losses a student trains on: ``token_losses`` (CE, full KL, top-K KL; from hidden states
through the fused head, ``tailjax.head``)."""

from __future__ import annotations

import jax

from tailjax import head
from tailjax.losses import TopK
from tailjax.models import Decoder


def token_losses(student: Decoder, batch: dict[str, jax.Array], *, objective: str, vocab_size: int,
                 topk: int | None = None, temperature: float = 1.0, teacher: Decoder | None = None,
                 block_size: int = head.DEFAULT_BLOCK_SIZE) -> jax.Array:
  """Per-token loss ``[B, T]`` of a batch of packed windows (``tokens``/``segments``: ``[B, T + 1]``).

  With ``topk_ids``/``topk_logprobs`` (``[B, T, k]``) in the batch, the teacher's top-K is
  read from them; otherwise ``teacher`` runs here, as a constant.
  """
  inputs, segments, targets = batch["tokens"][:, :-1], batch["segments"][:, :-1], batch["tokens"][:, 1:]
  hidden, unembedding = student(inputs, segments), student.output_head()
  if objective == "ce":
    return head.cross_entropy(hidden, unembedding, targets, vocab_size=vocab_size, block_size=block_size)
  if "topk_ids" in batch:
    top = TopK(batch["topk_ids"], batch["topk_logprobs"])
  else:
    teacher_hidden = jax.lax.stop_gradient(teacher(inputs, segments))
    teacher_unembedding = jax.lax.stop_gradient(teacher.output_head())
    if objective == "kl":
      return head.kl_divergence(ref_hidden=teacher_hidden, ref_unembedding=teacher_unembedding, cand_hidden=hidden,
                                cand_unembedding=unembedding, temperature=temperature,
                                vocab_size=vocab_size, block_size=block_size)
    top = head.teacher_topk(teacher_hidden, teacher_unembedding, topk, temperature=temperature,
                            vocab_size=vocab_size, block_size=block_size)
  return head.topk_kl_divergence(student_hidden=hidden, student_unembedding=unembedding, teacher=top,
                                 temperature=temperature, vocab_size=vocab_size,
                                 block_size=block_size)
