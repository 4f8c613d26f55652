"""Corpus readers: a built-in text, plain text, JSONL and Parquet files, globs; documents -> windows in one call."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np

from tailjax.data import spans
from tailjax.data.windows import Protocol, Windows, make_windows


BUILTIN_CORPORA = {
    "pydoc": "CPython's reference manual (pydoc_data.topics), shipped with every Python",
}


def check_corpus(spec: str) -> None:
  """Whether ``spec`` can name a corpus (a built-in, a glob with matches, an existing file), without reading it."""
  if spec in BUILTIN_CORPORA:
    return
  if any(c in spec for c in "*?["):
    if not glob.glob(spec):
      raise FileNotFoundError(f"{spec}: no file matches")
    return
  path = Path(spec)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such corpus file (or a built-in corpus: {sorted(BUILTIN_CORPORA)})")
  if path.is_dir():
    raise ValueError(f"{path}: the corpus names a directory; give a file or a glob such as {path / '*.jsonl'}")


def read_documents(spec: str, field: str = "text") -> list[str]:
  """``pydoc``, a text file, JSONL (``field`` of each line) or Parquet (column ``field``); a glob reads each match."""
  if spec == "pydoc":
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]
  if any(c in spec for c in "*?["):
    matches = sorted(glob.glob(spec))
    if not matches:
      raise FileNotFoundError(f"{spec}: no file matches")
    return [doc for match in matches for doc in read_documents(match, field)]
  check_corpus(spec)
  path = Path(spec)
  if path.suffix == ".jsonl":
    documents = []
    with path.open() as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          documents.append(str(json.loads(line)[field]))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
          raise ValueError(f"{path}:{number}: not a JSON object with a {field!r} field ({err!r})") from err
    return documents
  if path.suffix == ".parquet":
    import pyarrow.parquet as pq

    try:
      table = pq.read_table(path)
    except Exception as err:  # pyarrow raises its own error types for damaged files
      raise ValueError(f"{path}: unreadable Parquet file ({err})") from err
    if field not in table.column_names:
      raise ValueError(f"{path}: Parquet file has no column {field!r} (columns: {table.column_names})")
    return [str(x) for x in table.column(field).to_pylist() if x is not None]
  try:
    return [path.read_text()]
  except UnicodeDecodeError as err:
    raise ValueError(f"{path}: not UTF-8 text ({err})") from err


def corpus_windows(spec: str, tokenizer, protocol: Protocol, field: str = "text") -> Windows:
  """Read, tokenize (``tokenizer.encode``) and cut a corpus in one call. A JSONL file of prompt/response or
  chat records is scored record by record, on its responses only (``tailjax.data.spans``)."""
  if spans.span_kind(spec) is not None:
    return spans.span_windows(spec, tokenizer, protocol)
  documents = [d for d in read_documents(spec, field) if d.strip()]
  if not documents:
    raise ValueError(f"{spec}: the corpus holds no text")
  ids = tokenizer.encode("\n\n".join(documents))
  return make_windows(ids, protocol, tokenizer.bos_id if tokenizer.add_bos else None, spec)


def split_documents(documents: list[str], val_fraction: float, seed: int,
                    source: str = "corpus") -> tuple[list[str], list[str]]:
  """(train, validation) documents of ``source``: a ``val_fraction`` share drawn by ``seed``, at least one each."""
  if not 0 < val_fraction < 1:
    raise ValueError(f"val_fraction={val_fraction} must lie strictly between 0 and 1")
  if len(documents) < 2:
    raise ValueError(f"{source}: {len(documents)} document(s): a validation split needs at least two (or give "
                     "val_data)")
  order = np.random.default_rng(seed).permutation(len(documents))
  n_val = min(max(1, round(val_fraction * len(documents))), len(documents) - 1)
  val = set(order[:n_val].tolist())
  return ([d for i, d in enumerate(documents) if i not in val], [d for i, d in enumerate(documents) if i in val])
