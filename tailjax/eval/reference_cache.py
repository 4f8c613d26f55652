"""A compact reference cache: the reference's top-K log-probs per scored token, for reuse.

Running the reference again for every new candidate is the cost a cache removes. Full
log-probs are ``tokens x V`` floats (80 GB for 128 x 2048 tokens at V = 152k); the cache
keeps, per scored prediction, the top-``K`` ids and their full-vocabulary log-probs (the
tail mass is ``1 - sum exp``) and the exact log-prob of the target: ``tokens x (2K + 1)``
numbers. Against a cache, KLD is the K + 1 bucket KL (the top-K ids and one tail bucket;
``tailjax.losses`` ``normalization="tail"``), a lower bound of the full KL that is tight when
the top-K mass is near 1; CE of the reference, Δp and the PPL figures stay exact.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tailjax import files, head, losses
from tailjax.data import Windows
from tailjax.losses import TopK


class CacheBatch(NamedTuple):
  """One batch of cached reference values: ``ids, logprobs: [B, T-1, K]``, ``target_logprob: [B, T-1]``."""

  ids: jax.Array
  logprobs: jax.Array
  target_logprob: jax.Array

  def token_stats(self, hidden: jax.Array, candidate, targets: jax.Array, scored: jax.Array,
                  vocab_size: int) -> head.TokenStats:
    """A candidate (a ``Decoder``, its ``hidden: [B, T-1, d]``) against this batch (``cache_token_stats``)."""
    return cache_token_stats(self, hidden, candidate.output_head(), targets, scored, vocab_size)


@dataclasses.dataclass
class ReferenceCache:
  windows: Windows
  ids: np.ndarray  # int32 [N, T-1, K]
  logprobs: np.ndarray  # float32 [N, T-1, K]
  target_logprob: np.ndarray  # float32 [N, T-1]
  vocab_size: int
  source: str  # the reference model it came from
  tokenizer: str  # that model's tokenizer fingerprint
  path: Path | None = None

  @property
  def k(self) -> int:
    return self.ids.shape[-1]

  def batch(self, rows: np.ndarray, batch_size: int) -> CacheBatch:
    """The cached values of windows ``rows``, padded with zeros to ``batch_size``."""
    pad = lambda a: np.concatenate([a[rows], np.zeros((batch_size - len(rows), *a.shape[1:]), a.dtype)])
    return CacheBatch(*(jnp.asarray(pad(a)) for a in (self.ids, self.logprobs, self.target_logprob)))

  def save(self, path: str | Path) -> Path:
    path = Path(path)
    meta = {"vocab_size": self.vocab_size, "source": self.source, "tokenizer": self.tokenizer,
            "corpus_tokens": self.windows.corpus_tokens, "fingerprint": self.windows.fingerprint}
    return files.write_atomic(path, lambda f: np.savez_compressed(
        f, meta=np.asarray(json.dumps(meta)), tokens=self.windows.tokens, scored=self.windows.scored,
        starts=self.windows.starts, ids=self.ids, logprobs=self.logprobs, target_logprob=self.target_logprob),
        "the reference cache")


def load(path: str | Path) -> ReferenceCache:
  path = Path(path)
  with files.npz(path, "tailjax reference cache", "write it again from the reference model") as z:
    meta = json.loads(str(z["meta"]))
    windows = Windows(z["tokens"], z["scored"], z["starts"], meta["corpus_tokens"], meta["fingerprint"])
    cache = ReferenceCache(windows, z["ids"], z["logprobs"], z["target_logprob"], meta["vocab_size"],
                           meta["source"], meta["tokenizer"], path)
  n, t = cache.windows.tokens.shape
  if cache.ids.shape[:2] != (n, t - 1) or cache.logprobs.shape != cache.ids.shape:
    raise ValueError(f"{path}: inconsistent shapes tokens {cache.windows.tokens.shape}, ids {cache.ids.shape}, "
                     f"logprobs {cache.logprobs.shape}")
  return cache


def cache_token_stats(cache: CacheBatch, cand_hidden: jax.Array, cand_unembedding: jax.Array | head.OutputHead,
                      targets: jax.Array,
                      scored: jax.Array, vocab_size: int) -> head.TokenStats:
  """Per-token values of a candidate against cached reference top-K log-probs (see module docstring)."""
  k = cache.ids.shape[-1]
  # The candidate's log-probs at the cached ids and at the target, and its arg-max: one vocabulary pass.
  logprobs, cand_top1 = head.logprobs_and_argmax(cand_hidden, cand_unembedding,
                                                 jnp.concatenate([cache.ids, targets[..., None]], axis=-1),
                                                 vocab_size=vocab_size)
  kld = losses.topk_kl_from_logprobs(teacher=TopK(cache.ids, cache.logprobs), student_topk_logprobs=logprobs[..., :k],
                                     normalization="tail")
  values = (kld, -cache.target_logprob, -logprobs[..., k], (cand_top1 == cache.ids[..., 0]).astype(jnp.float32),
            jnp.exp(cache.logprobs[..., 0]))
  kld, ref_ce, cand_ce, agree, confidence = (jnp.where(scored, v, 0.0) for v in values)
  return head.TokenStats(kld, ref_ce, cand_ce, agree, ref_ce - cand_ce, confidence)
