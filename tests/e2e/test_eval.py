"""`tailjax eval` end to end on tiny random models: numbers, contract, resume, bad input."""

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from flax import nnx
from pydoc_data.topics import topics

from tailjax import cli, data, models, report
from tailjax.eval import summaries
from tailjax.eval import step as eval_step
from tailjax.eval import llamacpp
from tailjax.eval import references
from tailjax.eval import reference_cache
from tailjax import eval as evaluation
from tailjax.eval import EvalConfig, runner
from tailjax.eval.state import load_state
from tailjax.models import Decoder
from helpers import PROTOCOL, TINY, letter_text, write_tiny_gguf, write_tiny_model_and_corpus

CONTRACT = ("mean", "median", "p90", "p95", "p99", "p99.9", "spike_rate")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return write_tiny_model_and_corpus(tmp_path_factory.mktemp("tiny"), seed=7, documents=6)


def run(tiny, output, **kwargs):
  options = dict(corpus=str(tiny / "corpus.txt"), protocol=PROTOCOL, batch_size=3, save_every=0.0)
  return evaluation.run(EvalConfig(str(tiny / "tiny.gguf"), ["@int3-g16", "@int2-g16-asym"], **{**options, **kwargs}),
                        output)


def test_report_matches_exact_quantiles_of_the_token_dump(tiny, tmp_path):
  result = run(tiny, tmp_path / "run", dump_tokens=tmp_path / "tokens.parquet")
  saved = json.loads((tmp_path / "run" / "report.json").read_text())
  assert saved["candidates"].keys() == result["candidates"].keys() == {"int3-g16-sym", "int2-g16-asym"}
  page = (tmp_path / "run" / "report.html").read_text()
  # KLD CDF and its tail (1 - CDF), sequence PPL, CE profile, residual stream per layer
  assert page.count("data:image/png;base64") == 5 and 'alt="kld_survival"' in page
  assert "<h2>How to read this</h2>" in page and "## How to read this" in (tmp_path / "run" / "report.md").read_text()
  assert "[GGUF, F32]" in page  # the reference's own storage in the header
  layers = {label: saved["candidates"][label]["layers"]["rel_error"]["median"] for label in saved["candidates"]}
  assert len(layers["int2-g16-asym"]) == 2 and 0 < layers["int3-g16-sym"][-1] < layers["int2-g16-asym"][-1]
  assert "<h2>Highest-KLD tokens: int2-g16-asym</h2><table>" in page  # not only in report.md
  markdown = (tmp_path / "run" / "report.md").read_text()
  assert "| candidate | KLD mean |" in markdown and "## Highest-KLD tokens: int2-g16-asym" in markdown
  assert "int2-g16-asym residual stream vs the reference's: relative error median" in markdown
  ratio = result["candidates"]["int2-g16-asym"]["ppl_ratio"]
  assert f"int2-g16-asym: as llama.cpp prints it: Mean PPL(Q)/PPL(base) {ratio:.5g} ± " in markdown
  assert "KLD max" in markdown and "99.9% " in markdown and ", 0.1% " in markdown
  dump = pq.read_table(tmp_path / "tokens.parquet").to_pydict()
  scored = 10 * 23
  assert saved["run"]["scored_tokens"] == scored
  for label, cand in saved["candidates"].items():
    rows = np.asarray(dump["candidate"]) == label
    assert rows.sum() == scored
    kld, ref_ce, cand_ce = (np.asarray(dump[c], np.float64)[rows] for c in ("kld", "ref_ce", "cand_ce"))
    assert {*CONTRACT, "top1_agreement"} <= {*cand["kld"], *cand}
    for name, q in (("median", 0.5), ("p90", 0.9), ("p95", 0.95), ("p99", 0.99), ("p99.9", 0.999)):
      exact = np.quantile(kld, q, method="lower")  # the sketch reports lower quantiles
      assert cand["kld"][name] == pytest.approx(exact, rel=0.011), name  # sketch accuracy 0.5%, f32 values
    assert cand["kld"]["mean"] == pytest.approx(kld.mean(), rel=1e-5)
    assert cand["kld"]["spike_rate"] == np.mean(kld > 0.5)  # exact: the threshold is a bucket boundary
    ce = saved["models"][label]["ce"]
    assert ce["median"] == pytest.approx(np.quantile(cand_ce, 0.5, method="lower"), rel=0.011)
    assert ce["ppl"] == pytest.approx(np.exp(cand_ce.mean()), rel=1e-5)
    assert {*CONTRACT, "ppl"} <= set(ce)
    windows = np.asarray(dump["window"])[rows]
    per_window = [np.exp(cand_ce[windows == w].mean()) for w in range(10)]
    np.testing.assert_allclose(saved["models"][label]["sequences"]["ppl"], per_window, rtol=1e-5)
    ln_ratio = cand["ln_ppl_ratio"]["mean"]
    assert ln_ratio == pytest.approx((cand_ce - ref_ce).mean(), rel=1e-4)
    assert cand["ce_correlation"] == pytest.approx(np.corrcoef(ref_ce, cand_ce)[0, 1], abs=1e-4)
    dp = np.asarray(dump["delta_p"], np.float64)[rows]
    assert cand["delta_p"]["rms"] == pytest.approx(np.sqrt(np.mean(dp**2)), rel=1e-4)
    lo, hi = cand["kld"]["ci95"]["median"]
    assert lo <= cand["kld"]["median"] <= hi
    assert "ci95_note" not in cand["kld"]  # 10 windows, 10 blocks: enough for an interval
    blocks = load_state(tmp_path / "run" / "state.npz").sketches("kld", label)  # one per window, whatever the batch
    assert len(blocks) == 10
    for w in range(10):
      assert blocks[w].n == np.sum(windows == w)
      assert blocks[w].quantile(0.5) == pytest.approx(np.quantile(kld[windows == w], 0.5, method="lower"), rel=0.011)
      assert blocks[w].total == pytest.approx(kld[windows == w].sum(), rel=1e-5)
    worst = result["worst_tokens"][label]
    assert worst[0]["kld"] == pytest.approx(kld.max(), rel=1e-6) and worst[0]["target"]
    # volume vs direction: the two parts are the KLD token for token (rose: the target made more likely)
    rose = ref_ce > cand_ce
    parts = cand["direction"]
    assert parts["rose"]["tokens"] == rose.sum() and parts["fell"]["tokens"] == (~rose).sum()
    assert parts["rose"]["kld_share"] + parts["fell"]["kld_share"] == pytest.approx(1.0, rel=1e-6)
    assert parts["rose"]["kld_share"] == pytest.approx(kld[rose].sum() / kld.sum(), rel=1e-4)
    assert parts["fell"]["median"] == pytest.approx(np.quantile(kld[~rose], 0.5, method="lower"), rel=0.011)
    assert cand["reverse_kld"]["mean"] > 0 and cand["reverse_kld"]["n"] == scored
    top = cand["top_k"]
    assert 0 < top["top10_overlap"] <= 1 and 0 < top["top5_overlap"] <= 1
    assert top["top1_in_top5"] >= cand["top1_agreement"]  # equal top-1s are among the top 5
    bands = cand["by_confidence"]
    assert [b["band"] for b in bands] == [[0.0, 0.3], [0.3, 0.6], [0.6, 0.9], [0.9, 1.0]]
    assert sum(b["tokens"] for b in bands) == scored
    confidence = np.asarray(dump["ref_top1_prob"], np.float64)[rows]
    assert [b["tokens"] for b in bands] == np.histogram(confidence, [0, 0.3, 0.6, 0.9, 1.0])[0].tolist()
    assert sum(b["kld_share"] for b in bands) == pytest.approx(1.0, rel=1e-6)
  assert saved["models"]["tiny"]["entropy"]["n"] == scored and saved["models"]["tiny"]["entropy"]["median"] > 0
  ref_ce = np.asarray(dump["ref_ce"], np.float64)[np.asarray(dump["candidate"]) == "int3-g16-sym"]
  assert saved["models"]["tiny"]["ce"]["mean"] == pytest.approx(ref_ce.mean(), rel=1e-5)
  # int2 is worse than int3 everywhere that matters: the verdict says so
  (verdict,) = saved["comparison"]["verdicts"]
  assert verdict.startswith("int3-g16-sym dominates int2-g16-asym")
  share = float(verdict.rsplit("no higher in ", 1)[1].split("%")[0])  # paired block bootstrap
  assert 90 <= share <= 100


def test_interrupted_run_resumes_to_identical_numbers(tiny, tmp_path, monkeypatch):
  uninterrupted = run(tiny, tmp_path / "whole")
  calls = {"n": 0}
  real = eval_step.batch_step

  def flaky_step(device_mesh=None):
    def step(*args):
      calls["n"] += 1
      if calls["n"] == 3:
        raise KeyboardInterrupt
      return real(device_mesh)(*args)
    return step

  monkeypatch.setattr(eval_step, "batch_step", flaky_step)
  with pytest.raises(KeyboardInterrupt):
    run(tiny, tmp_path / "resumed")
  assert not (tmp_path / "resumed" / "report.json").exists()
  assert load_state(tmp_path / "resumed" / "state.npz").windows_done == 6
  monkeypatch.setattr(eval_step, "batch_step", real)
  resumed = run(tiny, tmp_path / "resumed")
  strip = lambda r: json.loads(json.dumps({k: v for k, v in r.items() if k != "run"}, default=str))
  assert strip(resumed) == strip(uninterrupted)

  with pytest.raises(ValueError, match="holds a different run .*seq_len"):
    run(tiny, tmp_path / "whole", protocol=data.Protocol("test", seq_len=16, num_sequences=10, seed=3))
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("mine")
  monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("a model loaded before the output was checked"))
  with pytest.raises(ValueError, match="not empty and holds no tailjax run"):
    run(tiny, tmp_path / "other")
  assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
  (tmp_path / "cut").mkdir()
  (tmp_path / "cut" / "run.json").write_text('{"models": ')
  with pytest.raises(ValueError, match="run.json: unreadable run description"):
    run(tiny, tmp_path / "cut")


def test_until_ci_stops_once_intervals_are_narrow_and_equals_a_run_on_the_windows_it_used(tiny, tmp_path):
  """A self-comparison (KLD 0: a point interval) stops at the first batch with enough blocks; int3 needs more
  windows for the same width, taken in a seeded random order; its report equals a plain run on those windows."""
  every = dataclasses.replace(PROTOCOL, num_sequences=None)
  path = str(tiny / "tiny.gguf")
  same = evaluation.run(EvalConfig(path, [path], str(tiny / "corpus.txt"), protocol=every, batch_size=3, until_ci=0.1))
  early = evaluation.run(EvalConfig(path, ["@int3-g16"], str(tiny / "corpus.txt"), protocol=every, batch_size=3,
                                    until_ci=0.1, until_ci_summaries=["median", "mean"]), tmp_path / "early")
  total = same["run"]["windows"]
  assert same["run"]["until_ci"]["met"] and same["run"]["until_ci"]["windows_used"] == 9  # 3 batches: >= 8 blocks
  used = early["run"]["until_ci"]["windows_used"]
  assert early["run"]["until_ci"]["met"] and 9 < used < total and early["run"]["windows_done"] == used
  widths = early["run"]["until_ci"]["widths"]["int3-g16-sym"]
  assert set(widths) == {"median", "mean"} and max(widths.values()) <= 0.1
  for name in ("median", "mean"):  # the interval reported is the one the rule checked: same resamples, same width
    lo, hi = early["candidates"]["int3-g16-sym"]["kld"]["ci95"][name]
    assert (hi - lo) / early["candidates"]["int3-g16-sym"]["kld"][name] == pytest.approx(widths[name], rel=1e-12)
  page = (tmp_path / "early" / "report.md").read_text()
  assert f"stopped after {used} of {total} windows" in page and "full width (high − low)" in page

  ref = models.load(path)
  windows = data.corpus_windows(str(tiny / "corpus.txt"), ref.tokenizer, every).shuffled(every.seed).take(range(used))
  labels = ["tiny", "int3-g16-sym"]
  state = evaluation.Evaluator(references.ModelReference(ref), [runner.load_candidate("@int3-g16", ref)],
                               evaluation.EvalOptions(tuple(labels), batch_size=3)).run(windows)
  plain = summaries.build_report(state, {}, {"tiny": path, "int3-g16-sym": path})
  assert plain["candidates"]["int3-g16-sym"]["kld"] == early["candidates"]["int3-g16-sym"]["kld"]
  assert plain["models"]["tiny"]["ce"] == early["models"]["tiny"]["ce"]
  with pytest.raises(ValueError, match="until-ci -1.0: give the relative width"):
    evaluation.run(EvalConfig(path, ["@int3-g16"], str(tiny / "corpus.txt"), protocol=every, until_ci=-1.0))
  with pytest.raises(ValueError, match="until-ci summaries p42: choose from mean, median"):
    evaluation.run(EvalConfig(path, ["@int3-g16"], str(tiny / "corpus.txt"), protocol=every, until_ci=0.1,
                              until_ci_summaries=["p42"]))


def test_several_corpora_are_reported_alone_and_pooled_and_resume(tiny, tmp_path, monkeypatch):
  """Two corpora in one run: each corpus's figures equal a run on it alone, the pooled ones cover both; a run
  interrupted in the second corpus resumes to the same report."""
  second = tmp_path / "second.txt"
  second.write_text(letter_text(" ".join(topics[k] for k in sorted(topics)[10:14])))
  first = str(tiny / "corpus.txt")
  both = run(tiny, tmp_path / "both", corpus=[first, str(second)])
  alone = {c: run(tiny, tmp_path / f"alone{i}", corpus=c) for i, c in enumerate((first, str(second)))}
  assert list(both["corpora"]) == [first, str(second)] and both["run"]["corpus"] == [first, str(second)]
  for corpus, one in alone.items():
    part = both["corpora"][corpus]
    assert part["windows"] == one["run"]["windows"] == 10
    for label in one["candidates"]:
      assert part["candidates"][label]["kld"] == one["candidates"][label]["kld"]
      assert part["candidates"][label]["ppl_ratio"] == pytest.approx(one["candidates"][label]["ppl_ratio"], rel=1e-12)
  pooled = both["candidates"]["int3-g16-sym"]["kld"]
  assert both["run"]["windows"] == 20 and both["run"]["scored_tokens"] == 2 * 10 * 23
  assert pooled["sketch"]["counts"] != one["candidates"]["int3-g16-sym"]["kld"]["sketch"]["counts"]
  assert "| corpus | candidate | windows |" in (tmp_path / "both" / "report.md").read_text()

  calls = {"n": 0}
  real = eval_step.batch_step

  def flaky_step(device_mesh=None):
    def step(*args):
      calls["n"] += 1
      if calls["n"] == 6:  # 4 batches per corpus: inside the second
        raise KeyboardInterrupt
      return real(device_mesh)(*args)
    return step

  monkeypatch.setattr(eval_step, "batch_step", flaky_step)
  with pytest.raises(KeyboardInterrupt):
    run(tiny, tmp_path / "resumed", corpus=[first, str(second)])
  assert load_state(tmp_path / "resumed" / "state.1.npz").windows_done == 3
  monkeypatch.setattr(eval_step, "batch_step", real)
  resumed = run(tiny, tmp_path / "resumed", corpus=[first, str(second)])
  strip = lambda r: json.loads(json.dumps({k: v for k, v in r.items() if k != "run"}, default=str))
  assert strip(resumed) == strip(both)
  with pytest.raises(ValueError, match="give at least one, each once"):
    run(tiny, tmp_path / "twice", corpus=[first, first])


def test_jensen_shannon_in_a_run_is_bounded_by_both_kls(tiny, tmp_path):
  """--jensen-shannon: per candidate a JS summary, within [0, ln 2] and, token by token, at most a quarter of
  KL(ref || cand) + KL(cand || ref) (so the means are too); a resumed run cannot switch it on."""
  result = run(tiny, tmp_path / "js", jensen_shannon=True)
  for label, c in result["candidates"].items():
    js = c["jensen_shannon"]
    assert 0 < js["median"] <= js["max"] <= np.log(2)
    assert js["mean"] <= (c["kld"]["mean"] + c["reverse_kld"]["mean"]) / 4
    assert js["mean"] > (c["kld"]["mean"] + c["reverse_kld"]["mean"]) / 16  # not vanishingly small either
  assert "Jensen-Shannon (nats, at most ln 2)" in (tmp_path / "js" / "report.md").read_text()
  assert "jensen_shannon" not in run(tiny, tmp_path / "plain")["candidates"]["int3-g16-sym"]
  with pytest.raises(ValueError, match="holds a different run .*jensen_shannon"):
    run(tiny, tmp_path / "plain", jensen_shannon=True)


def test_bad_inputs_are_named(tiny, tmp_path):
  with pytest.raises(ValueError, match="shorter than one window of 1000000 tokens"):
    run(tiny, None, protocol=data.Protocol("test", seq_len=10**6, num_sequences=None))
  with pytest.raises(ValueError, match="fewer than the 100000 sequences"):
    run(tiny, None, protocol=data.Protocol("test", seq_len=24, num_sequences=100000))
  other = Decoder(models.ModelConfig(**{**TINY.to_dict(), "vocab_size": 72}), rngs=nnx.Rngs(1))
  write_tiny_gguf(tmp_path / "other.gguf", other)
  with pytest.raises(ValueError, match="other.gguf: vocabulary of 72 tokens, the reference .* has 64"):
    evaluation.run(EvalConfig(str(tiny / "tiny.gguf"), [str(tmp_path / "other.gguf")], str(tiny / "corpus.txt"),
                              protocol=PROTOCOL))
  reference = models.load(tiny / "tiny.gguf")
  reference.tokenizer.add_bos, reference.tokenizer.bos_id = True, 0  # same vocabulary, other token stream
  models.save_checkpoint(reference, tmp_path / "bos")
  with pytest.raises(ValueError, match="bos: its tokenizer differs from that of the reference .*tiny.gguf"):
    evaluation.run(EvalConfig(str(tiny / "tiny.gguf"), [str(tmp_path / "bos")], str(tiny / "corpus.txt"),
                              protocol=PROTOCOL))
  (tmp_path / "report.json").write_text('{"run": {}}')
  with pytest.raises(ValueError, match=r"report.json: not a tailjax eval report \(no \['candidates', 'models'\]\)"):
    report.read(tmp_path / "report.json")
  reference = models.load(tiny / "tiny.gguf")
  (tmp_path / "empty.jsonl").write_text('{"text": "  "}\n')
  with pytest.raises(ValueError, match="holds no text"):
    data.corpus_windows(str(tmp_path / "empty.jsonl"), reference.tokenizer, PROTOCOL)
  (tmp_path / "bad.jsonl").write_text('{"text": "ab"}\n{"body": "x"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON object with a 'text' field"):
    data.read_documents(str(tmp_path / "bad.jsonl"))


def test_nan_logits_are_counted_not_averaged(tiny, tmp_path):
  broken = models.load(tiny / "tiny.gguf")
  kernel = broken.model.layers[0].blocks[0].mlp.down.kernel  # [layers, in, out]
  kernel.set_value(kernel.get_value().at[0, 0, 0].set(np.nan))  # every position of every window turns NaN
  models.save_checkpoint(broken, tmp_path / "broken")
  result = evaluation.run(EvalConfig(str(tiny / "tiny.gguf"), ["@int3-g16", f"broken={tmp_path / 'broken'}"],
                                     str(tiny / "corpus.txt"), protocol=PROTOCOL))
  kld = result["candidates"]["broken"]["kld"]
  assert kld["nonfinite"] == kld["n"] == 230 and kld["nan"] == 230
  assert result["models"]["broken"]["ce"]["nonfinite"] == 230
  broken_model = result["models"]["broken"]
  assert np.isnan(broken_model["ce"]["ppl"]) and broken_model["sequences"]["nonfinite"] == 10
  assert np.isfinite(result["candidates"]["int3-g16-sym"]["kld"]["mean"])


def test_llamacpp_protocol_scores_the_second_half():
  ids = np.arange(100)
  w = data.make_windows(ids, data.PROTOCOLS["llamacpp"].__class__("llamacpp", 16, None, score_second_half=True),
                        bos_id=99)
  assert w.tokens.shape == (6, 16) and (w.tokens[:, 0] == 99).all() and w.tokens[1, 1] == 17
  assert w.scored.sum(1).tolist() == [7] * 6 and w.scored[0, 8:].all() and not w.scored[0, :8].any()
  sampled = data.make_windows(ids, data.Protocol("ram", 10, 4, seed=42))
  assert sampled.tokens.shape == (4, 10) and sampled.scored.all()
  assert (np.diff(sampled.starts) > 0).all() and set(sampled.starts) <= set(range(0, 100, 10))


def test_cli_eval_and_report(tiny, tmp_path):
  cli_runner = CliRunner()
  args = ["eval", "--reference", str(tiny / "tiny.gguf"), "--candidate", "@int4-g16", "--candidate", "@int2-g16",
          "--corpus", str(tiny / "corpus.txt"), "--seq-len", "24", "--num-sequences", "6", "--batch-size", "2"]
  first = cli_runner.invoke(cli.main, [*args, "--output", str(tmp_path / "a")])
  assert first.exit_code == 0, first.output
  assert "Per-token KLD" in first.output and "int4-g16-sym" in first.output
  again = cli_runner.invoke(cli.main, [*args, "--seed", "5", "--output", str(tmp_path / "a")])
  assert again.exit_code != 0 and "holds a different run" in again.output
  cli_runner.invoke(cli.main, [*args, "--seed", "5", "--output", str(tmp_path / "b")])
  shown = cli_runner.invoke(cli.main, ["report", str(tmp_path / "a"), str(tmp_path / "b"), "--output",
                                       str(tmp_path / "both")])
  assert shown.exit_code == 0, shown.output
  combined = json.loads((tmp_path / "both" / "report.json").read_text())
  assert len(combined["candidates"]) == 4 and "different windows" in combined["run"]["note"]
  before = (tmp_path / "a" / "report.json").read_bytes()
  into_input = cli_runner.invoke(cli.main, ["report", str(tmp_path / "a"), str(tmp_path / "b"), "--output",
                                            str(tmp_path / "a")])
  assert into_input.exit_code != 0 and "is not empty; nothing was overwritten" in into_input.output
  assert (tmp_path / "a" / "report.json").read_bytes() == before
  missing = cli_runner.invoke(cli.main, ["report", str(tmp_path / "nothing")])
  assert missing.exit_code != 0 and "no such report" in missing.output


def test_strided_windows_score_each_token_once_with_enough_context():
  ids = np.arange(100)
  w = data.make_windows(ids, data.Protocol("strided", 10, None, stride=4))
  assert w.tokens.shape == (23, 10) and w.starts.tolist() == list(range(0, 89, 4))
  window, position = np.nonzero(w.scored)
  targets = w.starts[window] + position + 1  # prediction i of a window guesses its token i + 1
  assert sorted(targets.tolist()) == list(range(1, 98))  # every token of the covered stream, once
  assert (position[w.starts[window] > 0] + 1 >= 10 - 4).all()  # at least seq_len - stride tokens of context
  assert w.scored[0].all() and w.scored[1].sum() == 4
  sampled = data.make_windows(ids, data.Protocol("strided", 10, 5, stride=4, seed=1))
  assert len(sampled) == 5 and sampled.scored[sampled.starts > 0].sum(1).tolist() == [4] * (sampled.starts > 0).sum()
  with pytest.raises(ValueError, match="stride=11 must lie in"):
    data.Protocol("strided", 10, None, stride=11)
  with pytest.raises(ValueError, match="takes no stride"):
    data.Protocol("llamacpp", 10, None, score_second_half=True, stride=5)


def test_one_fingerprint_helper_keeps_earlier_fingerprints():
  """Runs, caches and tokenizers saved before the helper existed must still match (resume, cache checks)."""
  import hashlib

  from tailjax import files

  tokens, scored = np.arange(12, dtype=np.int32).reshape(3, 4), np.ones((3, 3), bool)
  assert files.fingerprint(tokens, scored) == hashlib.sha256(tokens.tobytes() + scored.tobytes()).hexdigest()[:16]
  assert files.fingerprint("[1, 2]") == hashlib.sha256(b"[1, 2]").hexdigest()[:16] != files.fingerprint("[2, 1]")


def test_eval_config_file_and_flags(tiny, tmp_path):
  """``--config`` gives an EvalConfig, each flag overrides its field; unknown or mistyped fields are named."""
  from tailjax.eval.config import EvalConfig

  config = tmp_path / "eval.yaml"
  config.write_text(f"reference: {tiny / 'tiny.gguf'}\ncandidates: ['@int4-g16']\ncorpus: {tiny / 'corpus.txt'}\n"
                    "seq_len: 24\nnum_sequences: 6\nbatch_size: 3\nspike_thresholds: [0.25, 1.0]\n")
  done = CliRunner().invoke(cli.main, ["eval", "--config", str(config), "--num-sequences", "3", "--stride", "8",
                                       "--output", str(tmp_path / "run")])
  assert done.exit_code == 0, done.output
  run = json.loads((tmp_path / "run" / "report.json").read_text())["run"]
  assert (run["seq_len"], run["num_sequences"], run["batch_size"], run["spike_thresholds"]) == (24, 3, 3, [0.25, 1.0])
  assert run["stride"] == 8 and run["scored_tokens"] < 3 * 23  # strided windows past the start score 8 each
  parsed = EvalConfig.from_file(config, num_sequences=0)
  assert parsed.window_protocol().num_sequences is None and parsed.candidates == ("@int4-g16",)
  assert parsed.window_protocol().name == "ram"  # a reference given: ram's protocol, overridden
  config.write_text("refrence: x.gguf\n")
  bad = CliRunner().invoke(cli.main, ["eval", "--config", str(config)])
  assert bad.exit_code != 0 and "unknown config fields ['refrence']" in bad.output
  with pytest.raises(ValueError, match="worst='many' must be a whole number"):
    EvalConfig(worst="many")
  with pytest.raises(ValueError, match="protocol='wide' is not one of default, ram, llamacpp"):
    EvalConfig(protocol="wide")


@pytest.mark.slow
def test_embedded_default_on_smollm2(tmp_path):
  """The README's first command: SmolLM2 against its own int4 and int3 quantizations, real text."""
  result = evaluation.run(EvalConfig(protocol=data.Protocol("default", 256, 4, seed=42)), tmp_path / "default")
  int4, int3 = result["candidates"]["int4-g64-sym"], result["candidates"]["int3-g64-sym"]
  assert 0 < int4["kld"]["median"] < int3["kld"]["median"]
  assert int4["top1_agreement"] > int3["top1_agreement"] > 0.2
  assert result["models"]["SmolLM2-135M-Instruct.Q4_1"]["ce"]["median"] < 2.5


@pytest.mark.slow
def test_per_window_blocks_give_calibrated_intervals_on_real_text(smollm2):
  """Coverage on real text: SmolLM2 vs its @int4 on 96 windows of 64 tokens of pydoc is the population; in 200
  random subsets of 12 windows, the nominal 95% block-bootstrap interval of the median KLD holds the population
  median about 95% of the time with one block per window (what eval keeps), and clearly less with blocks of 4
  windows (one per batch, as before). Measured: 95.5% and 74% (with 128-token windows: 92.5% and 80.5%)."""
  from tailjax.stats.blocks import Blocks
  from tailjax.stats.bootstrap import block_bootstrap

  ref = smollm2
  windows = data.corpus_windows("pydoc", ref.tokenizer, data.Protocol("coverage", seq_len=64, num_sequences=96,
                                                                      seed=0))
  state = evaluation.Evaluator(references.ModelReference(ref), [runner.load_candidate("@int4-g64", ref)],
                               evaluation.EvalOptions(("ref", "int4"), batch_size=8)).run(windows)
  blocks = state.sketches("kld", "int4")
  assert len(blocks) == 96
  population = blocks.merged().quantile(0.5)
  rng = np.random.default_rng(0)
  median = {"median": lambda s: s.quantile(0.5)}
  hits = {1: 0, 4: 0}
  for _ in range(200):
    subset = Blocks(blocks.spec, [blocks.sketches[i] for i in np.sort(rng.choice(96, 12, replace=False))])
    for per, held in ((1, subset), (4, subset.pairs_merged().pairs_merged())):
      lo, hi = block_bootstrap(held, median, 500)["median"]
      hits[per] += lo <= population <= hi
  per_window, per_batch = hits[1] / 200, hits[4] / 200
  assert per_window >= 0.88 and per_window - per_batch >= 0.05, (per_window, per_batch)


def test_llamacpp_records_decode_to_log_softmax(rng):
  logits = (rng.standard_normal((6, 50)) * 4).astype(np.float32)
  logits[0] = 0.0  # a flat row: scale 0, every code 0
  logits[1, 3] = 40.0  # most entries saturate 16 nats below the maximum
  records = llamacpp.encode(logits)
  assert records.shape == (6, llamacpp.record_width(50)) == (6, 54)
  header = records[:, :4].copy().view(np.float32)
  decoded = header[:, :1] * records[:, 4:].astype(np.float32) + header[:, 1:2]
  exact = logits - np.log(np.exp(logits.astype(np.float64)).sum(1, keepdims=True))
  stored = records[:, 4:] > 0
  assert not stored[0].any() and stored[1].sum() == 1
  step = header[:, :1]
  assert np.all(np.abs(decoded - exact)[stored] <= (0.5 * np.broadcast_to(step, exact.shape) + 1e-5)[stored])
  assert np.all(decoded[1][~stored[1]] >= exact[1][~stored[1]])  # saturated entries read as "at least this likely"


def test_llamacpp_base_file_as_reference(tiny, tmp_path):
  """A base file written from the tiny model's own logits gives llama.cpp's numbers for that reference."""
  reference = models.load(tiny / "tiny.gguf")
  protocol = data.Protocol("llamacpp", seq_len=24, num_sequences=None, score_second_half=True)
  (tmp_path / "short.txt").write_text((tiny / "corpus.txt").read_text()[:330])
  chunks = data.corpus_windows(str(tmp_path / "short.txt"), reference.tokenizer, protocol).tokens
  assert len(chunks) >= 8
  logits = lambda i: np.asarray(reference.logprobs(chunks[i:i + 1])[0])  # log-probs are logits too
  llamacpp.write_base(tmp_path / "base.kld", chunks, logits)
  base = llamacpp.read_base(tmp_path / "base.kld")
  assert (base.n_ctx, base.n_vocab) == (24, 64) and np.array_equal(base.tokens, chunks)

  candidate = f"{tiny / 'tiny.gguf'}@int3-g16"
  via_file = evaluation.run(EvalConfig(candidates=[candidate], kl_divergence_base=tmp_path / "base.kld", batch_size=5))
  direct = evaluation.run(EvalConfig(str(tiny / "tiny.gguf"), [candidate], str(tmp_path / "short.txt"),
                                     protocol=protocol, batch_size=5))
  assert via_file["run"]["scored_tokens"] == direct["run"]["scored_tokens"] == len(chunks) * 11
  (name, got), = via_file["candidates"].items()
  want = direct["candidates"]["int3-g16-sym"]
  assert name == "tiny@int3-g16-sym" and via_file["reference"] == "base"
  assert got["kld"]["mean"] == pytest.approx(want["kld"]["mean"], rel=0.02, abs=2e-4)
  assert got["top1_agreement"] == pytest.approx(want["top1_agreement"], abs=0.02)
  assert via_file["models"]["base"]["ce"]["ppl"] == pytest.approx(direct["models"]["tiny"]["ce"]["ppl"], rel=1e-3)

  raw = (tmp_path / "base.kld").read_bytes()
  (tmp_path / "short.kld").write_bytes(raw[:-10])
  with pytest.raises(ValueError, match="short.kld: .* bytes, but its header .* implies"):
    llamacpp.read_base(tmp_path / "short.kld")
  (tmp_path / "text.kld").write_bytes(b"hello world, not logits")
  with pytest.raises(ValueError, match="text.kld: not a llama.cpp logits file"):
    llamacpp.read_base(tmp_path / "text.kld")
  with pytest.raises(ValueError, match="not both"):
    evaluation.run(EvalConfig(str(tiny / "tiny.gguf"), [candidate], kl_divergence_base=tmp_path / "base.kld"))


def test_reference_cache_replays_the_reference(tiny, tmp_path):
  """A cache written during one run scores a new candidate with no reference model: exact CE/PPL figures,
  a top-K + tail KL that bounds the full KL from below and tends to it as K grows."""
  candidate = f"{tiny / 'tiny.gguf'}@int2-g16"
  full = evaluation.run(EvalConfig(str(tiny / "tiny.gguf"), ["@int2-g16"], str(tiny / "corpus.txt"),
                                   protocol=PROTOCOL, dump_tokens=tmp_path / "full.parquet",
                                   save_reference_cache=tmp_path / "ref.npz", cache_k=56))
  cache = reference_cache.load(tmp_path / "ref.npz")
  assert cache.k == 56 and cache.ids.shape == (10, 23, 56) and cache.vocab_size == 64
  replay = evaluation.run(EvalConfig(candidates=[candidate], reference_cache=tmp_path / "ref.npz",
                                     dump_tokens=tmp_path / "replay.parquet"))
  (label, got), = replay["candidates"].items()
  want = full["candidates"]["int2-g16-sym"]
  assert label == "tiny@int2-g16-sym" and replay["run"]["fingerprint"] == full["run"]["fingerprint"]
  assert replay["models"]["ref"]["ce"]["ppl"] == pytest.approx(full["models"]["tiny"]["ce"]["ppl"], rel=1e-5)
  assert replay["models"][label]["ce"]["ppl"] == pytest.approx(full["models"]["int2-g16-sym"]["ce"]["ppl"], rel=1e-5)
  assert got["top1_agreement"] == pytest.approx(want["top1_agreement"], abs=1e-6)
  assert got["ln_ppl_ratio"]["mean"] == pytest.approx(want["ln_ppl_ratio"]["mean"], rel=1e-4)
  exact = np.asarray(pq.read_table(tmp_path / "full.parquet").column("kld"), np.float64)
  bound = np.asarray(pq.read_table(tmp_path / "replay.parquet").column("kld"), np.float64)
  assert np.all(bound <= exact + 1e-5) and bound.mean() > 0.9 * exact.mean()  # random V=64 model: flat tails

  # --until-ci scores the windows in a random order: each window's stored values follow it (they were read by
  # position once, so a window met another window's reference). The reference itself replayed is 0 on every token.
  itself = evaluation.run(EvalConfig(candidates=[str(tiny / "tiny.gguf")], reference_cache=tmp_path / "ref.npz",
                                     until_ci=0.5, batch_size=2))
  assert itself["run"]["until_ci"]["windows_used"] > 0
  assert abs(itself["candidates"]["tiny"]["kld"]["max"]) < 1e-4, itself["candidates"]["tiny"]["kld"]["max"]

  other = Decoder(models.ModelConfig(**{**TINY.to_dict(), "vocab_size": 72}), rngs=nnx.Rngs(1))
  write_tiny_gguf(tmp_path / "other.gguf", other)
  with pytest.raises(ValueError, match="vocabulary of 72 tokens, the reference cache"):
    evaluation.run(EvalConfig(candidates=[str(tmp_path / "other.gguf")], reference_cache=tmp_path / "ref.npz"))
  (tmp_path / "junk.npz").write_bytes(b"junk")
  with pytest.raises(ValueError, match="junk.npz: unreadable tailjax reference cache"):
    reference_cache.load(tmp_path / "junk.npz")


def test_select_ranks_a_family_of_eval_reports(tiny, tmp_path):
  """Two sweeps over the same windows (sharing the reference) form one family for `tailjax select`."""
  run(tiny, tmp_path / "sweep1")
  evaluation.run(EvalConfig(str(tiny / "tiny.gguf"), ["@int4-g16", "@int3-g32-asym"], str(tiny / "corpus.txt"),
                            protocol=PROTOCOL, batch_size=3), tmp_path / "sweep2")
  result = CliRunner().invoke(cli.main, ["select", str(tmp_path / "sweep1"), str(tmp_path / "sweep2" / "report.json"),
                                         "--summaries", "mean,median,p99", "--output", str(tmp_path / "sel")])
  assert result.exit_code == 0, result.output
  selection = json.loads((tmp_path / "sel" / "selection.json").read_text())
  family = {"tiny", "int3-g16-sym", "int2-g16-asym", "int4-g16-sym", "int3-g32-asym"}
  assert set(selection["table"]) == family
  medians = {name: row["median"] for name, row in selection["table"].items()}
  assert selection["selected"] == min(medians, key=medians.get)
  saved = json.loads((tmp_path / "sweep2" / "report.json").read_text())
  assert selection["table"]["int4-g16-sym"]["p99"] == saved["models"]["int4-g16-sym"]["ce"]["p99"]

  evaluation.run(EvalConfig(str(tiny / "tiny.gguf"), ["@int4-g8"], str(tiny / "corpus.txt"),
                            protocol=dataclasses.replace(PROTOCOL, seed=4)), tmp_path / "other")
  refused = CliRunner().invoke(cli.main, ["select", str(tmp_path / "sweep1"), str(tmp_path / "other")])
  assert refused.exit_code != 0 and "was measured on different tokens" in refused.output
  forced = CliRunner().invoke(cli.main, ["select", str(tmp_path / "sweep1"), str(tmp_path / "other"), "--force"])
  assert forced.exit_code != 0 and "already came from an earlier table" in forced.output  # 'tiny' differs


def test_a_quantized_candidate_shares_what_it_does_not_round_and_leaves_the_reference_alone(tiny):
  reference = models.load(tiny / "tiny.gguf")
  q = lambda loaded: np.asarray(loaded.model.layers[0].blocks[0].attn.q.kernel.get_value())  # [layers, d, heads]
  kernel = q(reference)
  candidate = runner.load_candidate("@int3-g16", reference)
  assert candidate.model.embed.embedding.get_value() is reference.model.embed.embedding.get_value()
  np.testing.assert_array_equal(q(reference), kernel)
  rounded = q(candidate)
  assert not np.array_equal(rounded, kernel)
  for layer in range(len(kernel)):
    np.testing.assert_array_equal(rounded[layer], models.fake_quantize(kernel[layer], models.QuantSpec.parse("int3-g16")))
