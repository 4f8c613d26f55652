"""Reading finished runs: each checkpoint's validation CE summary (saved, or evaluated on a corpus) for
``tailjax select``, and the table a user reads after a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flax import nnx

from tailjax.distill.config import EVAL_FILE
from tailjax.distill.loop import DistillResult
from tailjax.distill.setup import pack, read_examples
from tailjax.distill.step import validation_ce
from tailjax.models import load
from tailjax.models.load import CHECKPOINT_FILE


def evaluate_checkpoint(step_dir: str | Path, corpus: str, *, text_field: str = "text", device_mesh=None,
                        dtype: str = "auto") -> dict[str, Any]:
  """The validation CE summary of a checkpoint on ``corpus``, windows shaped as its run's (or 64 x 512), with
  parameters in ``dtype`` (``"auto"``: ``tailjax.models.resolve_dtype``)."""
  step_dir = Path(step_dir)
  run_config = step_dir.parent.parent / "config.json"
  shape = json.loads(run_config.read_text()) if run_config.exists() else {}
  seq_len, count = shape.get("seq_len", 512), shape.get("val_windows") or 64
  loaded = load(step_dir, dtype, device_mesh=device_mesh)
  if loaded.tokenizer is None:
    raise ValueError(f"{step_dir}: the checkpoint has no tokenizer to read {corpus} with")
  windows = pack(read_examples(corpus, loaded.tokenizer, text_field), loaded.tokenizer, seq_len, corpus).take(count)
  graphdef, params = nnx.split(loaded.model, nnx.Param)
  summary = validation_ce(graphdef, params, windows, batch_size=shape.get("batch_size", 8),
                          vocab_size=loaded.tokenizer.vocab_size, device_mesh=device_mesh)
  return {"windows": len(windows), "fingerprint": windows.fingerprint, "corpus": corpus, "ce": summary.to_dict()}


def read_run(directory: str | Path, corpus: str | None = None, device_mesh=None,
             dtype: str = "auto") -> dict[str, dict[str, Any]]:
  """A distill run (or one checkpoint) -> ``{"<run>@<step>": CE summary}``, one entry per checkpoint.

  Summaries saved with the checkpoints are read; a checkpoint without one is evaluated on
  ``corpus`` when given.
  """
  directory = Path(directory)
  steps = [directory] if (directory / CHECKPOINT_FILE).exists() else sorted(
      (p for p in (directory / "checkpoints").glob("*") if p.name.isdigit()), key=lambda p: int(p.name))
  found = {}
  for step_dir in steps:
    name = f"{step_dir.parent.parent.name}@{step_dir.name}" if step_dir.parent.name == "checkpoints" else step_dir.name
    path = step_dir / EVAL_FILE
    if path.exists():
      found[name] = json.loads(path.read_text())
    elif corpus is not None:
      found[name] = evaluate_checkpoint(step_dir, corpus, device_mesh=device_mesh, dtype=dtype)
    else:
      raise FileNotFoundError(f"{path}: this checkpoint has no saved evaluation (give a corpus to evaluate it on)")
  if not found:
    raise FileNotFoundError(f"{directory}: not a tailjax distill run (no checkpoints/<step>/)")
  return found


def render(result: DistillResult, console) -> None:
  """Validation CE of every evaluated step: the table a user reads after a run."""
  from rich.table import Table

  table = Table(title=f"tailjax distill: {result.output}")
  measured = next((e.get("tasks", [e["task"]]) for e in result.evals.values() if "task" in e), [])
  accuracy = [f"{t['decoding']} accuracy" for t in measured]
  for column in ("step", "CE mean", "median", "p90", "p99", "train loss", *accuracy):
    table.add_column(column, justify="right")
  for step, evaluation in sorted(result.evals.items()):
    ce = evaluation["ce"]
    loss = result.losses.get(step)
    found = evaluation.get("tasks", [evaluation["task"]] if "task" in evaluation else [])
    task = [f"{t['accuracy']:.3f}" for t in found] or [""] * len(accuracy)
    table.add_row(str(step), *(f"{ce[k]:.4f}" for k in ("mean", "median", "p90", "p99")),
                  "" if loss is None else f"{loss:.4f}", *task)
  console.print(table)
  console.print(f"checkpoints: {', '.join(map(str, result.checkpoints))} in {result.output / 'checkpoints'}")
