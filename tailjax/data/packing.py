"""Training data: documents packed end to end into fixed-length windows, and a BPE tokenizer learned from them."""

from __future__ import annotations

import dataclasses

import numpy as np

from tailjax import files


@dataclasses.dataclass
class Packed:
  """Documents packed end to end into windows of ``seq_len + 1`` tokens: inputs and next-token targets.

  Consecutive windows share one token, so every token but the first is a target once.
  ``segments`` numbers the documents inside each window from 1: a model given them
  attends within a document only (``Decoder(..., segment_ids)``). Each document
  starts with the tokenizer's BOS when it has one, so the last token of a document
  learns to predict the start of the next.
  """

  tokens: np.ndarray  # int32 [N, T + 1]
  segments: np.ndarray  # int32 [N, T + 1]
  fingerprint: str
  scored: np.ndarray | None = None  # bool [N, T + 1]: token i is a target that counts (None: every one does)

  def __len__(self) -> int:
    return len(self.tokens)

  @property
  def seq_len(self) -> int:
    return self.tokens.shape[1] - 1

  def take(self, count: int) -> Packed:
    """The first ``count`` windows."""
    return packed(self.tokens[:count], self.segments[:count], None if self.scored is None else self.scored[:count])

  def target_weights(self) -> np.ndarray:
    """``[N, T + 1]`` bool, ``scored`` or every token: weight ``[:, 1:]`` is whether target ``tokens[:, 1:]``
    counts in a loss."""
    return np.ones(self.tokens.shape, bool) if self.scored is None else self.scored


def pack_documents(documents: list[str], tokenizer, seq_len: int, source: str = "corpus") -> Packed:
  """Tokenize ``documents`` (no BOS rule of the tokenizer: one BOS per document if it has one) and pack them."""
  documents = [d for d in documents if d.strip()]
  encoded = tokenizer.backend.encode_batch(documents, add_special_tokens=False)
  bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  ids = [bos + e.ids for e in encoded]
  stream = np.fromiter((t for doc in ids for t in doc), np.int32)
  doc = np.repeat(np.arange(len(ids), dtype=np.int32), [len(d) for d in ids])
  count = (len(stream) - 1) // seq_len
  if count < 1:
    raise ValueError(f"{source}: {len(stream)} tokens is shorter than one training window of {seq_len + 1} tokens")
  index = np.arange(count)[:, None] * seq_len + np.arange(seq_len + 1)
  tokens, docs = stream[index], doc[index]
  return packed(tokens, (docs - docs[:, :1] + 1).astype(np.int32))


def packed(tokens: np.ndarray, segments: np.ndarray, scored: np.ndarray | None = None) -> Packed:
  """Training windows from their arrays (``Packed``'s fields), fingerprinted."""
  digest = files.fingerprint(tokens, segments) if scored is None else files.fingerprint(tokens, segments, scored)
  return Packed(tokens, segments, digest, scored)


def train_bpe(documents: list[str], vocab_size: int):
  """A byte-level BPE tokenizer of ``vocab_size`` ids learned from ``documents`` (llama2.c's TinyStories practice).

  Id 0 is ``<|endoftext|>``, used as the BOS that starts every packed document.
  Deterministic: the same documents give the same tokenizer.
  """
  from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

  from tailjax.models import Tokenizer

  if vocab_size < 257:
    raise ValueError(f"train-bpe:{vocab_size}: a byte-level vocabulary needs more than 256 ids")
  backend = Backend(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  backend.train_from_iterator(documents, trainer)
  return Tokenizer(backend, add_bos=False, bos_id=0)
