"""What candidates are scored against: a reference model, a llama.cpp KL-divergence base file, or a cache.

Every kind is a ``Reference``, the one interface ``tailjax.eval.step`` uses:

- ``describe()`` -> ``Description``: how messages name it, its vocabulary size, its tokenizer's fingerprint
  (None when unknown), so candidates are checked against any kind alike (``check_compatible``);
- ``model``: the NNX model the batch step runs beside the candidates (scored in the same vocabulary pass as
  them, ``tailjax.head.candidates_token_stats``), or None for stored values;
- ``batch(start, count, batch_size)``: the stored values of windows ``start .. start + count`` (of its
  ``windows``, in their order: ``shuffled(seed)`` reorders both alike) padded to ``batch_size`` rows, a pytree
  the batch step receives (None for a model), whose
  ``token_stats(hidden, candidate, targets, scored, vocab_size)`` gives one candidate's
  ``tailjax.head.TokenStats`` inside the compiled step;
- ``writes_cache``: whether its top-K log-probs can be saved as a reference cache (a model's only).

``ModelReference`` wraps a loaded model, ``BaseReference`` a llama.cpp base file (``--kl-divergence-base``:
the tokens it scored and its compressed log-probs), ``CacheReference`` a ``tailjax.eval.reference_cache`` cache.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from tailjax import data, files, head
from tailjax.data import Windows
from tailjax.eval import llamacpp, reference_cache
from tailjax.models import LoadedModel
from tailjax.models.transformer import Decoder


class Description(NamedTuple):
  what: str  # how messages name it: "the reference <name>", "the llama.cpp base <path>", ...
  vocab_size: int
  tokenizer: str | None  # its tokenizer's fingerprint, None when unknown


class Reference(Protocol):
  writes_cache: bool

  @property
  def model(self) -> Decoder | None: ...

  def describe(self) -> Description: ...

  def batch(self, start: int, count: int, batch_size: int): ...


class ModelReference:
  """A reference model (``LoadedModel``), run beside the candidates on every batch."""

  writes_cache = True

  def __init__(self, loaded: LoadedModel):
    self.loaded = loaded

  @property
  def model(self) -> Decoder:
    return self.loaded.model

  def describe(self) -> Description:
    tokenizer = self.loaded.tokenizer
    return Description(f"the reference {self.loaded.name}", self.loaded.config.vocab_size,
                       tokenizer.fingerprint() if tokenizer is not None else None)

  def batch(self, start: int, count: int, batch_size: int) -> None:
    del start, count, batch_size
    return None


class BaseBatch(NamedTuple):
  """One batch of a llama.cpp base file: ``logprobs: [B, T-1, V]`` stored reference log-probs and ``valid`` (the
  entries stored above llama.cpp's saturation, code > 0), zero outside the scored half of each window."""

  logprobs: jax.Array
  valid: jax.Array

  def token_stats(self, hidden: jax.Array, candidate: Decoder, targets: jax.Array, scored: jax.Array,
                  vocab_size: int) -> head.TokenStats:
    """A candidate against stored log-probs, llama.cpp's way: its logits materialized (so are the stored ones)."""
    logits = jnp.einsum("btd,dv->btv", hidden, candidate.unembedding()[:, :vocab_size],
                        preferred_element_type=jnp.float32)
    if (cap := candidate.cfg.final_logit_softcap) is not None:
      logits = cap * jnp.tanh(logits / cap)
    values = llamacpp.base_token_stats(self.logprobs, self.valid, logits, targets)
    return head.TokenStats(*(jnp.where(scored, v, 0.0) for v in values))


class BaseReference:
  """A llama.cpp KL-divergence base file: its chunks are the windows (``windows``), the second half of each
  scored, the first token BOS when the candidates' tokenizer adds one (``bos_id``)."""

  writes_cache = False
  model = None

  def __init__(self, base: llamacpp.KldBase, bos_id: int | None):
    self.base = base
    tokens = base.tokens.copy()
    if bos_id is not None:
      tokens[:, 0] = bos_id
    scored = np.zeros((len(tokens), base.n_ctx - 1), bool)
    scored[:, base.first_scored:] = True
    digest = files.fingerprint(tokens, scored)
    self.windows = Windows(tokens, scored, np.arange(len(tokens), dtype=np.int64) * base.n_ctx, tokens.size, digest)
    self.rows = np.arange(len(tokens))  # the base's chunk of each window, in the order they are scored

  def shuffled(self, seed: int) -> BaseReference:
    """The same reference with its windows in ``Windows.shuffled``'s order (``--until-ci``)."""
    return _reordered(self, seed)

  def describe(self) -> Description:
    return Description(f"the llama.cpp base {self.base.path}", self.base.n_vocab, None)

  def batch(self, start: int, count: int, batch_size: int) -> BaseBatch:
    base = self.base
    logprobs = np.zeros((batch_size, base.n_ctx - 1, base.n_vocab), np.float32)
    valid = np.zeros(logprobs.shape, bool)
    for b, row in enumerate(self.rows[start:start + count]):
      logprobs[b, base.first_scored:], valid[b, base.first_scored:] = base.chunk_logprobs(int(row))
    return BaseBatch(jnp.asarray(logprobs), jnp.asarray(valid))


class CacheReference:
  """A reference cache (``tailjax.eval.reference_cache``): the reference's top-K log-probs on its own windows."""

  writes_cache = False
  model = None

  def __init__(self, cache: reference_cache.ReferenceCache):
    self.cache = cache
    self.windows = cache.windows
    self.rows = np.arange(len(cache.windows))

  def shuffled(self, seed: int) -> CacheReference:
    """The same reference with its windows in ``Windows.shuffled``'s order (``--until-ci``)."""
    return _reordered(self, seed)

  def describe(self) -> Description:
    return Description(f"the reference cache {self.cache.path}", self.cache.vocab_size, self.cache.tokenizer)

  def batch(self, start: int, count: int, batch_size: int) -> reference_cache.CacheBatch:
    return self.cache.batch(self.rows[start:start + count], batch_size)


def _reordered(stored, seed: int):
  """A copy of a stored reference whose windows, and the stored values read for them, follow
  ``data.shuffled_rows``: window ``i`` of the copy is window ``rows[i]`` of the file, log-probs included."""
  order = data.shuffled_rows(len(stored.rows), seed)
  other = copy.copy(stored)
  other.rows, other.windows = stored.rows[order], stored.windows.take(order)
  return other


def check_compatible(reference: Reference, candidates: Sequence[LoadedModel]) -> None:
  """Candidates must score the same tokens with the same vocabulary as the reference."""
  what, vocab_size, fingerprint = reference.describe()
  for cand in candidates:
    if cand.config.vocab_size != vocab_size:
      raise ValueError(f"{cand.name}: vocabulary of {cand.config.vocab_size} tokens, {what} has {vocab_size}")
    if cand.tokenizer is not None and fingerprint is not None and not cand.tokenizer.same_as(fingerprint):
      raise ValueError(f"{cand.name}: its tokenizer differs from that of {what}; per-token comparisons need "
                       "identical tokenization")
