"""Tokenizers as tailjax uses them: a ``tokenizers.Tokenizer`` with its BOS rule made explicit, read from
each checkpoint format (GGUF metadata, a Hugging Face directory, a tailjax checkpoint's ``tokenizer.json``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tailjax import files
from tailjax.models import gguf, hf


@dataclasses.dataclass
class Tokenizer:
  """A ``tokenizers.Tokenizer`` with the calls tailjax needs; BOS handling made explicit."""

  backend: object
  add_bos: bool = False
  bos_id: int | None = None
  eos_id: int | None = None
  chat_template: str | None = None  # Jinja, as the checkpoint ships it (tailjax.data.spans renders it)

  def encode(self, text: str) -> list[int]:
    ids = self.backend.encode(text, add_special_tokens=False).ids
    return [self.bos_id, *ids] if self.add_bos and self.bos_id is not None else ids

  def decode(self, ids, specials: bool = False) -> str:
    """Text of ``ids``; special tokens (``<|im_end|>``) dropped, or with ``specials`` spelled out."""
    return self.backend.decode(list(ids), skip_special_tokens=not specials)

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def fingerprint(self) -> str:
    """Hash of what decides the encoded ids: the id <-> token map, and the BOS id when one is added (an unused BOS id
    changes nothing). Equal fingerprints tokenize alike."""
    return self._fingerprint(self.bos_id if self.add_bos else None)

  def same_as(self, fingerprint: str) -> bool:
    """Whether ``fingerprint`` (stored in a cache) is this tokenizer's, as now computed or as caches before the unused
    BOS id was left out stored it."""
    return fingerprint in (self.fingerprint(), self._fingerprint(self.bos_id))

  def _fingerprint(self, bos_id: int | None) -> str:
    vocab = sorted(self.backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    return files.fingerprint(json.dumps([vocab, self.add_bos, bos_id]))


def from_gguf_reader(reader, path: Path) -> Tokenizer:
  return Tokenizer(gguf.read_tokenizer(reader, path), bool(gguf.field(reader, "tokenizer.ggml.add_bos_token")),
                   gguf.field(reader, "tokenizer.ggml.bos_token_id"), gguf.field(reader, "tokenizer.ggml.eos_token_id"),
                   gguf.field(reader, "tokenizer.chat_template"))


def from_hf_directory(directory: Path) -> Tokenizer | None:
  if (auto := hf.read_tokenizer(directory)) is None:
    return None
  if not getattr(auto, "is_fast", False):
    raise ValueError(f"{directory}: the tokenizer has no fast (tokenizers) version")
  bos = auto.bos_token_id
  plain = auto.backend_tokenizer.encode("a", add_special_tokens=False).ids
  template = auto.chat_template if isinstance(auto.chat_template, str) else None  # one template, not a named set
  return Tokenizer(auto.backend_tokenizer, bos is not None and auto("a")["input_ids"] == [bos, *plain], bos,
                   auto.eos_token_id, template)


def from_checkpoint_meta(directory: Path, meta: dict) -> Tokenizer | None:
  """The tokenizer a tailjax checkpoint's description names (``{"file", "add_bos", "bos_id", "eos_id",
  "chat_template"}``; the last two absent from checkpoints written before they were kept), if any."""
  if "tokenizer" not in meta:
    return None
  t = meta["tokenizer"]
  return dataclasses.replace(from_json(directory / t["file"], t["add_bos"], t["bos_id"]), eos_id=t.get("eos_id"),
                             chat_template=t.get("chat_template"))


def from_json(path: Path, add_bos: bool = False, bos_id: int | None = None) -> Tokenizer:
  """A ``tokenizers`` JSON file."""
  from tokenizers import Tokenizer as Backend

  try:
    return Tokenizer(Backend.from_file(str(path)), add_bos, bos_id)
  except Exception as err:  # tokenizers raises a plain Exception for malformed files
    raise ValueError(f"{path}: not a tokenizers JSON file ({err})") from err


def check_vocab(tokenizer: Tokenizer | None, vocab_size: int, source: str) -> None:
  if tokenizer is not None and tokenizer.vocab_size > vocab_size:
    raise ValueError(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens, the model only {vocab_size}")
