"""``EvalConfig``: everything an evaluation run computes, from a YAML file and ``tailjax eval``'s flags.

The window protocol is named (``protocol``) and overridden field by field (``seq_len``, ``num_sequences``,
``seed``); ``window_protocol()`` resolves it. ``tailjax.runner.run`` runs a config; ``EvalConfig.from_file``
names unknown fields and each field of the wrong type (``tailjax.configs``). The CLI's help quotes these
defaults, so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from tailjax import configs, data

PROTOCOL_CHOICES = tuple(data.PROTOCOLS)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  reference: str | None = None  # model spec; None (with no candidates): the embedded SmolLM2 default
  candidates: list[str] = ()  # model specs, or @QUANT for the reference rounded
  corpus: str | list[str] = "pydoc"  # text, .jsonl, .parquet, or 'pydoc'; several: per corpus and pooled
  text_field: str = "text"
  protocol: str | None = None  # one of data.PROTOCOLS; None: 'ram' with a reference, 'default' without
  seq_len: int | None = None  # overrides of the protocol's window length, window count (0: all) and seed
  num_sequences: int | None = None
  seed: int | None = None
  stride: int | None = None  # windows advancing by this many tokens, each token scored once (data.Protocol)
  batch_size: int | None = None  # None: 4, or the smallest multiple of the mesh's data shards above it
  until_ci: float | None = None  # stop once every candidate's KLD intervals are this narrow (relative; stopping)
  until_ci_summaries: list[str] = ("median",)  # the KLD summaries until_ci waits for: mean, median, p90 ... p99.9
  block_memory_mb: float = 256  # per-window bootstrap blocks held before neighbours merge (eval_state)
  jensen_shannon: bool = False  # also JS(p_ref, p_cand) per token: a second pass over the vocabulary
  spike_thresholds: list[float] = (0.5,)  # KLD above which a token is a spike; the first is the headline
  worst: int = 20  # highest-KLD tokens listed per candidate
  save_every: float = 30.0  # seconds between saved states of a run with an output directory
  kl_divergence_base: str | None = None  # a llama.cpp base file as the reference (instead of model + corpus)
  reference_cache: str | None = None  # a reference cache as the reference
  save_reference_cache: str | None = None  # write the reference's top-K log-probs here
  cache_k: int = 32
  dump_tokens: str | None = None  # Parquet file of every scored token's values
  mesh: str | None = None  # data=8, data=4,model=2, auto, ...
  dtype: str = "auto"  # float32, bfloat16, float16, or auto: each checkpoint's own on an accelerator

  def __post_init__(self):
    for name in ("candidates", "spike_thresholds", "until_ci_summaries"):  # YAML lists, CLI tuples, one string
      object.__setattr__(self, name, configs.items(getattr(self, name)))
    problems = configs.type_problems(self)
    if self.protocol is not None and self.protocol not in PROTOCOL_CHOICES:
      problems.append(f"protocol={self.protocol!r} is not one of {', '.join(PROTOCOL_CHOICES)}")
    if problems:
      raise ValueError("eval config: " + "; ".join(problems))

  @classmethod
  def from_file(cls, path: str | Path | None = None, **overrides) -> EvalConfig:
    """A YAML (or JSON) file of fields, then ``overrides`` (None values are ignored): ``configs.from_file``."""
    return configs.from_file(cls, path, **overrides)

  def window_protocol(self) -> data.Protocol:
    """The named protocol with this config's overrides (``num_sequences=0``: every window). A corpus of records
    (prompt/response or chat JSONL, ``tailjax.spans``) scores every record unless ``num_sequences`` is given."""
    from tailjax import spans

    chosen = data.PROTOCOLS[self.protocol or ("ram" if self.reference else "default")]
    overrides: dict[str, Any] = {k: v for k, v in (("seq_len", self.seq_len), ("seed", self.seed),
                                                   ("stride", self.stride)) if v is not None}
    corpora = [self.corpus] if isinstance(self.corpus, str) else list(self.corpus)
    if self.num_sequences is not None:
      overrides["num_sequences"] = self.num_sequences or None
    elif corpora and all(spans.span_kind(c) for c in corpora):
      overrides["num_sequences"] = None
    return dataclasses.replace(chosen, **overrides)

  def to_dict(self) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


DEFAULTS = EvalConfig()
