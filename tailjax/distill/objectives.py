"""The per-token losses a student trains on: ``Objective.token_losses``, from hidden states through the fused head
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

import dataclasses

import jax

from tailjax import head
from tailjax.losses import TopK
from tailjax.models import Decoder

OBJECTIVES = ("ce", "kl", "topk", "reverse_kl", "jsd")


@dataclasses.dataclass(frozen=True)
class Objective:
  """What a student is trained on, per token (the module docstring): ``name`` one of ``OBJECTIVES``, over a
  ``vocab_size`` vocabulary read in blocks of ``block_size``; ``topk`` the teacher's K (``topk``), ``temperature``
  T of both distributions, ``beta`` of ``jsd``, ``t2_scaling`` the T² factor. Hashable: a compiled step takes it
  as a constant. ``token_losses`` computes it; a subclass may compute the same another way (a benchmark's
  materialized baseline)."""

  name: str
  vocab_size: int
  topk: int | None = None
  temperature: float = 1.0
  beta: float = 0.5
  t2_scaling: bool = False
  block_size: int = head.DEFAULT_BLOCK_SIZE

  def __post_init__(self):
    if self.name not in OBJECTIVES:
      raise ValueError(f"objective {self.name!r}: choose one of {', '.join(OBJECTIVES)}")
    if self.name == "topk" and self.topk is None:
      raise ValueError("objective topk needs its K (topk)")

  @property
  def scale(self) -> float:
    """The factor of every objective but ``ce``: T² with ``t2_scaling``, else 1."""
    return self.temperature**2 if self.t2_scaling else 1.0

  def token_losses(self, student: Decoder, batch: dict[str, jax.Array], teacher: Decoder | None = None) -> jax.Array:
    """Per-token loss ``[B, T]`` of a batch of packed windows (``tokens``/``segments``: ``[B, T + 1]``).

    With ``topk_ids``/``topk_logprobs`` (``[B, T, k]``) in the batch, the teacher's top-K is read from them;
    otherwise ``teacher`` runs here, as a constant.
    """
    inputs, segments, targets = batch["tokens"][:, :-1], batch["segments"][:, :-1], batch["tokens"][:, 1:]
    hidden, unembedding = student(inputs, segments), student.output_head()
    options = dict(vocab_size=self.vocab_size, block_size=self.block_size)
    if self.name == "ce":
      return head.cross_entropy(hidden, unembedding, targets, **options)
    options["temperature"] = self.temperature
    if "topk_ids" in batch:
      top = TopK(batch["topk_ids"], batch["topk_logprobs"])
    else:
      teacher_hidden = jax.lax.stop_gradient(teacher(inputs, segments))
      teacher_unembedding = jax.lax.stop_gradient(teacher.output_head())
      pair = dict(teacher_hidden=teacher_hidden, teacher_unembedding=teacher_unembedding, student_hidden=hidden,
                  student_unembedding=unembedding, **options)
      if self.name == "kl":
        return self.scale * head.kl_divergence(ref_hidden=teacher_hidden, ref_unembedding=teacher_unembedding,
                                               cand_hidden=hidden, cand_unembedding=unembedding, **options)
      if self.name == "reverse_kl":
        return self.scale * head.reverse_kl_divergence(**pair)
      if self.name == "jsd":
        return self.scale * head.jensen_shannon(**pair, beta=self.beta)
      top = head.teacher_topk(teacher_hidden, teacher_unembedding, self.topk, **options)
    return self.scale * head.topk_kl_divergence(student_hidden=hidden, student_unembedding=unembedding, teacher=top,
                                                **options)
