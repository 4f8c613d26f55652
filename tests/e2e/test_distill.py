"""`tailjax distill` and `cache-teacher` on tiny models: loss values, learning, resume, caching, bad input."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner

from tailjax import cli, data, distill, models
from tailjax.distill import teacher_cache
from helpers import STUDENT, TINY, distill_config, interrupted_and_resumed, materialized_loss, teacher_and_corpus

tiny = pytest.fixture(scope="module")(teacher_and_corpus)  # a tiny GGUF teacher and a JSONL corpus




@pytest.mark.parametrize("objective,fields", [("ce", {}), ("kl", {}), ("topk", {}), ("reverse_kl", {}),
                                              ("jsd", dict(jsd_beta=0.2, temperature=2.0, t2_scaling=True))])
def test_first_step_loss_equals_losses_on_materialized_logits(tiny, tmp_path, objective, fields):
  cfg = distill_config(tiny, objective=objective, steps=1, grad_accum=2, **fields)
  setup = distill.prepare(cfg)
  expected = materialized_loss(setup, next(distill.batches(setup)), cfg)
  result = distill.distill(cfg, tmp_path / "run")
  assert result.losses[1] == pytest.approx(expected, rel=2e-5)


ANSWERS = {" dog": 4, " dog cat": 8, " cat cat cat": 12}  # tokens by hand: a space (Ġ) and one per letter


def test_examples_are_packed_whole_and_only_their_answer_tokens_count(tiny, tmp_path):
  records = [{"prompt": prompt, "answer": answer} for prompt in ("my pet is a", "what do you see", "name two pets")
             for answer in ANSWERS] * 2
  path = tmp_path / "sft.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  cfg = distill_config(tiny, data=str(path), objective="ce", teacher=None, tokenizer=str(tiny / "teacher.gguf"), seq_len=40,
               batch_size=2, steps=1, val_fraction=0.2, learning_rate=1e-2)
  setup = distill.prepare(cfg)
  tokenizer = setup.tokenizer
  seen = []
  for packed in (setup.train, setup.val):
    for tokens, segments, scored in zip(packed.tokens, packed.segments, packed.scored):
      for segment in range(1, segments.max() + 1):
        ids, mask = tokens[segments == segment], scored[segments == segment]
        text = tokenizer.decode(ids)
        answer = next(a for a in ANSWERS if text.endswith(a))
        assert mask.sum() == ANSWERS[answer] and mask[-ANSWERS[answer]:].all()  # the answer, whole, and only it
        assert tokenizer.decode(ids[mask]) == answer
        seen.append(text)
      assert not scored[segments == 0].any()
  assert sorted(seen) == sorted(r["prompt"] + r["answer"] for r in records)  # every example once, never split
  # the loss and the validation CE average over exactly those tokens
  batch = next(distill.batches(setup))
  expected = materialized_loss(setup, batch, cfg)
  result = distill.distill(cfg, tmp_path / "run")
  assert result.losses[1] == pytest.approx(expected, rel=2e-5)
  assert result.evals[1]["ce"]["n"] == setup.val.scored[:, 1:].sum()
  # an example longer than a window is named, not cut
  path.write_text(json.dumps(records[0]) + "\n" + json.dumps({"prompt": "a " * 30, "answer": " dog"}) + "\n")
  with pytest.raises(ValueError, match=f"{path}:2: 64 tokens, longer than a training window of 41"):
    distill.prepare(dataclasses.replace(cfg, val_data=str(path)))
  path.write_text(json.dumps({"prompt": "my pet is a", "answer": ""}) + "\n")
  with pytest.raises(ValueError, match=f"{path}:1: no answer or assistant token to learn from"):
    distill.prepare(dataclasses.replace(cfg, val_data=str(path)))


def test_ce_training_lowers_validation_ce_and_checkpoints_are_models(tiny, tmp_path):
  cfg = distill_config(tiny, objective="ce", teacher=None, tokenizer=str(tiny / "teacher.gguf"), steps=30, save_every=15,
               eval_every=15, batch_size=8, learning_rate=1e-2, warmup_steps=3)
  result = distill.distill(cfg, tmp_path / "run")
  assert result.checkpoints == [15, 30]
  first, last = (np.mean([result.losses[s] for s in steps]) for steps in (range(1, 4), range(28, 31)))
  assert last < first - 0.5
  assert result.evals[30]["ce"]["median"] < result.evals[15]["ce"]["median"] < np.log(TINY.vocab_size)
  # a checkpoint is a model spec; its saved summary is the CE of that model on the validation windows
  step_dir = tmp_path / "run" / "checkpoints" / "30"
  loaded = models.load(step_dir)
  val = distill.prepare(cfg).val
  logprobs = np.asarray(_logprobs(loaded, val), np.float64)
  ce = -np.take_along_axis(logprobs, val.tokens[:, 1:, None], axis=-1)[..., 0]
  saved = json.loads((step_dir / distill.EVAL_FILE).read_text())["ce"]
  assert saved["mean"] == pytest.approx(ce.mean(), rel=1e-5)
  assert saved["median"] == pytest.approx(np.quantile(ce, 0.5, method="lower"), rel=0.011)
  assert saved["n"] == ce.size and len(saved["percentiles"]) == 19 and "band_mass" in saved
  # the run is a checkpoint family for `tailjax select`, read from the summaries saved with each checkpoint
  selected = CliRunner().invoke(cli.main, ["select", str(tmp_path / "run"), "--output", str(tmp_path / "sel")])
  assert selected.exit_code == 0, selected.output
  selection = json.loads((tmp_path / "sel" / "selection.json").read_text())
  assert selection["table"]["run@30"]["median"] == result.evals[30]["ce"]["median"]
  assert selection["table"]["run@15"]["p50"] == result.evals[15]["ce"]["percentiles"]["p50"]
  assert selection["selected_by"]["median"] == "run@30"
  # checkpoints without a saved summary are evaluated on --corpus (windows shaped as the run's)
  for step in (15, 30):
    (tmp_path / "run" / "checkpoints" / str(step) / distill.EVAL_FILE).unlink()
  missing = CliRunner().invoke(cli.main, ["select", str(tmp_path / "run")])
  assert missing.exit_code != 0 and "has no saved evaluation" in missing.output
  selected = CliRunner().invoke(cli.main, ["select", str(tmp_path / "run"), "--corpus", cfg.data, "--mesh", "data=8",
                                           "--output", str(tmp_path / "sel2")])
  assert selected.exit_code == 0, selected.output
  windows = data.pack_documents(data.read_documents(cfg.data), loaded.tokenizer, cfg.seq_len).take(cfg.val_windows)
  logprobs = np.asarray(_logprobs(loaded, windows), np.float64)
  ce = -np.take_along_axis(logprobs, windows.tokens[:, 1:, None], axis=-1)[..., 0]
  table = json.loads((tmp_path / "sel2" / "selection.json").read_text())["table"]
  assert table["run@30"]["mean"] == pytest.approx(ce.mean(), rel=1e-5)


def _logprobs(loaded, windows):
  hidden = loaded.model(jnp.asarray(windows.tokens[:, :-1]), jnp.asarray(windows.segments[:, :-1]))
  return jax.nn.log_softmax(jnp.einsum("btd,dv->btv", hidden, loaded.model.unembedding()), axis=-1)


@pytest.mark.slow
def test_resume_after_interruption_reproduces_the_uninterrupted_run(tiny, tmp_path):
  cfg = distill_config(tiny, steps=6, save_every=2, eval_every=3)
  whole = distill.distill(cfg, tmp_path / "whole")
  resumed = interrupted_and_resumed(cfg, tmp_path / "cut", 5)
  assert sorted(resumed.losses) == [5, 6]  # restarted from the checkpoint of step 4
  assert all(resumed.losses[s] == whole.losses[s] for s in (5, 6))
  logs = [(tmp_path / run / "metrics.jsonl").read_text().splitlines() for run in ("whole", "cut")]
  strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in lines]
  assert strip(logs[0]) == strip(logs[1])
  assert resumed.evals[6]["ce"] == whole.evals[6]["ce"]
  # a run stopped while writing its last checkpoint's files (a full disk): resuming writes back what it lacks, the
  # evaluation from evals.jsonl, so the checkpoint is a model spec with its eval again (select reads it)
  last = tmp_path / "whole" / "checkpoints" / "6"
  saved_eval = json.loads((last / "eval.json").read_text())
  (last / "eval.json").unlink()
  (last / "tailjax_model.json").unlink()
  distill.distill(cfg, tmp_path / "whole")
  assert json.loads((last / "eval.json").read_text()) == saved_eval and (last / "tailjax_model.json").exists()
  # a damaged checkpoint (the data iterator's state cut short, then a parameter shard) is named with the remedy
  iterator_state = next((last / "data").rglob("process_0-of-1.json"))
  iterator_state.write_text(iterator_state.read_text()[:7])
  with pytest.raises(ValueError, match=r"checkpoints/6: damaged checkpoint, it cannot resume the run .*delete "):
    distill.distill(cfg, tmp_path / "whole")
  # a changed config is refused, unless forced
  with pytest.raises(ValueError, match=r"learning_rate: 0.003 -> 0.001"):
    distill.distill(dataclasses.replace(cfg, learning_rate=1e-3), tmp_path / "cut")
  longer = distill.distill(dataclasses.replace(cfg, steps=7), tmp_path / "cut", force=True)
  assert sorted(longer.losses) == [7]


@pytest.mark.slow
def test_gradient_accumulation_gives_the_same_steps_and_bfloat16_stays_close(tiny, tmp_path):
  one = distill.distill(distill_config(tiny, steps=3, batch_size=4), tmp_path / "one")
  two = distill.distill(distill_config(tiny, steps=3, batch_size=4, grad_accum=2), tmp_path / "two")
  bf16 = distill.distill(distill_config(tiny, steps=3, batch_size=4, dtype="bfloat16"), tmp_path / "bf16")
  for step in (1, 2, 3):
    assert two.losses[step] == pytest.approx(one.losses[step], rel=1e-5)
    assert bf16.losses[step] == pytest.approx(one.losses[step], rel=0.03)
  # tensorboardX (a test dependency) gets the same scalars as metrics.jsonl
  losses_logged = tensorboard_scalars(tmp_path / "one" / "tensorboard", "train/loss")
  assert losses_logged == pytest.approx([one.losses[s] for s in (1, 2, 3)], rel=1e-7)


def tensorboard_scalars(directory, tag: str) -> list[float]:
  """Values of ``tag`` in a TensorBoard event file (TFRecord framing: length, crc, event, crc)."""
  import struct

  from tensorboardX.proto import event_pb2

  (path,) = directory.glob("events.out.tfevents.*")
  raw, values, offset = path.read_bytes(), [], 0
  while offset < len(raw):
    (length,) = struct.unpack_from("<Q", raw, offset)
    event = event_pb2.Event.FromString(raw[offset + 12:offset + 12 + length])
    values += [v.simple_value for v in event.summary.value if v.tag == tag]
    offset += 12 + length + 4
  return values


def test_cached_teacher_trains_like_the_online_teacher(tiny, tmp_path):
  cfg = distill_config(tiny, steps=3, save_every=3, eval_every=3)
  meta = distill.cache_teacher(cfg, tmp_path / "cache", shard_size=7)
  setup = distill.prepare(cfg)
  assert meta.windows == len(setup.train) and meta.shards == -(-len(setup.train) // 7)
  ids = np.load(tmp_path / "cache" / "shard-00000" / "ids.npy")
  assert ids.dtype == np.uint16 and ids.shape == (7, 16, 5)
  online = distill.distill(cfg, tmp_path / "online")
  cached = distill.distill(dataclasses.replace(cfg, teacher_cache=str(tmp_path / "cache")), tmp_path / "cached")
  for step in (1, 2, 3):
    assert cached.losses[step] == pytest.approx(online.losses[step], rel=1e-5)
  # a partly written cache resumes; the shards already there are kept as they are
  (tmp_path / "cache" / "shard-00001").rename(tmp_path / "kept")
  with pytest.raises(ValueError, match="incomplete teacher cache, 1 of"):
    teacher_cache.TeacherCache(tmp_path / "cache")
  before = (tmp_path / "cache" / "shard-00000" / "ids.npy").stat().st_mtime_ns
  distill.cache_teacher(cfg, tmp_path / "cache", shard_size=7)
  assert (tmp_path / "cache" / "shard-00000" / "ids.npy").stat().st_mtime_ns == before
  np.testing.assert_array_equal(np.load(tmp_path / "cache" / "shard-00001" / "ids.npy"), np.load(tmp_path / "kept" / "ids.npy"))
  # a cache of a larger K serves a smaller one: its ids are sorted; a smaller K or another teacher is refused
  top3 = dataclasses.replace(cfg, topk=3, steps=1)
  expected = materialized_loss(setup, next(distill.batches(setup)), top3)
  from_cache = distill.distill(dataclasses.replace(top3, teacher_cache=str(tmp_path / "cache")), tmp_path / "top3")
  assert from_cache.losses[1] == pytest.approx(expected, rel=2e-5)
  with pytest.raises(ValueError, match=r"k: cache has 5, this run needs 6"):
    distill.prepare(dataclasses.replace(cfg, topk=6, teacher_cache=str(tmp_path / "cache")))
  other = tmp_path / "other.gguf"
  other.write_bytes((tiny / "teacher.gguf").read_bytes())
  with pytest.raises(ValueError, match=r"teacher: cache has .*teacher.gguf', this run needs .*other.gguf"):
    distill.prepare(dataclasses.replace(cfg, teacher=str(other), teacher_cache=str(tmp_path / "cache")))


def test_bad_input_is_named(tiny, tmp_path):
  from tokenizers import Tokenizer, models as tokenizer_models

  other = tmp_path / "tokenizer.json"
  Tokenizer(tokenizer_models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")).save(str(other))
  with pytest.raises(ValueError, match="tokenizer mismatch: teacher .*teacher.gguf .* and tokenizer .*tokenizer.json"):
    distill.prepare(distill_config(tiny, tokenizer=str(other)))
  with pytest.raises(ValueError, match=r"topk=65 is larger than the vocabulary \(64 tokens\)"):
    distill.prepare(distill_config(tiny, topk=65))
  with pytest.raises(ValueError, match="student has 32 vocabulary entries, fewer than the tokenizer's 64"):
    distill.prepare(distill_config(tiny, student={**STUDENT, "vocab_size": 32}))
  with pytest.raises(ValueError, match="objective kl needs a teacher"):
    distill_config(tiny, objective="kl", teacher=None)
  with pytest.raises(ValueError, match="teacher cache holds top-K only"):
    distill_config(tiny, objective="kl", teacher_cache=str(tmp_path))
  short = tmp_path / "short.txt"
  short.write_text("a short text")
  with pytest.raises(ValueError, match="short.txt .* shorter than one training window"):
    distill.prepare(distill_config(tiny, data=str(short), val_data=str(short)))
  yaml_file = tmp_path / "run.yaml"
  yaml_file.write_text("objective: topk\ntopk: 5\nlerning_rate: 0.1\n")
  with pytest.raises(ValueError, match=r"run.yaml: unknown config fields \['lerning_rate'\]"):
    distill.DistillConfig.from_file(yaml_file)


def test_padded_student_vocabulary_is_sliced_to_the_tokenizer(tiny, tmp_path):
  cfg = distill_config(tiny, student={**STUDENT, "vocab_size": 80}, steps=1)
  setup = distill.prepare(cfg)
  assert setup.student.cfg.vocab_size == 80 and setup.vocab_size == 64
  expected = materialized_loss(setup, next(distill.batches(setup)), cfg)
  assert distill.distill(cfg, tmp_path / "run").losses[1] == pytest.approx(expected, rel=2e-5)


def test_cli_cache_teacher_then_distill_from_a_yaml_config(tiny, tmp_path):
  yaml_file = tmp_path / "recipe.yaml"
  fields = {k: v for k, v in dataclasses.asdict(distill_config(tiny, steps=2)).items() if v is not None}
  import yaml

  yaml_file.write_text(yaml.safe_dump(fields))
  runner = CliRunner()
  cached = runner.invoke(cli.main, ["cache-teacher", "--config", str(yaml_file), "--output", str(tmp_path / "cache")])
  assert cached.exit_code == 0, cached.output
  assert "top-5" in cached.output
  trained = runner.invoke(cli.main, ["distill", "--config", str(yaml_file), "--teacher-cache", str(tmp_path / "cache"),
                                     "--steps", "3", "--output", str(tmp_path / "run")])
  assert trained.exit_code == 0, trained.output
  assert json.loads((tmp_path / "run" / "config.json").read_text())["steps"] == 3
  assert "CE mean" in trained.output and (tmp_path / "run" / "checkpoints" / "3" / "eval.json").exists()
  refused = runner.invoke(cli.main, ["distill", "--config", str(yaml_file), "--topk", "3", "--output",
                                     str(tmp_path / "run")])
  assert refused.exit_code != 0 and "holds a run with another config" in refused.output


def test_the_shipped_configs_are_valid_and_complete(tmp_path):
  from pathlib import Path

  root = Path(__file__).parents[2]
  import yaml

  documented = yaml.safe_load((root / "configs" / "distill.yaml").read_text())
  assert documented == {f.name: f.default for f in dataclasses.fields(distill.DistillConfig)}  # every field
  for recipe in sorted((root / "recipes").glob("*/*.yaml")):
    distill.DistillConfig.from_file(recipe, teacher="t.gguf")


def test_a_glob_reads_every_matching_file(tmp_path):
  for i in range(3):
    (tmp_path / f"part-{i}.jsonl").write_text(json.dumps({"text": f"document {i}"}) + "\n")
  assert data.read_documents(str(tmp_path / "part-*.jsonl")) == ["document 0", "document 1", "document 2"]
  with pytest.raises(FileNotFoundError, match="no file matches"):
    data.read_documents(str(tmp_path / "none-*.jsonl"))


@pytest.mark.slow
def test_smoke_recipe_runs_end_to_end_and_selects_by_median(tmp_path):
  import os
  import subprocess
  import sys
  from pathlib import Path

  recipe = Path(__file__).parents[2] / "recipes" / "smoke" / "run.sh"
  env = {**os.environ, "STEPS": "3", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
  done = subprocess.run(["bash", str(recipe), str(tmp_path / "smoke")], env=env, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  selection = json.loads((tmp_path / "smoke" / "selection" / "selection.json").read_text())
  assert set(selection["table"]) == {f"{run}@3" for run in ("token-ce", "full-kl", "top40", "top15", "top5")}
  medians = {name: row["median"] for name, row in selection["table"].items()}
  assert selection["selected_by"]["median"] == min(medians, key=medians.get) == selection["selected"]
  assert "concordance C({mean,median})" in done.stdout
  cache = teacher_cache.read_meta(tmp_path / "smoke" / "teacher-top40")
  assert cache.k == 40 and cache.vocab_size == 4096


@pytest.mark.slow
def test_sft_facts_recipe_fine_tunes_smollm2_with_lora_and_selects(tmp_path):
  """recipes/sft-facts end to end, shrunk (4 people, 3 steps, a checkpoint each): held-out phrasings, LoRA on the
  real SmolLM2, task accuracy beside every CE summary, selection correlating them."""
  import importlib.util
  import os
  import subprocess
  import sys
  from pathlib import Path

  recipe = Path(__file__).parents[2] / "recipes" / "sft-facts"
  env = {**os.environ, "PEOPLE": "4", "STEPS": "3", "EPOCH": "1",
         "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
  done = subprocess.run(["bash", str(recipe / "run.sh"), str(tmp_path)], env=env, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  train = [json.loads(x) for x in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
  test = [json.loads(x) for x in (tmp_path / "data" / "test.jsonl").read_text().splitlines()]
  assert (len(train), len(test)) == (36, 12)
  assert not {r["prompt"] for r in test} & {r["prompt"] for r in train}  # held-out phrasings only
  spec = importlib.util.spec_from_file_location("make_data", recipe / "make_data.py")
  make_data = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(make_data)
  for person in make_data.people(4, 0):  # every held-out fact was taught, with the same answer
    for record in (r for r in test if person["name"] in r["prompt"]):
      assert record["answer"] == f" {person[record['attribute']]}\n"
      assert sum(person["name"] in r["prompt"] and r["answer"] == record["answer"] for r in train) >= 3
  evals = [json.loads(x) for x in (tmp_path / "run" / "evals.jsonl").read_text().splitlines()]
  assert [e["step"] for e in evals] == [1, 2, 3]
  assert all(e["task"]["prompts"] == 12 and 0 <= e["task"]["accuracy"] <= 1 and e["ce"]["n"] > 12 for e in evals)
  assert all([t["decoding"] for t in e["tasks"]] == ["greedy", "sample"] for e in evals)
  selection = json.loads((tmp_path / "selection" / "selection.json").read_text())
  assert set(selection["table"]) == {"run@1", "run@2", "run@3"} and {"mean", "median"} <= set(selection["correlations"])
