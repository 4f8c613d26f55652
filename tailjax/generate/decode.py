"""Text generation: batched decoding with a KV cache, greedy or sampled, for every family tailjax loads.

A batch of prompts is left-padded to a common length ``P`` and decoded into a cache of ``P + max_new_tokens``
slots (``tailjax.models.cache``): one compiled prefill writes the prompts, then one compiled step per token
writes the token chosen from the last logits and returns the next logits. Each row's token at step ``n`` is

- greedy (``temperature == 0``): the arg-max of the logits (the lowest id on ties);
- sampled: drawn from ``softmax(z / temperature)`` restricted to the ``top_k`` largest logits and then to the
  smallest set of largest-probability tokens whose probability reaches ``top_p`` (the order of transformers'
  temperature, top-k and top-p warpers), with the key ``fold_in(fold_in(key(seed), row), n)``: ``row`` counts
  the continuations of the whole call (``prompt * samples + sample``), so a continuation does not depend on
  the batch it ran in.

A continuation ends at an end-of-sequence id (kept out of its text), at the first of the ``stop`` strings (cut
before it) or after ``max_new_tokens`` (its ``finish``: ``"eos"``, ``"stop"``, ``"length"``). Rows that are done
keep stepping until their batch is (every few steps the host checks); what they write is discarded.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tailjax import files
from tailjax.data import spans
from tailjax.frozen import frozen_jit
from tailjax.models.cache import DecodeCache
from tailjax.models.load import LoadedModel
from tailjax.models.transformer import Decoder

Array = jax.Array

CHECK_EVERY = 8  # steps between the host's looks at which rows are done
PROMPT_ROUNDING = 16  # prompt lengths round up to a multiple of this: fewer shapes, fewer compilations


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How each next token is chosen (the module docstring): ``temperature`` 0 is greedy; ``top_k`` None or 0 and
  ``top_p`` 1.0 restrict nothing."""

  temperature: float = 0.0
  top_k: int | None = None
  top_p: float = 1.0

  def __post_init__(self):
    if not (self.temperature >= 0 and math.isfinite(self.temperature)):
      raise ValueError(f"temperature {self.temperature}: expected a finite value >= 0 (0: greedy)")
    if self.top_k is not None and self.top_k < 0:
      raise ValueError(f"top_k {self.top_k}: expected >= 0 (0 or None: no limit)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p {self.top_p}: expected a value in (0, 1]")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """``samples`` continuations per prompt of at most ``max_new_tokens`` tokens, ``batch_size`` rows decoded
  together; ``stop`` strings end a continuation (cut before them); ``eos_ids`` end it too (default: the
  tokenizer's end-of-sequence id)."""

  max_new_tokens: int = 64
  sampling: Sampling = Sampling()
  samples: int = 1
  seed: int = 0
  stop: tuple[str, ...] = ()
  eos_ids: tuple[int, ...] | None = None
  batch_size: int = 8

  def __post_init__(self):
    for name in ("max_new_tokens", "samples", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} {getattr(self, name)}: expected >= 1")
    if any(not s for s in self.stop):
      raise ValueError("stop strings must not be empty")
    if not 0 <= self.seed < 2**32:
      raise ValueError(f"seed {self.seed}: expected a whole number in [0, 2**32)")


class Generation(NamedTuple):
  """One continuation: of prompt number ``prompt``, sample ``sample``; ``token_ids`` as generated up to its end
  (not the end-of-sequence id; at a stop string, the tokens that reach it); ``text`` (cut before a stop string);
  ``finish``: ``"eos"``, ``"stop"`` or ``"length"``; ``eos_id``: the end-of-sequence id that ended it (None unless
  ``finish == "eos"``)."""

  prompt: int
  sample: int
  text: str
  token_ids: tuple[int, ...]
  finish: str
  eos_id: int | None = None


class _End(NamedTuple):
  ids: list[int]
  text: str
  finish: str
  eos_id: int | None = None


def next_logits(model: Decoder, hidden: Array) -> Array:
  """``hidden: [B, d]`` final-norm states -> ``[B, V]`` float32 logits (soft-capped as the model's head is)."""
  logits = jnp.einsum("bd,dv->bv", hidden, model.unembedding(), preferred_element_type=jnp.float32)
  cap = model.cfg.final_logit_softcap
  return logits if cap is None else cap * jnp.tanh(logits / cap)


def choose(logits: Array, keys: Array, sampling: Sampling) -> Array:
  """``logits: [B, V]``, ``keys: [B]`` PRNG keys -> ``[B]`` int32 next tokens (the module docstring)."""
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  z = logits / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(z, min(sampling.top_k, z.shape[-1]))[0][:, -1:]
    z = jnp.where(z < kth, -jnp.inf, z)
  if sampling.top_p < 1:
    ordered = jnp.sort(z, axis=-1)[:, ::-1]
    p = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(p, axis=-1) - p  # probability of the larger tokens
    kept = jnp.sum(before < sampling.top_p, axis=-1, keepdims=True)  # >= 1: the largest always stays
    z = jnp.where(z < jnp.take_along_axis(ordered, kept - 1, axis=-1), -jnp.inf, z)
  return jax.vmap(jax.random.categorical)(keys, z).astype(jnp.int32)


def _keys(seed: Array, rows: Array, step: Array) -> Array:
  base = jax.random.key(seed)
  return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(base, r), step))(rows)


class _Step(NamedTuple):
  tokens: Array  # [B] int32 chosen
  cache: DecodeCache


def _prefill(model: Decoder, prompts: Array, start: Array, rows: Array, length: int, seed: Array,
             sampling: Sampling) -> _Step:
  step = model.decode(prompts, model.init_cache(start, length))
  logits = next_logits(model, step.hidden[:, -1])
  return _Step(choose(logits, _keys(seed, rows, jnp.zeros((), jnp.int32)), sampling), step.cache)


def _decode(model: Decoder, tokens: Array, cache: DecodeCache, rows: Array, n: Array, seed: Array,
            sampling: Sampling) -> _Step:
  step = model.decode(tokens[:, None], cache)
  return _Step(choose(next_logits(model, step.hidden[:, 0]), _keys(seed, rows, n), sampling), step.cache)


# the seed is an argument, not a constant: a new seed (a training run's every on-policy step) compiles nothing
prefill = frozen_jit(_prefill, static_argnums=(4, 6))
decode_step = frozen_jit(_decode, static_argnums=(6,))


def _finished(ids: list[int], eos: set[int], stop: tuple[str, ...], decode) -> _End | None:
  """How ``ids`` end, if they already hold an end, else None. At a stop string the ids kept are the fewest whose
  text reaches it (a token that straddles it stays)."""
  end = next((i for i, t in enumerate(ids) if t in eos), None)
  kept = ids if end is None else ids[:end]
  text = decode(kept)
  cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=None)
  if cut is not None:
    reach = next(n for n in range(len(kept) + 1) if len(decode(kept[:n])) >= cut)
    return _End(kept[:reach], text[:cut], "stop")
  return _End(kept, text, "eos", ids[end]) if end is not None else None


def generate_ids(model: Decoder, prompts: Sequence[Sequence[int]], config: GenerateConfig, decode=None,
                 eos_ids: Sequence[int] = ()) -> list[Generation]:
  """Continuations of token-id ``prompts`` (the module docstring): ``config.samples`` per prompt, in prompt then
  sample order. ``decode`` (ids -> text) gives each its text and finds ``config.stop`` strings; without it texts
  are empty and stop strings unused."""
  if config.stop and decode is None:
    raise ValueError("stop strings need a tokenizer to find them (decode)")
  empty = [i for i, p in enumerate(prompts) if len(p) == 0]
  if empty:
    raise ValueError(f"prompt {empty[0]} is empty: a continuation needs at least one token to follow (the "
                     "tokenizer's BOS, when it has one)")
  decode = decode or (lambda ids: "")
  jobs = [(p, s) for p in range(len(prompts)) for s in range(config.samples)]
  results = []
  for first in range(0, len(jobs), config.batch_size):
    batch = jobs[first:first + config.batch_size]
    padded = batch + [batch[0]] * (config.batch_size - len(batch))  # one shape for every batch
    ends = _decode_batch(model, [prompts[p] for p, _ in padded], [p * config.samples + s for p, s in padded],
                         config, set(eos_ids), decode)
    results.extend(Generation(p, s, end.text, tuple(end.ids), end.finish, end.eos_id)
                   for (p, s), end in zip(batch, ends))
  return results


def _decode_batch(model: Decoder, prompts: list[Sequence[int]], rows: list[int], config: GenerateConfig,
                  eos: set[int], decode) -> list[_End]:
  """One batch of left-padded prompts decoded together -> how each row ends."""
  width = -(-max(map(len, prompts)) // PROMPT_ROUNDING) * PROMPT_ROUNDING
  tokens, start = np.zeros((len(prompts), width), np.int32), np.zeros(len(prompts), np.int32)
  for r, prompt in enumerate(prompts):
    start[r] = width - len(prompt)
    tokens[r, start[r]:] = prompt
  rows, seed = jnp.asarray(rows, jnp.int32), jnp.asarray(config.seed, jnp.uint32)
  step = prefill(model, jnp.asarray(tokens), jnp.asarray(start), rows, width + config.max_new_tokens, seed,
                 config.sampling)
  written, ends = [step.tokens], {}
  while len(written) < config.max_new_tokens:
    if len(written) % CHECK_EVERY == 0:
      out = np.asarray(jnp.stack(written, axis=1))
      for r in set(range(len(prompts))) - set(ends):
        if (end := _finished(out[r].tolist(), eos, config.stop, decode)) is not None:
          ends[r] = end
      if len(ends) == len(prompts):
        break
    step = decode_step(model, step.tokens, step.cache, rows, jnp.asarray(len(written), jnp.int32), seed,
                       config.sampling)
    written.append(step.tokens)
  out = np.asarray(jnp.stack(written, axis=1))
  return [ends.get(r) or _finished(ids, eos, config.stop, decode) or _End(ids, decode(ids), "length")
          for r, ids in enumerate(out.tolist())]


class Prompt(NamedTuple):
  """A prompt as decoded: its token ``ids``, ``text`` as tokenized, and the ``record`` it came from (its fields
  are copied to each continuation's line of ``write_generations``)."""

  ids: tuple[int, ...]
  text: str
  record: dict


def encode_prompt(tokenizer, text: str, templated: bool = False) -> Prompt:
  """``text`` -> ``Prompt``: with the tokenizer's BOS rule, or as rendered by a chat template (``templated``: the
  template writes its own BOS)."""
  ids = tokenizer.backend.encode(text, add_special_tokens=False).ids if templated else tokenizer.encode(text)
  return Prompt(tuple(ids), text, {"prompt": text})


def record_prompt(record: dict, tokenizer, where: str) -> Prompt:
  """One JSONL record's prompt (``read_prompts``); ``where``: its ``file:line`` for errors."""
  if isinstance(record.get("prompt"), str):
    prompt = encode_prompt(tokenizer, record["prompt"])
  elif "messages" in record:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
      raise ValueError(f"{where}: chat messages need the model's chat template, and its tokenizer has none")
    text = spans.render_template(spans.chat_messages(record, where), template, spans.template_tokens(tokenizer),
                                 where, generation_prompt=True)
    prompt = encode_prompt(tokenizer, text, templated=True)
  else:
    raise ValueError(f"{where}: a prompt record needs a 'prompt' string or a 'messages' list")
  if not prompt.ids:  # found when the file is read, not at the first generation (a training run's first eval)
    raise ValueError(f"{where}: the prompt is empty (no BOS either): a continuation needs a token to follow")
  return prompt._replace(record=record)


def read_prompts(spec: str, tokenizer) -> list[Prompt]:
  """A JSONL file of prompts: each record's ``prompt`` string (tokenized with the BOS rule) or its chat
  ``messages`` rendered by the tokenizer's chat template followed by the assistant's opening (a conversation
  whose last message is the user's)."""
  prompts = [record_prompt(record, tokenizer, where) for where, record in files.jsonl_objects(spec, "prompts")]
  if not prompts:
    raise ValueError(f"{spec}: no prompts")
  return prompts


def default_eos(tokenizer, eos_ids: Sequence[int] | None = None) -> tuple[int, ...]:
  """``eos_ids`` when given, else the tokenizer's end-of-sequence id (if it has one)."""
  if eos_ids is not None:
    return tuple(eos_ids)
  return () if tokenizer.eos_id is None else (tokenizer.eos_id,)


def generate(loaded: LoadedModel, prompts: Sequence[str | Prompt], config: GenerateConfig = GenerateConfig()
             ) -> list[Generation]:
  """Continuations of text ``prompts`` (or ``Prompt``s, e.g. from ``read_prompts``) by a loaded model, decoded
  with its tokenizer; ends at ``config.eos_ids`` (default: the tokenizer's end-of-sequence id)."""
  tokenizer = loaded.tokenizer
  if tokenizer is None:
    raise ValueError(f"{loaded.source}: has no tokenizer to encode prompts with; use generate_ids")
  eos = default_eos(tokenizer, config.eos_ids)
  ids = [p.ids if isinstance(p, Prompt) else encode_prompt(tokenizer, p).ids for p in prompts]
  return generate_ids(loaded.model, ids, config, tokenizer.decode, eos)


def write_generations(path: str, prompts: Sequence[Prompt], generations: Sequence[Generation]) -> None:
  """One JSON line per continuation: its prompt's record fields, then ``sample``, ``completion`` (the text),
  ``finish`` and ``tokens`` (how many were generated before the end)."""
  lines = [files.json_text({**prompts[g.prompt].record, "sample": g.sample, "completion": g.text,
                            "finish": g.finish, "tokens": len(g.token_ids)}, indent=None) for g in generations]
  text = "".join(line + "\n" for line in lines)
  files.write_atomic(files.output_file(path, "generations"), text, "the generations")
