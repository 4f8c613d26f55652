"""``tailjax eval`` as a Python function: ``run(config, output)``, a config in, the ``report.json`` dictionary out.

corpus -> windows (``tailjax.data``) -> models (``tailjax.models``) -> per-token values into sketches
(``tailjax.eval.step``'s ``Evaluator``) -> summaries (``tailjax.eval.summaries``) -> report (``tailjax.report``).
With ``output``, the run directory (``tailjax.eval.run_dir``) holds ``run.json``, the saved state and, once
finished, ``report.json``, ``report.md`` and ``report.html``. Re-running the same command resumes; a directory that
holds a different run is refused, and nothing in it is overwritten.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from tailjax import data, files, models, report
from tailjax.data import spans
from tailjax.eval import llamacpp, reference_cache, references, run_dir, stopping, summaries
from tailjax.eval.config import EvalConfig
from tailjax.eval.state import EvalState
from tailjax.eval.step import EvalOptions, Evaluator
from tailjax.models import LoadedModel, ModelSpec, QuantSpec, Tokenizer


class Compared(NamedTuple):
  """What a run compares: ``reference`` (a model or stored log-probs), the ``candidates``' models, every model's
  ``labels`` (reference first), the ``tokenizer`` that cut (or decodes) the windows, the windows of each corpus
  (``parts``), the ``protocol`` that cut them (its ``seq_len`` the longest window), each model's ``sources`` and
  the reference's ``storage`` (``models.storage``), and the ``loaded`` models (those whose dtype the run names)."""

  reference: references.Reference
  candidates: list[LoadedModel]
  labels: list[str]
  tokenizer: Tokenizer
  parts: list[data.Windows]
  protocol: data.Protocol
  sources: list[str]
  storage: str
  loaded: list[LoadedModel]


def run(config: EvalConfig, output: str | Path | None = None, *, console=None) -> dict[str, Any]:
  """Evaluate ``config.candidates`` against ``config.reference`` on its corpora (``EvalConfig`` says what each
  field does), into the run directory ``output`` if any; returns the ``report.json`` dictionary.

  Several corpora are scored one after the other with the same models: the report is of all their windows pooled,
  with ``report["corpora"]`` giving each corpus's own summaries. On a mesh (``config.mesh``; over hosts after
  ``tailjax.mesh.initialize``) every process runs this same call and process 0 alone writes ``output`` (which must
  be visible to all hosts to resume).
  """
  from rich.console import Console

  from tailjax import mesh as meshes

  console = console or Console(stderr=True)
  started = time.perf_counter()
  device_mesh = meshes.parse(config.mesh) if config.mesh else None
  config.check_paths(output)  # before any model loads: a wrong path costs nothing
  compared = compare(config, device_mesh)
  batch_size = config.batch_size_on(device_mesh)
  described = describe(config, compared, batch_size, console)
  if device_mesh is not None:
    described["mesh"] = dict(device_mesh.shape)
  _say_loaded(config, compared, described, console, time.perf_counter() - started)
  writes = meshes.is_writer()
  evaluator = Evaluator(compared.reference, compared.candidates, EvalOptions(
      tuple(compared.labels), batch_size, tuple(config.spike_thresholds), config.worst, config.jensen_shannon,
      dump=config.dump_tokens is not None and writes,
      cache_k=config.cache_k if config.save_reference_cache is not None and writes else 0, device_mesh=device_mesh))
  directory = run_dir.RunDir(output, run_dir.identity(described), parts=len(compared.parts),
                             save_every=config.save_every, console=console)
  states = _score(config, compared, evaluator, directory, described)
  result = _summarize(config, compared, states, described)
  failed = _write(config, compared, evaluator, result, output if directory.writes else None, console)
  if failed:
    result["run"]["write_errors"] = failed
  return result


def load_candidate(spec: str | ModelSpec, reference: LoadedModel, dtype: str = "float32",
                   device_mesh=None) -> LoadedModel:
  """A model spec (``ModelSpec``; in ``dtype``, or its own with ``"auto"``: ``models.resolve_dtype``; placed on
  ``device_mesh``), or ``@<quantization>``: the reference itself, rounded shard by shard where it lies
  (no second load), in the reference's dtype."""
  spec = spec if isinstance(spec, ModelSpec) else ModelSpec.parse(spec)
  if not spec.of_reference:
    return models.load(spec.unlabelled, dtype, device_mesh=device_mesh)
  quantization = QuantSpec.parse(spec.quantization)
  graph, state = nnx.split(reference.model)
  model = nnx.merge(graph, jax.tree.map(lambda x: x, state))  # new variables, same arrays: the unrounded are shared
  models.quantize_model(model, quantization)
  return LoadedModel(reference.config, model, reference.tokenizer, reference.source, quantization)


def compare(config: EvalConfig, device_mesh=None) -> Compared:
  """The models of ``config`` loaded (in its dtype, on ``device_mesh``) and its corpora cut into windows with the
  reference's tokenizer; or, against a stored reference, the candidates and the stored tokens."""
  if config.stored_kind() is not None:
    return _against_stored(config, device_mesh)
  reference_spec = ModelSpec.parse(config.reference_spec())
  candidates = config.candidate_specs()
  if not candidates:
    raise ValueError("give at least one --candidate (a model spec, or @int4 for the reference quantized)")
  if reference_spec.of_reference:
    raise ValueError(f"reference {config.reference}: give a model path (@QUANT alone names the reference, rounded)")
  ref = models.load(reference_spec.unlabelled, config.dtype, device_mesh=device_mesh)
  if ref.tokenizer is None:
    raise ValueError(f"{reference_spec.unlabelled}: the reference has no tokenizer to cut the corpus with")
  named = [(reference_spec.label, ref)]
  for spec in map(ModelSpec.parse, candidates):
    named.append((spec.label, load_candidate(spec, ref, config.dtype, device_mesh)))
  protocol = config.window_protocol()
  parts = [data.corpus_windows(c, ref.tokenizer, protocol, config.text_field) for c in config.corpora()]
  protocol = dataclasses.replace(protocol, seq_len=max(w.tokens.shape[1] for w in parts))  # spans: longest record
  if config.until_ci is not None:
    parts = [w.shuffled(protocol.seed) for w in parts]
  loaded = [m for _, m in named]
  return Compared(references.ModelReference(ref), loaded[1:], _labels(named, ref), ref.tokenizer, parts, protocol,
                  [m.name for m in loaded], models.storage(reference_spec.unlabelled), loaded)


def _against_stored(config: EvalConfig, device_mesh) -> Compared:
  """A stored reference (llama.cpp base file or tailjax reference cache) and the candidates to score against it."""
  kind = config.stored_kind()
  path = config.kl_divergence_base or config.reference_cache
  named = [ModelSpec.parse(spec) for spec in config.candidates]
  if not named or any(spec.of_reference for spec in named):
    raise ValueError(f"with --{kind}, every --candidate must be a model spec (there is no reference model to "
                     "quantize)")
  cands = [models.load(spec.unlabelled, config.dtype, device_mesh=device_mesh) for spec in named]
  labels = [Path(path).stem, *_labels([(spec.label, c) for spec, c in zip(named, cands)], None)]
  tokenizer = next((c.tokenizer for c in cands if c.tokenizer is not None), None)
  if tokenizer is None:
    raise ValueError(f"no candidate has a tokenizer to decode the {kind}'s tokens with")
  if kind == "kl-divergence-base":
    stored = references.BaseReference(llamacpp.read_base(path), tokenizer.bos_id if tokenizer.add_bos else None)
  else:
    stored = references.CacheReference(reference_cache.load(path))
  protocol = dataclasses.replace(data.DEFAULT_PROTOCOL, name=kind, seq_len=stored.windows.tokens.shape[1],
                                 num_sequences=None)
  if config.until_ci is not None:  # the windows and the stored values read for them, in one order
    stored = stored.shuffled(protocol.seed)
  return Compared(stored, cands, labels, tokenizer, [stored.windows], protocol, [str(path), *(c.name for c in cands)],
                  f"stored log-probabilities ({kind})", cands)


def _labels(named: Sequence[tuple[str | None, LoadedModel]], reference: LoadedModel | None) -> list[str]:
  """Short unique names: the user's, else the file's stem, else (the reference rounded) the quantization."""
  labels = []
  for label, loaded in named:
    stem = Path(loaded.source).stem
    if loaded.quantization is None:
      base = label or stem
    elif reference is not None and loaded.source == reference.source and loaded is not reference:
      base = label or str(loaded.quantization)
    else:
      base = label or f"{stem}@{loaded.quantization}"
    label, k = base, 2
    while label in labels:
      label, k = f"{base}#{k}", k + 1
    labels.append(label)
  return labels


def describe(config: EvalConfig, compared: Compared, batch_size: int, console) -> dict[str, Any]:
  """The ``run`` entry of ``report.json`` (its identity fields make ``run.json``); warns of windows longer than a
  model was trained on, and of records a span corpus could not score or had to cut."""
  protocol, windows = compared.protocol, _pooled(compared.parts)
  corpora = config.corpora() or [str(config.kl_divergence_base or config.reference_cache)]
  stored = config.stored_kind() is not None
  loaded_labels = compared.labels[1:] if stored else compared.labels  # a stored reference is no model
  for label, loaded in zip(loaded_labels, compared.loaded):
    if protocol.seq_len > loaded.config.max_position_embeddings:
      console.print(f"[yellow]warning:[/yellow] {label} was trained on at most "
                    f"{loaded.config.max_position_embeddings} positions; windows have {protocol.seq_len}")
  described = {"models": dict(zip(compared.labels, compared.sources)),
               "corpus": corpora[0] if len(corpora) == 1 else list(corpora), "protocol": protocol.name,
               "seq_len": protocol.seq_len, "num_sequences": protocol.num_sequences, "seed": protocol.seed,
               "stride": protocol.stride, "fingerprint": windows.fingerprint, "batch_size": batch_size,
               "spike_thresholds": list(config.spike_thresholds), "windows": len(windows),
               "scored_tokens": windows.scored_tokens, "corpus_tokens": windows.corpus_tokens,
               "block_budget": int(config.block_memory_mb * 2**20), "reference_storage": compared.storage}
  if config.until_ci is not None:
    described["until_ci"] = {"relative_width": config.until_ci, "summaries": list(config.until_ci_summaries)}
  if config.jensen_shannon:
    described["jensen_shannon"] = True
  kinds = {None} if stored else {spans.span_kind(c) for c in corpora}
  if kinds != {None}:
    described.update(_span_counts(kinds, windows, protocol, console))
  described["dtype"] = dict(zip(loaded_labels, (str(m.model.embed.embedding.get_value().dtype)
                                                for m in compared.loaded)))
  return described


def _span_counts(kinds: set[str | None], windows: data.Windows, protocol: data.Protocol, console) -> dict[str, Any]:
  """What a span corpus scores, and the records it dropped or cut (each also a warning)."""
  if windows.dropped:
    shown = ", ".join(windows.dropped[:5]) + (f" and {len(windows.dropped) - 5} more" if len(windows.dropped) > 5
                                               else "")
    console.print(f"[yellow]warning:[/yellow] {len(windows.dropped)} records have nothing to score (no assistant "
                  f"turn or an empty response) and are left out: {shown}", highlight=False)
  if windows.truncated:
    console.print(f"[yellow]warning:[/yellow] {windows.truncated} records are longer than {protocol.seq_len} tokens: "
                  "their scored tokens past it are lost (raise --seq-len)")
  return {"scoring": " / ".join(sorted({"chat": "assistant messages only", "prompt-response": "responses only",
                                        None: "every token"}[k] for k in kinds)),
          "truncated_records": windows.truncated, "dropped_records": list(windows.dropped)}


def _say_loaded(config: EvalConfig, compared: Compared, described: dict[str, Any], console, seconds: float) -> None:
  parts = len(compared.parts)
  how = "as asked" if config.dtype != "auto" else ("float32 on a CPU" if jax.default_backend() == "cpu" else
                                                   "each checkpoint's own")
  console.print(f"loaded {len(compared.labels)} models ({', '.join(sorted(set(described['dtype'].values())))}: "
                f"{how}) and {described['windows']} windows x {described['seq_len']} tokens "
                f"({described['scored_tokens']} scored{f', {parts} corpora' if parts > 1 else ''}) in {seconds:.1f} s",
                highlight=False)


def _pooled(parts: list[data.Windows]) -> data.Windows:
  return parts[0] if len(parts) == 1 else data.Windows.concat(parts)


def _score(config: EvalConfig, compared: Compared, evaluator: Evaluator, directory: run_dir.RunDir,
           described: dict[str, Any]) -> list[EvalState]:
  """Every corpus scored in turn, each from its saved state if the run directory holds one; with ``until_ci``,
  each stops once its intervals are narrow enough (and ``described["until_ci"]`` says how it ended)."""
  parts = compared.parts
  states = [directory.resumed(i, len(w)) or evaluator.new_state(described["block_budget"])
            for i, w in enumerate(parts)]
  if (evaluator.dump is not None or evaluator.reference_topk is not None) and states[0].windows_done:
    raise ValueError("--dump-tokens and --save-reference-cache need a run from the start; they cannot resume "
                     "(delete the state or the flag)")
  stop = None
  if config.until_ci is not None:
    stop = lambda current: stopping.kld_precision(current, config.until_ci_summaries).within(config.until_ci)
  names = config.corpora()
  for i, part in enumerate(parts):
    states[i] = directory.run(evaluator, part, states[i], part=i, stop=stop,
                              description=names[i] if len(parts) > 1 else "windows")
  if config.until_ci is not None:
    checks = [stopping.kld_precision(state, config.until_ci_summaries) for state in states]
    described["until_ci"].update(met=all(c.within(config.until_ci) for c in checks),
                                 windows_used=sum(state.windows_done for state in states),
                                 widths=checks[0].widths if len(checks) == 1 else
                                 {corpus: c.widths for corpus, c in zip(names, checks)})
  return states


def _summarize(config: EvalConfig, compared: Compared, states: list[EvalState],
               described: dict[str, Any]) -> dict[str, Any]:
  """The ``report.json`` dictionary: the pooled state's summaries, and with several corpora each one's own."""
  parts, thresholds = compared.parts, tuple(config.spike_thresholds)
  state = states[0] if len(states) == 1 else EvalState.concat(states)
  windows = parts[0] if len(parts) == 1 else data.Windows.concat(
      [w.take(range(s.windows_done)) for w, s in zip(parts, states)])
  result = summaries.build_report(state, described, described["models"], spike_thresholds=thresholds,
                                  windows=windows, tokenizer=compared.tokenizer)
  if len(parts) > 1:
    result["corpora"] = {corpus: summaries.corpus_report(part_state, thresholds, described)
                         for corpus, part_state in zip(config.corpora(), states)}
  return result


def _write(config: EvalConfig, compared: Compared, evaluator: Evaluator, result: dict[str, Any],
           output: str | Path | None, console) -> list[str]:
  """Every output of a finished run; one output's failure (a full disk) loses none of the others. Returns what
  could not be written, each with its reason."""
  writes = [("the report", lambda: report.write(result, output))] if output is not None else []
  if evaluator.reference_topk is not None:
    topk = evaluator.reference_topk
    reference = compared.reference.loaded
    writes.append(("the reference cache", lambda: reference_cache.ReferenceCache(
        compared.parts[0], *(np.concatenate(topk[k]) for k in ("ids", "logprobs", "target_logprob")),
        reference.config.vocab_size, reference.name, reference.tokenizer.fingerprint()).save(
            config.save_reference_cache)))
  if evaluator.dump is not None:
    writes.append(("the token dump", lambda: _write_dump(evaluator, compared.labels[1:], config.dump_tokens)))
  failed = []
  for what, write in writes:
    try:
      write()
    except OSError as err:
      failed.append(f"{what}: {err}")
      console.print(f"[red]error:[/red] could not write {what} ({err})", highlight=False)
  return failed


def _write_dump(evaluator: Evaluator, labels: Sequence[str], path) -> None:
  import pyarrow.parquet as pq

  files.write_atomic(path, lambda f: pq.write_table(evaluator.dump.table(labels), f), "the token dump")
