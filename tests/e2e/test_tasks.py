"""Task accuracy: the match rules, a task file read and checked, accuracy measured with every checkpoint of a
run and correlated by ``tailjax select`` without a scores file."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from tailjax import cli, distill, generate, models
from tailjax.generate import tasks
from helpers import distill_config, teacher_and_corpus

tiny = pytest.fixture(scope="module")(teacher_and_corpus)  # a tiny GGUF teacher and a JSONL corpus


def test_answers_match_by_normalised_text():
  assert tasks.correct("  The  Capital is\nParis.", ("paris",), "substring")
  assert not tasks.correct("The capital is Paris.", ("paris",), "exact")
  assert tasks.correct(" Paris \n", ("paris", "Lyon"), "exact")
  assert not tasks.correct("Lyons", ("Lyon ",), "exact") and tasks.correct("Lyons", ("Lyon ",), "substring")
  for bad, match in ((dict(metric="regex"), "task metric 'regex'"), (dict(decoding="beam"), "task decoding 'beam'"),
                     (dict(samples=4), "greedy decoding writes one continuation"),
                     (dict(decoding="sample", samples=0), "samples 0")):
    with pytest.raises(ValueError, match=match):
      tasks.TaskConfig(data="t.jsonl", **bad)
  with pytest.raises(ValueError, match="unknown fields"):
    tasks.TaskConfig.from_dict({"data": "t.jsonl", "metrc": "exact"})


def test_task_accuracy_is_saved_with_every_checkpoint_and_select_correlates_it(tiny, tmp_path):  # noqa: F811
  spec = str(tiny / "teacher.gguf")
  task = tmp_path / "task.jsonl"
  prompts = ["the cat sat on the", "a dog ran to the", "we saw a", "it is a", "one two three"]
  task.write_text("".join(json.dumps({"prompt": p, "answer": ["a", "o"]}) + "\n" for p in prompts))
  greedy = {"data": str(task), "max_new_tokens": 4}
  sampled = {"data": str(task), "decoding": "sample", "samples": 3, "max_new_tokens": 4, "temperature": 1.0}
  cfg = distill_config(tiny, objective="ce", teacher=None, tokenizer=spec, steps=6, save_every=2, eval_every=2,
               learning_rate=3e-2, eval_task=[greedy, sampled])
  run = distill.distill(cfg, tmp_path / "run")
  assert all(run.evals[s]["task"] == run.evals[s]["tasks"][0] for s in (2, 4, 6))  # the first task is "task"
  assert [t["decoding"] for t in run.evals[6]["tasks"]] == ["greedy", "sample"]
  accuracy = {step: run.evals[step]["tasks"][1]["accuracy"] for step in (2, 4, 6)}
  assert all(run.evals[s]["tasks"][1]["fail_rate"] == pytest.approx(1 - a) for s, a in accuracy.items())
  # the saved accuracy is what the checkpoint writes: the same continuations from the loaded model
  loaded = models.load(tmp_path / "run" / "checkpoints" / "6")
  items = tasks.read_task(str(task), loaded.tokenizer)
  outputs = generate.generate(loaded, [i.prompt for i in items],
                              generate.GenerateConfig(4, generate.Sampling(1.0), 3, 0, ("\n",)))
  hits = [tasks.correct(g.text, items[g.prompt].answers, "substring") for g in outputs]
  assert accuracy[6] == pytest.approx(np.mean(hits))
  assert 0 < np.mean(hits) < 1  # the answers are neither always nor never written: the test can tell
  # select reads the accuracies with the CE summaries and correlates every summary with them
  result = CliRunner().invoke(cli.main, ["select", str(tmp_path / "run"), "--output", str(tmp_path / "sel")])
  assert result.exit_code == 0, result.output
  selection = json.loads((tmp_path / "sel" / "selection.json").read_text())
  assert set(selection["correlations"]) >= {"mean", "median"} and "vs task score" in result.output
  # a task record without an answer is named
  task.write_text(json.dumps({"prompt": "x"}) + "\n")
  with pytest.raises(ValueError, match=f"{task}:1: a task record needs an 'answer'"):
    tasks.read_task(str(task), loaded.tokenizer)


def test_an_empty_task_prompt_is_refused_before_the_first_step(tiny, tmp_path):  # noqa: F811
  """Found when the run is set up, by file:line, not at the first evaluation after training steps."""
  task = tmp_path / "task.jsonl"
  task.write_text(json.dumps({"prompt": "the cat", "answer": "a"}) + "\n" + json.dumps({"prompt": "", "answer": "a"}))
  cfg = distill_config(tiny, objective="ce", teacher=None, tokenizer=str(tiny / "teacher.gguf"), eval_task={"data": str(task)})
  with pytest.raises(ValueError, match=rf"{task}:2: the prompt is empty"):
    distill.prepare(cfg)
