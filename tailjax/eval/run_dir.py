"""A run directory: what ``tailjax eval --output DIR`` writes, and how a second run finds its own there.

``run.json`` names what is being computed (``identity``: models, corpus, protocol, fingerprint, ...); a
directory that holds a different run is refused and nothing in it is overwritten (``prepare``). A ``RunDir``
saves the state after each batch to ``state.npz`` (``state.<i>.npz`` per corpus of a several-corpus run)
every ``save_every`` seconds, on Ctrl-C and on SIGTERM (``RunDir.run``), and every process reads it back when the
same command runs again (``RunDir.resumed``).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from tailjax import files
from tailjax.eval.state import EvalState, load_state, save_state
from tailjax.data import Windows
from tailjax.eval.step import Evaluator


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


class RunDir:
  """Where a run keeps its state: ``path`` (None: a run that saves nothing, with its progress bar all the same),
  checked against this run's ``identity`` when opened (``prepare``). Process 0 alone writes; every process reads a
  saved state back (``resumed``). ``parts``: the corpora of the run, one state file each (``state_file``)."""

  def __init__(self, path: str | Path | None, identity: dict[str, Any], *, parts: int = 1, save_every: float = 30.0,
               console=None):
    from rich.console import Console

    from tailjax import mesh as meshes

    self.path, self.parts, self.save_every = None if path is None else Path(path), parts, save_every
    self.console = console or Console(stderr=True)
    self.writes = self.path is not None and meshes.is_writer()
    self.saved = self.writes and prepare(self.path, identity)

  def state_file(self, part: int) -> str:
    """Where corpus ``part`` saves its state: ``state.npz``, or with several corpora ``state.<i>.npz``."""
    return "state.npz" if self.parts == 1 else f"state.{part}.npz"

  def resumed(self, part: int, total: int) -> EvalState | None:
    """The saved state of corpus ``part`` (of ``total`` windows), if the directory holds it, read by every process
    (process 0 says how far it got; the others read the same file from the shared filesystem)."""
    file = None if self.path is None else self.path / self.state_file(part)
    state = load_state(file) if self.saved and file.exists() else None
    if jax.process_count() > 1:
      done = int(multihost_utils.broadcast_one_to_all(np.int32(state.windows_done if state else 0)))
      if done and not self.writes:
        state = load_state(file)
        if state.windows_done != done:
          raise ValueError(f"{self.path}: process {jax.process_index()} reads another state than process 0")
    if state is not None:
      self.console.print(f"resuming {file}: {state.windows_done}/{total} windows already done")
    return state

  def save(self, state: EvalState, part: int) -> None:
    if self.writes:
      save_state(state, self.path / self.state_file(part))

  def run(self, evaluator: Evaluator, windows: Windows, state: EvalState, *, part: int = 0,
          stop: Callable[[EvalState], bool] | None = None, description: str = "windows") -> EvalState:
    """``evaluator.run`` over one corpus's ``windows`` from ``state`` with a progress bar named ``description``,
    saving the state after the first batch, then every ``save_every`` seconds, at the end and on Ctrl-C or SIGTERM
    (which then says how to resume); returns the final state."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
    started, last_save, scored = time.monotonic(), None, 0  # the first batch is saved at once

    def terminate(signum, frame):
      raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    with Progress(*columns, console=self.console, transient=False) as progress:
      task = progress.add_task(description, total=len(windows), completed=state.windows_done, rate="compiling...")

      def on_batch(current: EvalState, tokens: int) -> None:
        nonlocal last_save, scored
        scored += tokens
        progress.update(task, completed=current.windows_done,
                        rate=f"{scored / (time.monotonic() - started):,.0f} scored tokens/s")
        if last_save is None or time.monotonic() - last_save > self.save_every:
          self.save(current, part)
          last_save = time.monotonic()

      try:
        state = evaluator.run(windows, state, on_batch=on_batch, stop=stop)
      except KeyboardInterrupt:
        if self.writes:
          self.save(state, part)
          self.console.print(f"interrupted after {state.windows_done}/{len(windows)} windows; state saved in "
                             f"{self.path}: run the same command again to resume")
        raise
      finally:
        signal.signal(signal.SIGTERM, previous)
    self.save(state, part)
    return state
