"""Token windows: which tokens a run scores, cut from a corpus's token stream by a ``Protocol``.

A corpus is read as documents (``tailjax.data.corpus``), joined with blank lines (WikiText's convention) and
tokenized once with the reference tokenizer; the token stream is cut into non-overlapping windows of ``seq_len``
tokens. Two protocols decide which windows and which positions are scored:

- ``ram`` (../shared/mission/004): ``num_sequences`` windows sampled without replacement
  by ``seed``; every next-token prediction in a window counts (``seq_len - 1`` per window).
- ``llamacpp`` (llama.cpp's ``perplexity``/``--kl-divergence``): every window; the first
  half is context only and predictions ``seq_len/2 .. seq_len-2`` count; the first token
  is replaced by BOS when the tokenizer adds one.

Records scored on their responses only become windows in ``tailjax.data.spans``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tailjax import files


@dataclasses.dataclass(frozen=True)
class Protocol:
  name: str
  seq_len: int
  num_sequences: int | None  # None: every window
  seed: int = 42
  score_second_half: bool = False
  # Windows advancing by ``stride`` tokens (None: seq_len, no overlap): each window after the first scores
  # only its last ``stride`` tokens, so every token is scored once with at least seq_len - stride tokens of
  # context (the scoring exllamav3 and vLLM's scoring RFC use); the window at the corpus start scores all.
  stride: int | None = None

  def __post_init__(self):
    if self.seq_len < 4:
      raise ValueError(f"seq_len={self.seq_len}: a window needs at least 4 tokens")
    if self.num_sequences is not None and self.num_sequences < 1:
      raise ValueError(f"num_sequences={self.num_sequences} must be positive")
    if self.stride is not None and not 0 < self.stride <= self.seq_len:
      raise ValueError(f"stride={self.stride} must lie in [1, seq_len={self.seq_len}]")
    if self.stride is not None and self.score_second_half:
      raise ValueError(f"protocol {self.name!r} scores each window's second half; it takes no stride")


# Sized so that the embedded default (3 models) finishes in under 3 minutes on a 2-core CPU.
DEFAULT_PROTOCOL = Protocol("default", seq_len=512, num_sequences=12, seed=42)


PROTOCOLS = {
    "default": DEFAULT_PROTOCOL,
    "ram": Protocol("ram", seq_len=2048, num_sequences=128, seed=42),
    "llamacpp": Protocol("llamacpp", seq_len=512, num_sequences=None, score_second_half=True),
}


@dataclasses.dataclass
class Windows:
  """What a run scores; prediction ``i`` of a window is the model's guess of token ``i + 1``."""

  tokens: np.ndarray  # int32 [N, T]
  scored: np.ndarray  # bool [N, T - 1]: which predictions count
  starts: np.ndarray  # int64 [N]: offset of each window in the corpus token stream (span corpora: record number)
  corpus_tokens: int  # length of that stream
  fingerprint: str  # hash of tokens and scored positions: same fingerprint, same work
  truncated: int = 0  # records cut at the window length, losing scored tokens (span corpora: tailjax.data.spans)
  dropped: tuple[str, ...] = ()  # file:line of the records left out with nothing to score (span corpora)

  def __len__(self) -> int:
    return len(self.tokens)

  @property
  def scored_tokens(self) -> int:
    return int(self.scored.sum())

  def take(self, rows) -> Windows:
    """The windows at ``rows`` (indices, in that order)."""
    rows = np.asarray(rows, np.int64)
    tokens, scored = self.tokens[rows], self.scored[rows]
    return Windows(tokens, scored, self.starts[rows], self.corpus_tokens, files.fingerprint(tokens, scored),
                   self.truncated, self.dropped)

  @classmethod
  def concat(cls, parts: list[Windows]) -> Windows:
    """Several corpora's windows one after the other (shorter windows padded with unscored tokens)."""
    t = max(w.tokens.shape[1] for w in parts)
    pad = lambda a, fill: np.pad(a, ((0, 0), (0, t - fill - a.shape[1])))
    tokens = np.concatenate([pad(w.tokens, 0) for w in parts])
    scored = np.concatenate([pad(w.scored, 1) for w in parts])
    return cls(tokens, scored, np.concatenate([w.starts for w in parts]), sum(w.corpus_tokens for w in parts),
               files.fingerprint(*(w.fingerprint for w in parts)), sum(w.truncated for w in parts),
               sum((w.dropped for w in parts), ()))

  def shuffled(self, seed: int) -> Windows:
    """The same windows in a random order drawn by ``seed`` (``shuffled_rows``): any prefix is a random sample
    (``--until-ci``)."""
    return self.take(shuffled_rows(len(self), seed))


def shuffled_rows(count: int, seed: int) -> np.ndarray:
  """``[count]`` window indices in the random order ``Windows.shuffled`` takes them (stored references read their
  log-probs in the same order)."""
  return np.random.default_rng(seed).permutation(count)


def make_windows(ids, protocol: Protocol, bos_id: int | None = None, source: str = "corpus") -> Windows:
  ids = np.asarray(ids, np.int32)
  t = protocol.seq_len
  step = protocol.stride or t
  available = (len(ids) - t) // step + 1 if len(ids) >= t else 0
  if available == 0:
    raise ValueError(f"{source}: {len(ids)} tokens is shorter than one window of {t} tokens")
  starts = np.arange(available, dtype=np.int64) * step
  if protocol.num_sequences is not None:
    if protocol.num_sequences > available:
      raise ValueError(f"{source}: {len(ids)} tokens give {available} windows of {t} tokens, fewer than the "
                       f"{protocol.num_sequences} sequences asked for")
    rng = np.random.default_rng(protocol.seed)
    starts = np.sort(rng.choice(starts, protocol.num_sequences, replace=False))
  tokens = ids[starts[:, None] + np.arange(t)]
  scored = np.ones((len(starts), t - 1), bool)
  if protocol.stride is not None:  # past the corpus start, only the tokens no earlier window reached
    scored[starts > 0, :t - 1 - protocol.stride] = False
  if protocol.score_second_half:
    scored[:, :t // 2] = False
    if bos_id is not None:
      tokens[:, 0] = bos_id
  digest = files.fingerprint(tokens, scored)
  return Windows(tokens, scored, starts, len(ids), digest)
