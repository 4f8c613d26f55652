"""Generation: cached decoding against a full forward pass, greedy output against transformers' ``generate``,
sampling rules against their definitions, stops and prompts as a user gives them."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner
from flax import nnx

from tailjax import cli, models
from tailjax import generate as gen
from tailjax.models import Decoder
from helpers import TINY, check_cache, greedy_by_forward, smollm2_path


def test_cached_retention_equals_its_forward_pass(rng):
  check_cache(Decoder(models.ModelConfig(**{**TINY.to_dict(), "attention": "retention"}), rngs=nnx.Rngs(2)), rng,
              TINY.vocab_size)


def sampling_reference(logits, temperature, top_k, top_p):
  """The distribution a sampled token follows, in float64: temperature, then top-k, then top-p."""
  z = np.asarray(logits, np.float64) / temperature
  if top_k:
    z = np.where(z < np.sort(z)[::-1][top_k - 1], -np.inf, z)
  p = np.exp(z - z.max())
  p /= p.sum()
  order = np.argsort(-p, kind="stable")
  before = np.cumsum(p[order]) - p[order]
  keep = np.zeros_like(p, bool)
  keep[order[before < top_p]] = True
  p = np.where(keep, p, 0)
  return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, 1.0), (0.7, 4, 1.0), (1.3, None, 0.8),
                                                      (0.5, 5, 0.6)])
def test_sampled_tokens_follow_temperature_top_k_and_top_p(temperature, top_k, top_p):
  logits = np.array([2.0, 1.5, 1.4, 0.3, 0.0, -0.5, -1.0, -3.0], np.float32)
  draws = 40_000
  keys = jax.random.split(jax.random.key(0), draws)
  tokens = gen.choose(jnp.broadcast_to(jnp.asarray(logits), (draws, len(logits))), keys,
                      gen.Sampling(temperature, top_k, top_p))
  freq = np.bincount(np.asarray(tokens), minlength=len(logits)) / draws
  want = sampling_reference(logits, temperature, top_k, top_p)
  assert np.all(freq[want == 0] == 0)  # never outside the kept set
  assert np.abs(freq - want).max() < 0.012, (freq, want)  # 4 standard errors at p = 0.5


def test_greedy_takes_the_lowest_id_of_tied_logits():
  logits = jnp.asarray([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
  assert gen.choose(logits, None, gen.Sampling()).tolist() == [1, 0]


def test_bad_sampling_and_generation_settings_are_refused():
  for bad in (dict(temperature=-1), dict(temperature=float("nan")), dict(top_p=0.0), dict(top_p=1.5),
              dict(top_k=-2)):
    with pytest.raises(ValueError, match=next(iter(bad))):
      gen.Sampling(**bad)
  for bad in (dict(max_new_tokens=0), dict(samples=0), dict(batch_size=0)):
    with pytest.raises(ValueError, match=next(iter(bad))):
      gen.GenerateConfig(**bad)
  with pytest.raises(ValueError, match="stop strings must not be empty"):
    gen.GenerateConfig(stop=("",))


def test_seeded_samples_do_not_depend_on_the_batch_and_greedy_equals_the_forward_pass():
  model = Decoder(TINY, rngs=nnx.Rngs(3))
  prompts = [[1, 5, 9], [2, 7, 7, 7, 30, 4, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [40]]
  sampled = gen.GenerateConfig(max_new_tokens=10, sampling=gen.Sampling(1.0, top_k=20), samples=3, seed=5)
  by_four = gen.generate_ids(model, prompts, dataclasses.replace(sampled, batch_size=4))
  by_two = gen.generate_ids(model, prompts, dataclasses.replace(sampled, batch_size=2))
  assert by_four == by_two and [(g.prompt, g.sample) for g in by_two] == [(p, s) for p in range(3) for s in range(3)]
  assert len({g.token_ids for g in by_two if g.prompt == 0}) > 1  # samples of one prompt differ
  other_seed = gen.generate_ids(model, prompts, dataclasses.replace(sampled, seed=6))
  assert [g.token_ids for g in other_seed] != [g.token_ids for g in by_two]
  greedy = gen.generate_ids(model, prompts, gen.GenerateConfig(max_new_tokens=10, batch_size=3))
  for g in greedy:
    width = -(-len(prompts[g.prompt]) // gen.PROMPT_ROUNDING) * gen.PROMPT_ROUNDING
    assert g.token_ids == greedy_by_forward(model, prompts[g.prompt], 10, width + 10)
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    gen.generate_ids(model, [[1], []], gen.GenerateConfig())


@pytest.mark.e2e  # a real model or the command line
def test_continuations_end_at_eos_ids_and_stop_strings(smollm2):
  greedy = gen.generate(smollm2, ["The capital of France is"], gen.GenerateConfig(max_new_tokens=24))[0]
  assert greedy.finish == "length" and len(greedy.token_ids) == 24
  assert greedy.text == smollm2.tokenizer.decode(greedy.token_ids)
  third = greedy.token_ids[2]
  ended = gen.generate(smollm2, ["The capital of France is"], gen.GenerateConfig(max_new_tokens=24, eos_ids=(third,)))
  assert ended[0].finish == "eos" and ended[0].token_ids == greedy.token_ids[:2]
  word = greedy.text.split()[2]
  stopped = gen.generate(smollm2, ["The capital of France is"], gen.GenerateConfig(max_new_tokens=24, stop=(word,)))
  assert stopped[0].finish == "stop" and stopped[0].text == greedy.text[:greedy.text.index(word)]
  kept = stopped[0].token_ids  # the fewest tokens whose text reaches the stop string
  assert kept == greedy.token_ids[:len(kept)] and len(smollm2.tokenizer.decode(kept)) >= len(stopped[0].text)
  assert len(smollm2.tokenizer.decode(kept[:-1])) < len(stopped[0].text)


@pytest.mark.e2e  # a real model or the command line
def test_generate_command_continues_prompts_and_chats(smollm2, tmp_path):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(json.dumps({"id": "a", "prompt": "def add(a, b):"}) + "\n\n"
                     + json.dumps({"id": "b", "messages": [{"role": "user", "content": "Say hi."}]}) + "\n")
  out = tmp_path / "out.jsonl"
  result = CliRunner().invoke(cli.main, ["--no-compile-cache", "generate", "--model", str(smollm2_path()),
                                         "--prompts", str(prompts), "--output", str(out), "--max-new-tokens", "12",
                                         "--temperature", "0.8", "--samples", "2", "--batch-size", "4"])
  assert result.exit_code == 0, result.output
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(x["id"], x["sample"]) for x in lines] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
  assert all(x["finish"] in ("eos", "length") and 0 < x["tokens"] <= 12 for x in lines)
  read = gen.read_prompts(str(prompts), smollm2.tokenizer)
  assert read[1].text.endswith("<|im_start|>assistant\n") and "Say hi." in read[1].text
  api = gen.generate(smollm2, read, gen.GenerateConfig(12, gen.Sampling(0.8), samples=2, batch_size=4))
  assert [g.text for g in api] == [x["completion"] for x in lines]
  prompts.write_text(json.dumps({"id": "c", "question": "no prompt"}) + "\n")
  result = CliRunner().invoke(cli.main, ["generate", "--model", str(smollm2_path()), "--prompts", str(prompts),
                                         "--output", str(out)])
  assert result.exit_code == 1 and f"{out}: generations exists; nothing was overwritten" in result.output
  out.unlink()
  result = CliRunner().invoke(cli.main, ["generate", "--model", str(smollm2_path()), "--prompts", str(prompts),
                                         "--output", str(out)])
  assert result.exit_code != 0 and f"{prompts}:1: a prompt record needs a 'prompt'" in result.output
