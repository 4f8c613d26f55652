"""On-policy batches (GKD; Agarwal et al., 2024): a fraction of a run's steps learn from the student's own
continuations, scored by the teacher, instead of the corpus's tokens.

Each example of a training batch (a segment of a window: a record, or a document's share of the window) keeps a
prompt, and the student rewrites the rest of its room:

- a record keeps everything before its last answer or assistant span; the continuation takes that span's place,
  in the room from the span's start to the record's end;
- a document (every token a target) keeps its first ``prompt_tokens`` tokens.

A continuation is sampled (``temperature``, ``top_k``, ``top_p``) and ends at an end-of-sequence id (kept: ending
is a choice the teacher judges), after ``max_new_tokens`` or where its room ends. Its tokens are the batch's only
targets; the rest of the room is unscored padding. Windows, segments and shapes stay the corpus batch's: nothing
compiles again, and an interrupted run resumes to the same batches (which steps are on-policy, and every sampling
key, follow the run's seed and the step). No gradient flows through the sampling (as in GKD).

A continuation is at most as long as the room it rewrites: it is a sample truncated there, not a longer answer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from tailjax import configs
from tailjax.generate import GenerateConfig, Sampling, generate_ids
from tailjax.models.transformer import Decoder


@dataclasses.dataclass(frozen=True)
class OnPolicyConfig:
  """``fraction`` of steps on-policy (GKD's lambda; 1: every step), how continuations are sampled (the module
  docstring) and ``batch_size`` prompts decoded together (None: the training batch's windows)."""

  fraction: float = 0.5
  max_new_tokens: int = 64
  temperature: float = 1.0
  top_k: int | None = None
  top_p: float = 1.0
  prompt_tokens: int = 16
  batch_size: int | None = None

  def __post_init__(self):
    configs.check_types(self, "on_policy")
    if not 0 < self.fraction <= 1:
      raise ValueError(f"on_policy fraction {self.fraction!r}: expected a share of steps in (0, 1]")
    for name in ("max_new_tokens", "prompt_tokens"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"on_policy {name} {getattr(self, name)!r}: expected a whole number >= 1")
    if self.batch_size is not None and self.batch_size < 1:
      raise ValueError(f"on_policy batch_size {self.batch_size!r}: expected >= 1")
    self.sampling  # checks temperature, top_k, top_p

  @property
  def sampling(self) -> Sampling:
    return Sampling(self.temperature, self.top_k, self.top_p)

  @classmethod
  def from_dict(cls, fields: dict[str, Any]) -> OnPolicyConfig:
    configs.refuse_unknown(cls, fields, "on_policy")
    return cls(**fields)


def chosen(fraction: float, seed: int, step: int) -> bool:
  """Whether ``step`` of a run seeded ``seed`` is on-policy: a draw of its own, so a resumed run agrees."""
  return bool(np.random.default_rng([seed, step, 1]).random() < fraction)


def step_seed(seed: int, step: int) -> int:
  """The sampling seed of ``step``'s continuations in a run seeded ``seed``."""
  return int(np.random.default_rng([seed, step, 2]).integers(2**32))


class Example(NamedTuple):
  """One example of a window ``row``: tokens ``[start, cut)`` are its prompt, ``[cut, end)`` its room."""

  row: int
  start: int
  cut: int
  end: int


def examples(segments: np.ndarray, scored: np.ndarray, prompt_tokens: int) -> list[Example]:
  """The examples of a batch (``segments, scored: [B, T + 1]``, padding segment 0) that have a target, a prompt
  and room to write (the module docstring)."""
  found = []
  for row in range(segments.shape[0]):
    for segment in np.unique(segments[row][segments[row] > 0]):
      where = np.flatnonzero(segments[row] == segment)
      start, end = int(where[0]), int(where[-1]) + 1
      targets = np.flatnonzero(scored[row, start:end])
      if targets.size == 0:
        continue
      first = int(targets[-1])  # back from the last target to the start of its span
      while first > 0 and scored[row, start + first - 1]:
        first -= 1
      cut = start + (first or prompt_tokens)  # a span from the segment's start (a document): its first tokens
      if cut < end:
        found.append(Example(row, start, cut, end))
  return found


class Resampled(NamedTuple):
  batch: dict[str, np.ndarray]  # the batch with the student's continuations in place of the corpus's targets
  examples: int  # continuations written
  targets: int  # their tokens, the batch's targets


def resample(model: Decoder, batch: dict[str, np.ndarray], config: OnPolicyConfig, seed: int,
             eos_ids: tuple[int, ...] = ()) -> Resampled:
  """``batch`` (``tokens, segments, scored: [B, T + 1]``) with every example's room rewritten by ``model``
  (the module docstring); sampling keys from ``seed`` (< 2**32)."""
  tokens, segments = batch["tokens"], batch["segments"]
  found = examples(segments, batch["scored"], config.prompt_tokens)
  generate = GenerateConfig(max_new_tokens=config.max_new_tokens, sampling=config.sampling, seed=seed,
                            batch_size=config.batch_size or tokens.shape[0])
  prompts = [tokens[e.row, e.start:e.cut] for e in found]
  continuations = generate_ids(model, prompts, generate, eos_ids=eos_ids) if found else []
  tokens, scored = tokens.copy(), np.zeros_like(batch["scored"])
  for e, continuation in zip(found, continuations):
    ids = [*continuation.token_ids, *(() if continuation.eos_id is None else (continuation.eos_id,))]
    ids = ids[:e.end - e.cut]
    tokens[e.row, e.cut:e.end] = 0
    tokens[e.row, e.cut:e.cut + len(ids)] = ids
    scored[e.row, e.cut:e.cut + len(ids)] = True
  return Resampled({**batch, "tokens": tokens, "scored": scored}, len(found), int(scored.sum()))
