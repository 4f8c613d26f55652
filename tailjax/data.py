"""Corpus -> token windows: the text an evaluation scores, and which predictions count.

A corpus is read as documents, joined with blank lines (WikiText's convention) and
tokenized once with the reference tokenizer; the token stream is cut into
non-overlapping windows of ``seq_len`` tokens. Two protocols decide which windows and
which positions are scored:

- ``ram`` (../shared/mission/004): ``num_sequences`` windows sampled without replacement
  by ``seed``; every next-token prediction in a window counts (``seq_len - 1`` per window).
- ``llamacpp`` (llama.cpp's ``perplexity``/``--kl-divergence``): every window; the first
  half is context only and predictions ``seq_len/2 .. seq_len-2`` count; the first token
  is replaced by BOS when the tokenizer adds one.
"""

from __future__ import annotations

import dataclasses
import glob
import json
from pathlib import Path

import numpy as np

from tailjax import files

BUILTIN_CORPORA = {
    "pydoc": "CPython's reference manual (pydoc_data.topics), shipped with every Python",
}


def check_corpus(spec: str) -> None:
  """Whether ``spec`` can name a corpus (a built-in, a glob with matches, an existing file), without reading it."""
  if spec in BUILTIN_CORPORA:
    return
  if any(c in spec for c in "*?["):
    if not glob.glob(spec):
      raise FileNotFoundError(f"{spec}: no file matches")
    return
  path = Path(spec)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such corpus file (or a built-in corpus: {sorted(BUILTIN_CORPORA)})")
  if path.is_dir():
    raise ValueError(f"{path}: the corpus names a directory; give a file or a glob such as {path / '*.jsonl'}")


def read_documents(spec: str, field: str = "text") -> list[str]:
  """``pydoc``, a text file, JSONL (``field`` of each line) or Parquet (column ``field``); a glob reads each match."""
  if spec == "pydoc":
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]
  if any(c in spec for c in "*?["):
    matches = sorted(glob.glob(spec))
    if not matches:
      raise FileNotFoundError(f"{spec}: no file matches")
    return [doc for match in matches for doc in read_documents(match, field)]
  check_corpus(spec)
  path = Path(spec)
  if path.suffix == ".jsonl":
    documents = []
    with path.open() as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          documents.append(str(json.loads(line)[field]))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
          raise ValueError(f"{path}:{number}: not a JSON object with a {field!r} field ({err!r})") from err
    return documents
  if path.suffix == ".parquet":
    import pyarrow.parquet as pq

    try:
      table = pq.read_table(path)
    except Exception as err:  # pyarrow raises its own error types for damaged files
      raise ValueError(f"{path}: unreadable Parquet file ({err})") from err
    if field not in table.column_names:
      raise ValueError(f"{path}: Parquet file has no column {field!r} (columns: {table.column_names})")
    return [str(x) for x in table.column(field).to_pylist() if x is not None]
  try:
    return [path.read_text()]
  except UnicodeDecodeError as err:
    raise ValueError(f"{path}: not UTF-8 text ({err})") from err


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
  truncated: int = 0  # records cut at the window length, losing scored tokens (span corpora: tailjax.spans)
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
    """The same windows in a random order drawn by ``seed``: any prefix is a random sample (``--until-ci``)."""
    return self.take(np.random.default_rng(seed).permutation(len(self)))


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


def corpus_windows(spec: str, tokenizer, protocol: Protocol, field: str = "text") -> Windows:
  """Read, tokenize (``tokenizer.encode``) and cut a corpus in one call. A JSONL file of prompt/response or
  chat records is scored record by record, on its responses only (``tailjax.spans``)."""
  from tailjax import spans

  if spans.span_kind(spec) is not None:
    return spans.span_windows(spec, tokenizer, protocol)
  documents = [d for d in read_documents(spec, field) if d.strip()]
  if not documents:
    raise ValueError(f"{spec}: the corpus holds no text")
  ids = tokenizer.encode("\n\n".join(documents))
  return make_windows(ids, protocol, tokenizer.bos_id if tokenizer.add_bos else None, spec)


# ---------------------------------------------------------------------------------------------
# Training: documents packed into fixed-length windows.


def split_documents(documents: list[str], val_fraction: float, seed: int,
                    source: str = "corpus") -> tuple[list[str], list[str]]:
  """(train, validation) documents of ``source``: a ``val_fraction`` share drawn by ``seed``, at least one each."""
  if not 0 < val_fraction < 1:
    raise ValueError(f"val_fraction={val_fraction} must lie strictly between 0 and 1")
  if len(documents) < 2:
    raise ValueError(f"{source}: {len(documents)} document(s): a validation split needs at least two (or give "
                     "val_data)")
  order = np.random.default_rng(seed).permutation(len(documents))
  n_val = min(max(1, round(val_fraction * len(documents))), len(documents) - 1)
  val = set(order[:n_val].tolist())
  return ([d for i, d in enumerate(documents) if i not in val], [d for i, d in enumerate(documents) if i in val])


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
