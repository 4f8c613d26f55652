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

from tailjax.head.blocks import DEFAULT_BLOCK_SIZE, STATS_BLOCK_SIZE, EmbeddingRows, OutputHead
from tailjax.head.divergences import jensen_shannon, kl_divergence, reverse_kl_divergence
from tailjax.head.stats import (OVERLAP_K, CandidatesStats, TokenStats, candidates_token_stats, teacher_topk,
                                token_stats)
from tailjax.head.targets import cross_entropy, logprobs_and_argmax, topk_kl_divergence

__all__ = ["DEFAULT_BLOCK_SIZE", "OVERLAP_K", "STATS_BLOCK_SIZE", "CandidatesStats", "EmbeddingRows", "OutputHead",
           "TokenStats",
           "candidates_token_stats", "cross_entropy", "jensen_shannon", "kl_divergence",
           "logprobs_and_argmax", "reverse_kl_divergence", "teacher_topk", "token_stats", "topk_kl_divergence"]
