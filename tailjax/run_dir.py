"""A run directory: what ``tailjax eval --output DIR`` writes, and how a second run finds its own there.

``run.json`` names what is being computed (``identity``: models, corpus, protocol, fingerprint, ...); a
directory that holds a different run is refused and nothing in it is overwritten (``prepare``). The state
after each batch is saved to ``state.npz`` (``state.<i>.npz`` per corpus of a several-corpus run:
``state_file``) every ``save_every`` seconds, on Ctrl-C and on SIGTERM (``run_with_progress``), and read back by
every process when the same command runs again (``resumed``).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from tailjax import files
from tailjax.eval_state import EvalState, load_state, save_state
from tailjax.evaluate import evaluate


def identity(run: dict[str, Any]) -> dict[str, Any]:
  identity = {k: run[k] for k in ("models", "corpus", "protocol", "seq_len", "num_sequences", "seed", "fingerprint",
                                  "batch_size", "spike_thresholds", "dtype", "block_budget")}
  if run.get("jensen_shannon"):  # a state with and without JS sketches cannot be continued as one
    identity["jensen_shannon"] = True
  if run.get("until_ci"):  # a stopping rule changes which windows a finished run holds
    identity["until_ci"] = {k: run["until_ci"][k] for k in ("relative_width", "summaries")}
  return identity


def check(output: Path) -> None:
  """Before any model loads: ``output`` is new, empty, or holds a readable tailjax run (``prepare`` then compares
  it with this run, which needs the models' fingerprints)."""
  files.output_dir(output, "the output directory")
  run_file = output / "run.json"
  if run_file.exists():
    read_run(run_file)
  elif output.exists() and any(output.iterdir()):
    raise ValueError(f"{output} is not empty and holds no tailjax run; nothing was overwritten")


def read_run(run_file: Path) -> Any:
  try:
    return json.loads(run_file.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
    raise ValueError(f"{run_file}: unreadable run description ({err}); nothing was overwritten: delete the "
                     "directory to start over") from err


def prepare(output: Path, identity: dict[str, Any]) -> bool:
  """Refuse a directory that holds something else; True when it holds this run's saved state. A run that
  never saved a window (it failed its checks, or was killed at once) owns nothing: another run may take over."""
  run_file = output / "run.json"
  if run_file.exists():
    saved = read_run(run_file)
    changed = sorted(k for k in identity if not isinstance(saved, dict) or saved.get(k) != identity[k])
    owns_nothing = not (any(output.glob("state*.npz")) or (output / "report.json").exists())
    if changed and owns_nothing:
      files.write_atomic(run_file, json.dumps(identity, indent=1), "the run description")
      return False
    if changed:
      raise ValueError(f"{output} holds a different run ({', '.join(changed)} differ); nothing was overwritten. "
                       "Choose another --output or delete it.")
    return any(output.glob("state*.npz"))
  check(output)
  output.mkdir(parents=True, exist_ok=True)
  files.write_atomic(run_file, json.dumps(identity, indent=1), "the run description")
  return False


def state_file(part: int, parts: int) -> str:
  """Where a run saves its state: ``state.npz``, or with several corpora ``state.<i>.npz`` per corpus."""
  return "state.npz" if parts == 1 else f"state.{part}.npz"


def resumed(output: Path | None, name: str, saved: bool, writer: bool, console, total: int) -> EvalState | None:
  """The saved state of one corpus, if the run directory holds it, read by every process (process 0 says how
  far it got; the others read the same file from the shared filesystem)."""
  state = load_state(output / name) if saved and (output / name).exists() else None
  if jax.process_count() > 1:
    done = int(multihost_utils.broadcast_one_to_all(np.int32(state.windows_done if state else 0)))
    if done and not writer:
      state = load_state(output / name)
      if state.windows_done != done:
        raise ValueError(f"{output}: process {jax.process_index()} reads another state than process 0")
  if state is not None:
    console.print(f"resuming {output / name}: {state.windows_done}/{total} windows already done")
  return state


def run_with_progress(reference, cands, windows, labels, batch_size, spike_thresholds, worst, state, dump, cache,
                      output, state_file, save_every, console, device_mesh, stop, description, jensen_shannon=False):
  """``evaluate.evaluate`` of one corpus's ``windows`` from ``state`` with a progress bar named ``description``,
  saving the state to ``output / state_file`` after the first batch, then every ``save_every`` seconds, at the
  end and on Ctrl-C or SIGTERM (which then says how to resume); returns the final state."""
  from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

  columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
             TimeRemainingColumn())
  last_save = None  # the first batch is saved at once, then every save_every seconds
  started = time.monotonic()
  scored = 0

  def terminate(signum, frame):
    raise KeyboardInterrupt

  previous = signal.signal(signal.SIGTERM, terminate)
  with Progress(*columns, console=console, transient=False) as progress:
    task = progress.add_task(description, total=len(windows), completed=state.windows_done if state else 0,
                             rate="compiling...")

    def on_batch(current, tokens):
      nonlocal last_save, scored, state
      state = current
      scored += tokens
      rate = scored / (time.monotonic() - started)
      progress.update(task, completed=current.windows_done, rate=f"{rate:,.0f} scored tokens/s")
      if output is not None and (last_save is None or time.monotonic() - last_save > save_every):
        save_state(current, output / state_file)
        last_save = time.monotonic()

    try:
      state = evaluate(reference, cands, windows, labels=labels, batch_size=batch_size,
                       spike_thresholds=tuple(spike_thresholds), worst=worst, state=state, dump=dump, cache=cache,
                       on_batch=on_batch, device_mesh=device_mesh, stop=stop, jensen_shannon=jensen_shannon)
    except KeyboardInterrupt:
      if output is not None and state is not None:
        save_state(state, output / state_file)
        console.print(f"interrupted after {state.windows_done}/{len(windows)} windows; state saved in {output}: "
                      "run the same command again to resume")
      raise
    finally:
      signal.signal(signal.SIGTERM, previous)
  if output is not None:
    save_state(state, output / state_file)
  return state
