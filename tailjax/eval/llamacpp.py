"""llama.cpp's KL-divergence base files (``--save-all-logits`` / ``--kl-divergence-base``), read and written.

Format (llama.cpp ``tools/perplexity``): the 8 bytes ``_logits_``; int32 ``n_ctx``, ``n_vocab``,
``n_chunk``; ``n_chunk * n_ctx`` int32 token ids; then per chunk, for each scored
position ``n_ctx/2 .. n_ctx-2``, a record of ``nv = 2*((n_vocab+1)/2) + 4`` uint16: a float32
``scale``, a float32 ``min_log_prob`` and one uint16 code per vocabulary entry, with
``log p = scale * code + min_log_prob``. Logits more than 16 nats below the maximum are
stored as code 0 (saturated); llama.cpp's KL leaves those entries out, and so does
``base_kl_divergence`` here, so numbers match llama.cpp's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

MAGIC = b"_logits_"


def record_width(n_vocab: int) -> int:
  return 2 * ((n_vocab + 1) // 2) + 4


@dataclasses.dataclass
class KldBase:
  """A memory-mapped base file: tokens and per-position compressed reference log-probs."""

  path: Path
  n_ctx: int
  n_vocab: int
  tokens: np.ndarray  # int32 [n_chunk, n_ctx]
  records: np.ndarray  # uint16 [n_chunk, scored_per_chunk, record_width] (memory-mapped)

  @property
  def first_scored(self) -> int:
    return self.n_ctx // 2

  def chunk_logprobs(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """``([P, n_vocab] float32 reference log-probs, [P, n_vocab] bool code > 0)`` of one chunk's scored positions."""
    record = np.asarray(self.records[chunk])
    header = record[:, :4].copy().view(np.float32)  # [P, 2]: scale, min_log_prob
    codes = record[:, 4:4 + self.n_vocab]
    logprobs = header[:, :1] * codes.astype(np.float32) + header[:, 1:2]
    return logprobs, codes > 0


def read_base(path: str | Path) -> KldBase:
  path = Path(path)
  try:
    raw = np.memmap(path, np.uint8, mode="r")
  except (OSError, ValueError) as err:
    raise ValueError(f"{path}: unreadable llama.cpp logits file ({err})") from err
  if raw.size < 20 or bytes(raw[:8]) != MAGIC:
    raise ValueError(f"{path}: not a llama.cpp logits file (no {MAGIC!r} header)")
  n_ctx, n_vocab, n_chunk = (int(x) for x in raw[8:20].view(np.int32))
  if n_ctx < 4 or n_vocab < 1 or n_chunk < 1:
    raise ValueError(f"{path}: implausible header n_ctx={n_ctx} n_vocab={n_vocab} n_chunk={n_chunk}")
  scored = n_ctx - 1 - n_ctx // 2
  token_bytes = 4 * n_chunk * n_ctx
  expected = 20 + token_bytes + 2 * n_chunk * scored * record_width(n_vocab)
  if raw.size != expected:
    raise ValueError(f"{path}: {raw.size} bytes, but its header (n_ctx={n_ctx}, n_vocab={n_vocab}, "
                     f"n_chunk={n_chunk}) implies {expected}: truncated or not format v1")
  tokens = np.asarray(raw[20:20 + token_bytes].view(np.int32).reshape(n_chunk, n_ctx))
  records = raw[20 + token_bytes:].view(np.uint16).reshape(n_chunk, scored, record_width(n_vocab))
  return KldBase(path, n_ctx, n_vocab, tokens, records)


def encode(logits: np.ndarray) -> np.ndarray:
  """``[P, V]`` float32 logits -> ``[P, record_width(V)]`` uint16 records, as llama.cpp writes them."""
  logits = np.asarray(logits, np.float32)
  p, v = logits.shape
  top = logits.max(axis=1, keepdims=True)
  low = np.maximum(logits.min(axis=1, keepdims=True), top - 16)
  log_sum_exp = np.log(np.exp((logits - top).astype(np.float64)).sum(axis=1, keepdims=True)).astype(np.float32)
  scale = ((top - low) / np.float32(65535)).astype(np.float32)
  min_log_prob = (low - top - log_sum_exp).astype(np.float32)
  with np.errstate(divide="ignore", invalid="ignore"):
    codes = np.where((logits > low) & (scale > 0), np.rint((logits - low) * (1 / scale)), 0)
  out = np.zeros((p, record_width(v)), np.uint16)
  out[:, :4] = np.concatenate([scale, min_log_prob], axis=1).view(np.uint16)
  out[:, 4:4 + v] = codes.astype(np.uint16)
  return out


def write_base(path: str | Path, tokens: np.ndarray, logits_of_chunk) -> Path:
  """Write a base file; ``logits_of_chunk(i)`` gives chunk ``i``'s ``[n_ctx, V]`` logits (positions 0..n_ctx-1)."""
  path = Path(path)
  tokens = np.asarray(tokens, np.int32)
  n_chunk, n_ctx = tokens.shape
  with path.open("wb") as f:
    first = logits_of_chunk(0)
    f.write(MAGIC + np.asarray([n_ctx, first.shape[-1], n_chunk], np.int32).tobytes() + tokens.tobytes())
    for i in range(n_chunk):
      logits = first if i == 0 else logits_of_chunk(i)
      f.write(encode(np.asarray(logits)[n_ctx // 2:n_ctx - 1]).tobytes())
  return path


def base_token_stats(base_logprobs: jax.Array, base_valid: jax.Array, cand_logits: jax.Array, targets: jax.Array):
  """Per-position KLD(base || cand), both CEs, top-1 agreement, log-prob delta and the base's top-1 probability,
  llama.cpp's way.

  ``base_logprobs, base_valid, cand_logits: [..., V]``; ``targets: [...]``. KL sums over the
  entries the base stored (code > 0) without renormalizing, as llama.cpp does.
  """
  cand = jax.nn.log_softmax(cand_logits.astype(jnp.float32), axis=-1)
  p = jnp.where(base_valid, jnp.exp(base_logprobs), 0.0)
  kld = jnp.sum(p * (base_logprobs - jnp.where(base_valid, cand, 0.0)), axis=-1)
  pick = lambda x: jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
  ref_ce, cand_ce = -pick(base_logprobs), -pick(cand)
  agree = (jnp.argmax(base_logprobs, -1) == jnp.argmax(cand, -1)).astype(jnp.float32)
  return kld, ref_ce, cand_ce, agree, ref_ce - cand_ce, jnp.exp(jnp.max(base_logprobs, -1))
