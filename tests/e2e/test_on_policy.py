"""On-policy batches (GKD): which tokens a continuation rewrites, that they are the student's own greedy or sampled
tokens, that a run trains on them scored by the teacher, and that it resumes to the same batches."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tailjax import distill
from tailjax.distill import on_policy
from tailjax.models import Decoder
from helpers import TINY, distill_config, interrupted_and_resumed, materialized_loss, teacher_and_corpus

tiny = pytest.fixture(scope="module")(teacher_and_corpus)  # a tiny GGUF teacher and a JSONL corpus


def test_examples_keep_their_prompt_and_give_their_last_span_or_a_documents_rest_as_room():
  segments = np.array([[1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0],
                       [1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]])
  scored = np.array([[0, 0, 0, 1, 1, 1, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0],  # an answer; two assistant turns
                     [1] * 16], bool)  # documents: every token a target
  found = on_policy.examples(segments, scored, prompt_tokens=4)
  # the answer after its prompt; the last assistant turn after the whole conversation before it; a document's
  # tokens after its first 4 (the first document is too short to leave room)
  assert found == [(0, 0, 3, 6), (0, 6, 11, 13), (1, 3, 7, 16)]
  assert on_policy.examples(segments, np.zeros_like(scored), 4) == []


def greedy_reference(model: Decoder, prompt: np.ndarray, steps: int, eos: int) -> list[int]:
  """Greedy decoding by a full forward pass per token, no cache; ends with (and keeps) ``eos``."""
  ids = list(prompt)
  for _ in range(steps):
    hidden = model(jnp.asarray([ids]))[0, -1]
    ids.append(int(np.argmax(np.asarray(hidden @ model.unembedding(), np.float64))))
    if ids[-1] == eos:
      break
  return ids[len(prompt):]


def test_continuations_are_the_students_own_and_the_only_targets(rng):
  model = Decoder(TINY, rngs=nnx.Rngs(3))
  segments = np.array([[1] * 9 + [2] * 11 + [0] * 4, [1] * 24])
  scored = np.zeros((2, 24), bool)
  scored[0, 6:9], scored[0, 15:20], scored[1, :] = True, True, True
  tokens = rng.integers(1, TINY.vocab_size, (2, 24)).astype(np.int32)
  batch = {"tokens": tokens, "segments": segments.astype(np.int32), "scored": scored}
  greedy = on_policy.OnPolicyConfig(fraction=1.0, temperature=0.0, max_new_tokens=6, prompt_tokens=10)
  found = on_policy.examples(segments, scored, greedy.prompt_tokens)
  assert found == [(0, 0, 6, 9), (0, 9, 15, 20), (1, 0, 10, 24)]
  # an end-of-sequence id the first continuation reaches at its second token
  eos = greedy_reference(model, tokens[0, :6], 2, -1)[1]
  out = on_policy.resample(model, batch, greedy, seed=0, eos_ids=(eos,))
  expected_scored = np.zeros_like(scored)
  for e in found:
    want = greedy_reference(model, tokens[e.row, e.start:e.cut], greedy.max_new_tokens, eos)[:e.end - e.cut]
    written = out.batch["tokens"][e.row, e.cut:e.end]
    assert written[:len(want)].tolist() == want and not written[len(want):].any()  # then unscored padding
    expected_scored[e.row, e.cut:e.cut + len(want)] = True
  assert out.batch["tokens"][0, 6:8].tolist()[-1] == eos  # the end is kept: the teacher judges it too
  assert np.array_equal(out.batch["scored"], expected_scored) and out.targets == expected_scored.sum()
  rewritten = np.zeros_like(scored)
  for e in found:
    rewritten[e.row, e.cut:e.end] = True
  assert np.array_equal(out.batch["tokens"][~rewritten], tokens[~rewritten])  # prompts and the rest as they were
  assert np.array_equal(out.batch["segments"], batch["segments"]) and out.examples == 3
  # sampled: the seed decides
  sampled = on_policy.OnPolicyConfig(fraction=1.0, max_new_tokens=6, prompt_tokens=10)
  draws = [on_policy.resample(model, batch, sampled, seed=s).batch["tokens"] for s in (1, 1, 2)]
  assert np.array_equal(draws[0], draws[1]) and not np.array_equal(draws[0], draws[2])


@pytest.mark.slow
def test_a_run_learns_from_its_samples_scored_by_the_teacher_and_resumes_to_them(tiny, tmp_path):  # noqa: F811
  policy = {"fraction": 0.5, "max_new_tokens": 5, "prompt_tokens": 6}
  cfg = distill_config(tiny, objective="kl", seed=2, steps=6, save_every=2, eval_every=6, on_policy=policy)
  chosen = [s for s in range(1, 7) if on_policy.chosen(0.5, 2, s)]
  assert chosen == [1, 2, 3, 6]  # (seed 2) on-policy first, the corpus later, on-policy again after the resume
  # step 1: the loss is the teacher's KL on the initial student's own continuations, and only on those tokens
  setup = distill.prepare(cfg)
  batch = next(distill.batches(setup))
  expected = on_policy.resample(setup.student, batch, on_policy.OnPolicyConfig.from_dict(policy),
                                on_policy.step_seed(2, 1), (setup.tokenizer.eos_id,))
  assert 0 < expected.targets < batch["scored"].sum()
  whole = distill.distill(cfg, tmp_path / "whole")
  assert whole.losses[1] == pytest.approx(materialized_loss(setup, expected.batch, cfg), rel=2e-5)
  logged = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
  assert [line["on_policy_steps"] for line in logged] == [int(s in chosen) for s in range(1, 7)]
  assert logged[0]["sampled_tokens"] == expected.targets
  resumed = interrupted_and_resumed(cfg, tmp_path / "cut", 5)
  assert sorted(resumed.losses) == [5, 6] and all(resumed.losses[s] == whole.losses[s] for s in (5, 6))


def test_on_policy_needs_a_teacher_online_and_sensible_fields(tiny):  # noqa: F811
  with pytest.raises(ValueError, match="need a teacher online and a distillation objective \\(not ce\\)"):
    distill_config(tiny, objective="ce", on_policy={"fraction": 0.5})
  with pytest.raises(ValueError, match="\\(not a teacher cache\\)"):
    distill_config(tiny, teacher_cache=str(tiny), on_policy={"fraction": 0.5})
  with pytest.raises(ValueError, match="on_policy fraction 0: expected a share of steps in \\(0, 1\\]"):
    distill_config(tiny, on_policy={"fraction": 0})
  with pytest.raises(ValueError, match="on_policy: unknown fields \\['lambda'\\]"):
    distill_config(tiny, on_policy={"lambda": 0.5})
  with pytest.raises(ValueError, match="top_p 0: expected a value in \\(0, 1\\]"):
    distill_config(tiny, on_policy={"top_p": 0})
