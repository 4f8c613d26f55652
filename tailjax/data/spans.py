"""Scoring spans: records whose response (or assistant) tokens alone are scored.

Instruct models are judged on what they write. A JSONL corpus whose records hold

- ``prompt`` and ``response`` (or ``completion`` or ``answer``): the text ``prompt + response``, tokenized with the
  tokenizer's BOS rule; the response's tokens are scored;
- ``messages`` (``[{"role", "content"}, ...]``): the conversation rendered with the tokenizer's chat template
  (``Tokenizer.chat_template``, rendered by transformers' Jinja renderer, as ``apply_chat_template`` does) and
  tokenized as rendered (the template writes its own BOS); each assistant message's tokens are scored, from
  the end of the generation prompt to the end of the message as rendered (its end-of-turn marker included),

becomes one window per record (``tailjax.data.Windows``): a token is scored when its characters overlap a span (a
token straddling the start of a span, " Oslo" after a prompt that ends in a space, predicts the response's first
characters, so it is scored). Windows are as long as the longest record (at most the protocol's ``seq_len``;
shorter records padded, the padding never scored); a longer record is cut at ``seq_len`` and counted
(``Windows.truncated``), and a record with nothing to score in its first ``seq_len`` tokens (no assistant turn,
no messages, an empty response) is left out and named (``Windows.dropped``: its ``file:line``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tailjax import files
from tailjax.data.packing import Packed, packed
from tailjax.data.windows import Protocol, Windows

RESPONSE_FIELDS = ("response", "completion", "answer")


class Record(NamedTuple):
  """``text`` and the character ranges ``spans`` whose tokens are scored; ``templated``: the text was rendered
  by a chat template and carries its own special tokens (no BOS added); ``where``: ``file:line``."""

  text: str
  spans: tuple[tuple[int, int], ...]
  templated: bool
  where: str = ""


def span_kind(spec: str) -> str | None:
  """``"chat"``, ``"prompt-response"`` or None (a plain corpus) from the first record of a JSONL file."""
  path = Path(spec)
  if path.suffix != ".jsonl" or not path.is_file():
    return None
  with path.open() as f:
    first = next((line for line in f if line.strip()), None)
  try:
    record = json.loads(first) if first is not None else None
  except json.JSONDecodeError:
    return None  # read_documents names the bad line
  if not isinstance(record, dict):
    return None
  if "messages" in record:
    return "chat"
  if "prompt" in record and any(k in record for k in RESPONSE_FIELDS):
    return "prompt-response"
  return None


def render_template(messages: list[dict], template: str, special: dict[str, str], where: str,
                    generation_prompt: bool = False) -> str:
  """``messages`` rendered by a chat ``template`` (transformers' Jinja renderer, as ``apply_chat_template``
  does); ``generation_prompt``: followed by what opens the assistant's turn; ``special``: ``template_tokens``."""
  from transformers.utils.chat_template_utils import render_jinja_template

  try:
    return render_jinja_template([messages], chat_template=template, add_generation_prompt=generation_prompt,
                                 **special)[0][0]
  except Exception as err:  # jinja2 and the template's own raise_exception
    raise ValueError(f"{where}: the chat template cannot render these messages ({err})") from err


def chat_messages(record: dict, where: str) -> list[dict]:
  """A record's ``messages``, checked: a list of ``{"role", "content"}`` objects."""
  messages = record.get("messages")
  if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
    raise ValueError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
  return messages


def template_tokens(tokenizer) -> dict[str, str]:
  """The special tokens a chat template may name (``bos_token``, ``eos_token``) as the tokenizer spells them."""
  return {name: tokenizer.decode([i]) for name, i in (("bos_token", tokenizer.bos_id),
                                                       ("eos_token", getattr(tokenizer, "eos_id", None)))
          if i is not None}


def render_chat(messages: list[dict], template: str, special: dict[str, str], where: str) -> Record:
  """A conversation rendered whole, with the character span of each assistant message."""
  text, spans = render_template(messages, template, special, where), []
  for i, message in enumerate(messages):
    if message.get("role") != "assistant":
      continue
    start = render_template(messages[:i], template, special, where, generation_prompt=True)
    end = render_template(messages[:i + 1], template, special, where)
    if not (text.startswith(end) and end.startswith(start)):
      raise ValueError(f"{where}: the chat template renders message {i} differently inside the whole "
                       "conversation (it rewrites earlier turns), so its tokens cannot be told apart")
    spans.append((len(start), len(end)))
  return Record(text, tuple(spans), True)


def read_records(spec: str, tokenizer) -> list[Record]:
  """Every record of a span corpus (``span_kind``), its scored character spans marked."""
  kind, path = span_kind(spec), Path(spec)
  if kind is None:
    raise ValueError(f"{spec}: not a JSONL file of prompt/response or chat messages records")
  template = getattr(tokenizer, "chat_template", None)
  if kind == "chat" and not template:
    raise ValueError(f"{spec}: chat records need the reference tokenizer's chat template, and it has none")
  special = template_tokens(tokenizer)
  records = []
  for where, record in files.jsonl_objects(path, "span corpus"):
    if kind == "chat":
      records.append(render_chat(chat_messages(record, where), template, special, where)._replace(where=where))
      continue
    response = next((record[k] for k in RESPONSE_FIELDS if k in record), None)
    if not isinstance(record.get("prompt"), str) or not isinstance(response, str):
      raise ValueError(f"{where}: a record needs a 'prompt' and a 'response' (or 'completion' or 'answer') string")
    text = record["prompt"] + response
    records.append(Record(text, ((len(record["prompt"]), len(text)),), False, where))
  return records


def record_tokens(record: Record, tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """``ids [n]`` and ``in_span [n]`` (whether each token's characters overlap a span; a BOS added here has none)."""
  encoding = tokenizer.backend.encode(record.text, add_special_tokens=False)
  ids, offsets = list(encoding.ids), list(encoding.offsets)
  if not record.templated and tokenizer.add_bos and tokenizer.bos_id is not None:
    ids, offsets = [tokenizer.bos_id, *ids], [(0, 0), *offsets]
  starts, ends = np.asarray(offsets, np.int64).reshape(-1, 2).T
  in_span = np.zeros(len(ids), bool)
  for lo, hi in record.spans:
    in_span |= (starts < hi) & (np.maximum(ends, starts + 1) > lo) & (ends > 0)
  return np.asarray(ids, np.int32), in_span


def span_windows(spec: str, tokenizer, protocol: Protocol) -> Windows:
  """One window per record of a span corpus (``num_sequences`` records sampled by ``seed``), only span tokens
  scored; ``starts`` holds each window's record number (from 0)."""
  if protocol.stride is not None or protocol.score_second_half:
    raise ValueError(f"{spec}: a prompt/response or chat corpus is scored record by record; protocol "
                     f"{protocol.name!r} with a stride or half-window scoring does not apply")
  records = read_records(spec, tokenizer)
  encoded = [record_tokens(r, tokenizer) for r in records]
  keep = [i for i, (_, in_span) in enumerate(encoded) if in_span[1:protocol.seq_len].any()]
  dropped = tuple(records[i].where for i in sorted(set(range(len(records))) - set(keep)))
  if not keep:
    raise ValueError(f"{spec}: none of its {len(records)} records has a response or assistant token to score "
                     f"within the first {protocol.seq_len} tokens")
  if protocol.num_sequences is not None:
    if protocol.num_sequences > len(keep):
      raise ValueError(f"{spec}: {len(keep)} records with tokens to score, fewer than the {protocol.num_sequences} "
                       f"windows protocol {protocol.name!r} samples; give num_sequences 0 to score every record, or "
                       "fewer")
    keep = sorted(np.random.default_rng(protocol.seed).choice(keep, protocol.num_sequences, replace=False).tolist())
  t = min(protocol.seq_len, max(4, *(len(encoded[i][0]) for i in keep)))  # a window holds at least 4 tokens
  tokens, scored = np.zeros((len(keep), t), np.int32), np.zeros((len(keep), t - 1), bool)
  truncated = 0
  for row, i in enumerate(keep):
    ids, in_span = encoded[i]
    truncated += int(in_span[t:].any())
    ids, in_span = ids[:t], in_span[:t]
    tokens[row, :len(ids)], scored[row, :len(ids) - 1] = ids, in_span[1:]
  return Windows(tokens, scored, np.asarray(keep, np.int64), sum(len(encoded[i][0]) for i in keep),
                 files.fingerprint(tokens, scored), truncated, dropped)


def pack_records(records: list[Record], tokenizer, seq_len: int, source: str) -> Packed:
  """Training windows of ``seq_len + 1`` tokens holding whole records, in order: a window closes when the next
  record does not fit, each record is a segment of its own (``Packed.segments``, padding 0), and only its span
  tokens are ``scored`` targets (an answer's or an assistant turn's; never a record's first token). A record
  longer than a window, or with no span token, is refused by ``file:line``."""
  width = seq_len + 1
  rows: list[list[tuple[np.ndarray, np.ndarray]]] = [[]]
  used = 0
  for number, record in enumerate(records, 1):
    ids, in_span = record_tokens(record, tokenizer)
    where = record.where or f"{source}: record {number}"
    if len(ids) > width:
      raise ValueError(f"{where}: {len(ids)} tokens, longer than a training window of {width} (seq_len {seq_len} "
                       "+ 1); raise seq_len or shorten the example: examples are never split")
    if not in_span[1:].any():
      raise ValueError(f"{where}: no answer or assistant token to learn from")
    if used + len(ids) > width:
      rows.append([])
      used = 0
    rows[-1].append((ids, in_span))
    used += len(ids)
  if not rows[0]:
    raise ValueError(f"{source}: no records")
  tokens, segments = np.zeros((len(rows), width), np.int32), np.zeros((len(rows), width), np.int32)
  scored = np.zeros((len(rows), width), bool)
  for r, row in enumerate(rows):
    at = 0
    for segment, (ids, in_span) in enumerate(row, 1):
      tokens[r, at:at + len(ids)], segments[r, at:at + len(ids)] = ids, segment
      scored[r, at + 1:at + len(ids)] = in_span[1:]
      at += len(ids)
  return packed(tokens, segments, scored)
