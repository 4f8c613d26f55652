"""A teacher's top-K next-token distribution over a training set, computed once and read back.

``tailjax cache-teacher`` runs the frozen teacher over the packed training windows and
keeps, per target position, the ``k`` most probable ids and their log-probabilities
under the full vocabulary (``tailjax.losses.TopK``). Distillation then reads them
instead of running the teacher: a large teacher costs nothing at train time.

Layout of a cache directory::

  teacher_cache.json         what it was made from: teacher, tokenizer, k, data fingerprint, ...
  shard-00000/ids.npy        [n, T, k] uint16 (int32 for vocabularies over 65535)
  shard-00000/logprobs.npy   [n, T, k] float32 (or float16 / bfloat16 on request)
  ...

Shards are written to a temporary name and renamed when complete, so an interrupted
run resumes at the first missing shard. A cache made from another teacher, data or
temperature is refused with both values named; one of a larger k serves any smaller k
(the ids are sorted, most probable first), so one top-40 cache feeds top-40/15/5 runs.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from tailjax import files, head
from tailjax.data import Packed
from tailjax.frozen import frozen_jit
from tailjax.models import LoadedModel
from tailjax.models.transformer import Decoder

META_FILE = "teacher_cache.json"
LOGPROB_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


@dataclasses.dataclass(frozen=True)
class CacheMeta:
  teacher: str
  tokenizer: str  # Tokenizer.fingerprint()
  k: int
  temperature: float
  vocab_size: int
  data: str  # Packed.fingerprint of the windows
  windows: int
  seq_len: int
  shard_size: int
  logprob_dtype: str = "float32"

  @property
  def shards(self) -> int:
    return -(-self.windows // self.shard_size)

  def check(self, expected: CacheMeta | dict, where: Path) -> None:
    """Error naming every field where this cache differs from what a run needs."""
    expected = dataclasses.asdict(expected) if isinstance(expected, CacheMeta) else expected
    ours = dataclasses.asdict(self)
    diffs = [f"{k}: cache has {ours[k]!r}, this run needs {v!r}" for k, v in expected.items() if ours[k] != v]
    if diffs:
      raise ValueError(f"{where}: teacher cache made for other settings: " + "; ".join(diffs))


def _shard_dir(directory: Path, shard: int) -> Path:
  return directory / f"shard-{shard:05d}"


def _teacher_topk(teacher: Decoder, tokens: jax.Array, segments: jax.Array, k: int, temperature: float, vocab_size: int):
  hidden = teacher(tokens, segments)
  return head.teacher_topk(hidden, teacher.output_head(), k, temperature=temperature, vocab_size=vocab_size)


_topk = frozen_jit(_teacher_topk, static_argnums=(3, 4, 5))


class CacheSettings(NamedTuple):
  """What a cache holds: the top-``k`` of the teacher named ``teacher`` (``model_id``) over a ``vocab_size``
  vocabulary at ``temperature``, ``shard_size`` windows a shard, log-probs stored as ``logprob_dtype``."""

  teacher: str
  k: int
  vocab_size: int
  temperature: float = 1.0
  shard_size: int = 256
  logprob_dtype: str = "float32"


def write(teacher: LoadedModel, packed: Packed, directory: str | Path, settings: CacheSettings, *,
          batch_size: int = 8, on_shard: Callable[[int, int], None] | None = None) -> CacheMeta:
  """The ``teacher``'s top-K (``settings``) for every window of ``packed``, ``batch_size`` windows a call, into
  ``directory``; resumes a partly written cache of the same settings; ``on_shard(done, shards)`` after each."""
  name, k, vocab_size, temperature, shard_size, logprob_dtype = settings
  if logprob_dtype not in LOGPROB_DTYPES:
    raise ValueError(f"logprob_dtype={logprob_dtype!r}: choose one of {sorted(LOGPROB_DTYPES)}")
  if not 0 < k <= vocab_size:
    raise ValueError(f"k={k} must lie in [1, {vocab_size}] (the vocabulary)")
  directory = Path(directory)
  meta = CacheMeta(name, teacher.tokenizer.fingerprint(), k, float(temperature), vocab_size,
                   packed.fingerprint, len(packed), packed.seq_len, shard_size, logprob_dtype)
  meta_path = directory / META_FILE
  if meta_path.exists():
    read_meta(directory).check(meta, directory)
  elif directory.is_dir() and any(directory.iterdir()):
    raise ValueError(f"{directory} is not empty and holds no teacher cache; nothing was overwritten")
  else:
    directory.mkdir(parents=True, exist_ok=True)
    files.write_atomic(meta_path, json.dumps(dataclasses.asdict(meta), indent=1), "the teacher cache's description")
  id_dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
  for shard in range(meta.shards):
    final = _shard_dir(directory, shard)
    if not final.exists():
      lo, hi = shard * shard_size, min((shard + 1) * shard_size, len(packed))
      ids, logprobs = [], []
      for start in range(lo, hi, batch_size):
        stop = min(start + batch_size, hi)
        top = _topk(teacher.model, jnp.asarray(packed.tokens[start:stop, :-1]),
                    jnp.asarray(packed.segments[start:stop, :-1]), k, float(temperature), vocab_size)
        ids.append(np.asarray(top.ids).astype(id_dtype))
        logprobs.append(np.asarray(top.logprobs).astype(LOGPROB_DTYPES[logprob_dtype]))
      partial = final.with_name(final.name + ".partial")
      shutil.rmtree(partial, ignore_errors=True)
      partial.mkdir()
      np.save(partial / "ids.npy", np.concatenate(ids))
      np.save(partial / "logprobs.npy", np.concatenate(logprobs))
      partial.rename(final)
    if on_shard is not None:
      on_shard(shard + 1, meta.shards)
  return meta


def read_meta(directory: str | Path) -> CacheMeta:
  path = Path(directory) / META_FILE
  try:
    return CacheMeta(**json.loads(path.read_text()))
  except (OSError, json.JSONDecodeError, TypeError) as err:
    raise ValueError(f"{path}: not a readable teacher cache description ({err!r})") from err


class TeacherCache:
  """Random access to a complete cache: ``cache[i]`` -> (ids ``[T, k]`` int32, log-probs ``[T, k]`` float32)."""

  def __init__(self, directory: str | Path):
    self.directory = Path(directory)
    self.meta = read_meta(self.directory)
    missing = [s for s in range(self.meta.shards) if not _shard_dir(self.directory, s).exists()]
    if missing:
      raise ValueError(f"{self.directory}: incomplete teacher cache, {len(missing)} of {self.meta.shards} shards "
                       f"missing (first: {_shard_dir(self.directory, missing[0]).name}); rerun cache-teacher")
    self._shards: dict[int, tuple[np.ndarray, np.ndarray]] = {}

  def __len__(self) -> int:
    return self.meta.windows

  def _shard(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
    if shard not in self._shards:
      path = _shard_dir(self.directory, shard)
      rows = min(self.meta.shard_size, self.meta.windows - shard * self.meta.shard_size)
      arrays = []
      for name in ("ids.npy", "logprobs.npy"):
        try:
          array = np.load(path / name, mmap_mode="r")
        except (OSError, ValueError, EOFError) as err:  # truncated: the header promises more than the file holds
          raise ValueError(f"{path / name}: unreadable teacher cache shard ({err}); rerun cache-teacher") from err
        if array.shape[0] != rows or array.shape[-1] != self.meta.k:
          raise ValueError(f"{path / name}: shard of shape {array.shape}, the cache description needs {rows} rows "
                           f"of top-{self.meta.k}; rerun cache-teacher")
        arrays.append(array)
      self._shards[shard] = tuple(arrays)
    return self._shards[shard]

  def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    shard = index // self.meta.shard_size
    ids, logprobs = self._shard(shard)
    row = ids[index % self.meta.shard_size].astype(np.int32)
    if row.size and (row.min() < 0 or row.max() >= self.meta.vocab_size):
      raise ValueError(f"{_shard_dir(self.directory, shard) / 'ids.npy'}: window {index} holds token ids outside "
                       f"the vocabulary of {self.meta.vocab_size} (a damaged shard); rerun cache-teacher")
    return row, logprobs[index % self.meta.shard_size].astype(np.float32)
