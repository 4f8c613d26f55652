"""Task accuracy: does the model write the answer? Prompts with gold answers, continuations from
``tailjax.generate``, a match rule.

A task is a JSONL file whose records hold a ``prompt`` string (or chat ``messages`` ending with the user's turn) and
an ``answer`` (a string, or a list of accepted strings). Each prompt is continued ``samples`` times, greedily or
sampled; a continuation is correct when, after both are normalised (case folded, runs of whitespace made one
space, ends stripped),

- ``exact``: it equals an accepted answer;
- ``substring``: it contains one.

``accuracy`` is the mean over prompts of the share of correct continuations (greedy: 0 or 1 per prompt; sampled:
an unbiased estimate of pass@1), ``fail_rate`` is ``1 - accuracy``. The paper's fine-tuning case
(../shared/mission/001, section 3) scores greedy substring matches and sampled pass@1 this way.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple

from tailjax import configs, files
from tailjax.generate import decode

METRICS = ("exact", "substring")
DECODINGS = ("greedy", "sample")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """``data``: the task's JSONL; ``metric`` and ``decoding`` (the module docstring); ``samples`` continuations per
  prompt (sampled at ``temperature``); ``max_new_tokens`` each, ended early by the end-of-sequence id or a
  ``stop`` string; ``seed`` of the sampled ones."""

  data: str
  metric: str = "substring"
  decoding: str = "greedy"
  samples: int = 1
  max_new_tokens: int = 32
  temperature: float = 1.0
  stop: tuple[str, ...] = ("\n",)
  seed: int = 0
  batch_size: int = 8

  def __post_init__(self):
    object.__setattr__(self, "stop", configs.items(self.stop))
    configs.check_types(self, "eval_task")
    if self.metric not in METRICS:
      raise ValueError(f"task metric {self.metric!r}: choose one of {METRICS}")
    if self.decoding not in DECODINGS:
      raise ValueError(f"task decoding {self.decoding!r}: choose one of {DECODINGS}")
    if self.decoding == "greedy" and self.samples != 1:
      raise ValueError(f"task samples {self.samples}: greedy decoding writes one continuation per prompt")
    self.generation()  # the generation fields, checked

  @classmethod
  def from_dict(cls, fields: dict[str, Any]) -> TaskConfig:
    configs.refuse_unknown(cls, fields, "eval_task")
    if "data" not in fields:
      raise ValueError("eval_task needs data: a JSONL of prompt (or messages) and answer records")
    return cls(**fields)

  def generation(self) -> decode.GenerateConfig:
    """How the task's continuations are generated."""
    sampling = decode.Sampling() if self.decoding == "greedy" else decode.Sampling(self.temperature)
    return decode.GenerateConfig(self.max_new_tokens, sampling, self.samples, self.seed, self.stop,
                                   batch_size=self.batch_size)


class Item(NamedTuple):
  """One task prompt and the answers that count as correct."""

  prompt: decode.Prompt
  answers: tuple[str, ...]


def read_task(spec: str, tokenizer) -> list[Item]:
  """A task file's records: each prompt (``decode.record_prompt``) with its accepted answers."""
  items = []
  for where, record in files.jsonl_objects(spec, "task"):
    answer = record.get("answer")
    answers = [answer] if isinstance(answer, str) else answer
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
      raise ValueError(f"{where}: a task record needs an 'answer': a non-empty string or list of strings")
    items.append(Item(decode.record_prompt(record, tokenizer, where), tuple(answers)))
  if not items:
    raise ValueError(f"{spec}: no task records")
  return items


def normalise(text: str) -> str:
  return re.sub(r"\s+", " ", text.casefold()).strip()


def correct(completion: str, answers: tuple[str, ...], metric: str) -> bool:
  """Whether ``completion`` matches one of ``answers`` by ``metric`` (the module docstring)."""
  text = normalise(completion)
  if metric == "exact":
    return any(text == normalise(a) for a in answers)
  return any(normalise(a) in text for a in answers)


class Task(NamedTuple):
  """A task as a run holds it: its ``config`` and its ``items``."""

  config: TaskConfig
  items: list[Item]


def task_configs(fields: dict | list | None) -> list[TaskConfig]:
  """A run's ``eval_task``: one mapping of ``TaskConfig`` fields, a list of them (e.g. greedy and sampled), or
  None."""
  if fields is None:
    return []
  listed = fields if isinstance(fields, list) else [fields]
  if not listed or not all(isinstance(f, dict) for f in listed):
    raise ValueError("eval_task: a mapping of task fields, or a list of them")
  return [TaskConfig.from_dict(f) for f in listed]


class TaskResult(NamedTuple):
  """``accuracy`` and ``fail_rate`` over ``prompts`` prompts of ``samples`` continuations each; ``correct[i]`` the
  correct continuations of prompt ``i``."""

  accuracy: float
  fail_rate: float
  prompts: int
  samples: int
  correct: tuple[int, ...]

  def to_dict(self, config: TaskConfig) -> dict[str, Any]:
    return {"accuracy": self.accuracy, "fail_rate": self.fail_rate, "prompts": self.prompts, "samples": self.samples,
            "metric": config.metric, "decoding": config.decoding, "data": config.data}


def evaluate(model, tokenizer, items: list[Item], config: TaskConfig, eos_ids=None) -> TaskResult:
  """Continues every item's prompt with ``model`` (a ``Decoder``) and scores the continuations."""
  outputs = decode.generate_ids(model, [item.prompt.ids for item in items], config.generation(), tokenizer.decode,
                                  decode.default_eos(tokenizer, eos_ids))
  hits = [0] * len(items)
  for g in outputs:
    hits[g.prompt] += correct(g.text, items[g.prompt].answers, config.metric)
  accuracy = sum(h / config.samples for h in hits) / len(items)
  return TaskResult(accuracy, 1.0 - accuracy, len(items), config.samples, tuple(hits))

