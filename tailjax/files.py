"""Paths a run reads and writes: checked before any work, and damaged files named with what to do.

Any file tailjax reads can be truncated or corrupt at any byte, and any path a user gives can be a
file, a directory or missing. Readers of archives go through ``npz`` (every way ``np.load`` and the
zip layer fail becomes one ``ValueError`` naming the file and the remedy); runs check every output
path with ``output_file`` / ``output_dir`` and every input with ``input_file`` before they load a
model, so a typo costs seconds, not a finished evaluation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

def fingerprint(*parts: bytes | str | np.ndarray) -> str:
  """16 hex digits of the SHA-256 of ``parts`` (arrays by their bytes, text as UTF-8): how runs, caches and
  tokenizers say "the same tokens" without storing them."""
  digest = hashlib.sha256()
  for part in parts:
    digest.update(part.encode() if isinstance(part, str) else part.tobytes() if isinstance(part, np.ndarray) else part)
  return digest.hexdigest()[:16]


# What a damaged .npz raises somewhere between opening it and reading its last array.
_DAMAGED = (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile, json.JSONDecodeError)


@contextlib.contextmanager
def npz(path: str | Path, what: str, remedy: str) -> Iterator[np.lib.npyio.NpzFile]:
  """``np.load(path)`` for reading ``what`` (e.g. "evaluation state"); a missing, empty, truncated or corrupt
  archive, or one without the keys the body reads, raises ``ValueError("<path>: unreadable <what> (...); <remedy>")``."""
  path = Path(path)
  if path.is_dir():
    raise ValueError(f"{path}: a directory, not a {what} file")
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such {what} file")
  try:
    with np.load(path) as archive:
      yield archive
  except _DAMAGED as err:
    raise ValueError(f"{path}: unreadable {what} ({type(err).__name__}: {err}); {remedy}") from err


def json_text(value: Any, indent: int | None = 1) -> str:
  """Strict JSON of ``value`` (what every other tool's parser accepts): NaN and ±Inf become ``null`` (the counts
  of non-finite values are reported beside them), NumPy scalars and arrays plain numbers and lists, dataclasses
  dicts."""
  return json.dumps(_plain(value), indent=indent, allow_nan=False)


def _plain(x: Any) -> Any:
  if isinstance(x, dict):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  if isinstance(x, np.ndarray):
    return _plain(x.tolist())
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    return _plain(dataclasses.asdict(x))
  if x is None or isinstance(x, (str, int, float, bool)):
    return x
  raise TypeError(f"{type(x).__name__} is not JSON serializable")


class WriteError(OSError):
  """A file that could not be written (a full disk, a quota, a file-size limit): it names the file and what it
  held; nothing of it was kept (``write_atomic``)."""

  def __str__(self) -> str:
    return self.strerror or super().__str__()


def reason(err: BaseException) -> str:
  """One line saying why ``err`` happened: its type and first line, then its first cause's (orbax wraps the
  TensorStore error that names the file and byte range; the pages of store specs it appends are dropped)."""
  def line(e: BaseException) -> str:
    text = str(e).split(" See full TensorStore details")[0].strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__

  return line(err) if err.__cause__ is None else f"{line(err)} ({line(err.__cause__)})"


def write_atomic(path: str | Path, content: str | bytes | Callable[[BinaryIO], None], what: str) -> Path:
  """Writes ``content`` (text, bytes, or a function that writes into a binary file) to ``path`` whole or not at
  all: into a temporary file beside it, flushed to disk, then renamed over it. When the write fails (a full
  disk) the temporary file is removed, a file already at ``path`` stays as it was, and ``WriteError`` names
  ``what`` and ``path``."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    with tmp.open("wb") as f:
      if callable(content):
        content(f)
      else:
        f.write(content.encode() if isinstance(content, str) else content)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as err:
    tmp.unlink(missing_ok=True)
    raise WriteError(err.errno, f"{path}: could not write {what} ({err.strerror or err}); nothing of it was "
                     "kept") from err
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return path


def input_file(path: str | Path, what: str) -> Path:
  """A file to read: missing -> ``FileNotFoundError``, a directory -> ``ValueError``, both naming ``what``."""
  path = Path(path)
  if path.is_dir():
    raise ValueError(f"{path}: {what} names a directory; give a file")
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such {what} file")
  return path


def jsonl_objects(path: str | Path, what: str) -> Iterator[tuple[str, dict]]:
  """Each non-blank line of a JSONL ``what`` file as ``("path:line", object)``; a line that is not a JSON object is
  a ``ValueError`` naming it."""
  path = input_file(path, what)
  with path.open() as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not JSON ({err})") from err
      if not isinstance(record, dict):
        raise ValueError(f"{where}: a {what} record must be a JSON object, not {type(record).__name__}")
      yield where, record


def output_file(path: str | Path, what: str) -> Path:
  """A file a run will write at its end: refused now if it names a directory or cannot be created."""
  path = Path(path)
  if path.is_dir():
    raise ValueError(f"{path}: {what} names a directory; give a file path")
  parent = path.absolute().parent
  if not parent.is_dir():
    raise ValueError(f"{path}: {what} cannot be written: {parent} is {'a file' if parent.exists() else 'missing'}")
  _writable(parent, path, what)
  if path.exists() and not os.access(path, os.W_OK):
    raise ValueError(f"{path}: {what} exists and is not writable")
  return path


def new_file(path: str | Path, what: str, *inputs: str | Path) -> Path:
  """A file a run creates (``output_file``'s checks): refused if something is there already, or if it is one of
  the ``inputs`` the run reads (``--output`` equal to ``--prompts``), so no run replaces a file it did not write."""
  path = output_file(path, what)
  for source in inputs:
    if source is not None and Path(source).exists() and path.exists() and path.samefile(source):
      raise ValueError(f"{path}: {what} would replace the input {source}; give another path")
  if path.exists():
    raise ValueError(f"{path}: {what} exists; nothing was overwritten: delete it or give another path")
  return path


def new_dir(path: str | Path, what: str) -> Path:
  """A directory a run fills from scratch (``output_dir``'s checks): refused unless missing or empty, so another
  run's files are never mixed with or replaced by these."""
  path = output_dir(path, what)
  if path.exists() and any(path.iterdir()):
    raise ValueError(f"{path}: {what} is not empty; nothing was overwritten: give a new or empty directory")
  return path


def output_dir(path: str | Path, what: str) -> Path:
  """A directory a run will write into (created if missing): refused now if it is a file or cannot be created."""
  path = Path(path)
  if path.exists() and not path.is_dir():
    raise ValueError(f"{path}: {what} names a file; give a directory")
  _writable(path if path.exists() else path.parent, path, what)
  return path


def _writable(directory: Path, path: Path, what: str) -> None:
  """``directory`` (or, when it does not exist yet, the nearest ancestor that does) must be a writable directory."""
  existing = directory.absolute()
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    raise ValueError(f"{path}: {what} cannot be created: {existing} is a file")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ValueError(f"{path}: {what} cannot be written: {existing} is not writable")
