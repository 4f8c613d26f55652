"""Bad input and faults, by class: every file cut at many bytes, every path of the wrong kind, every number out of
range. Each must end in one clear error naming the file, field or value (exit code 1 from the CLI, never a
traceback), lose nothing already done, and never leave a figure silently wrong."""

import contextlib
import dataclasses
import json
import math
import re
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import transformers
from click.testing import CliRunner

from tailjax import distill, files, models
from tailjax.eval import run_dir
from tailjax import eval as evaluation
from tailjax.eval import EvalConfig
from tailjax.distill import teacher_cache
from tailjax.cli import main
from helpers import PROTOCOL, random_hf_model, tokenizer_files, write_tiny_gguf, write_tiny_model_and_corpus


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return write_tiny_model_and_corpus(tmp_path_factory.mktemp("faults"), seed=5, documents=6)


def cli(*args):
  """``tailjax ARGS`` in-process -> (exit code, output); a traceback (any exception but SystemExit) fails the test."""
  result = CliRunner().invoke(main, [str(a) for a in args])
  assert result.exception is None or isinstance(result.exception, SystemExit), (
      f"traceback: {type(result.exception).__name__}: {result.exception}")
  return result.exit_code, result.output


def eval_args(tiny, *extra):
  return ["eval", "--reference", tiny / "tiny.gguf", "--candidate", "@int4-g16", "--corpus", tiny / "corpus.txt",
          "--protocol", "ram", "--seq-len", "24", "--num-sequences", "10", "--batch-size", "3", *extra]


def cuts(size: int) -> list[int]:
  """Byte offsets to cut a file of ``size`` bytes at: empty, inside any header, through the data, one byte short."""
  return sorted({0, 1, 4, 8, 16, 64, 256, 1024, size // 3, size // 2, size - 64, size - 1} & set(range(size)))


def test_a_gguf_cut_anywhere_is_named(tiny, tmp_path):
  whole = (tiny / "tiny.gguf").read_bytes()
  cut = tmp_path / "cut.gguf"
  for at in cuts(len(whole)):
    cut.write_bytes(whole[:at])
    with pytest.raises(ValueError, match=f"{cut}: not a readable GGUF file"):
      models.load(cut)
  code, output = cli("eval", "--reference", cut, "--candidate", "@int4", "--corpus", tiny / "corpus.txt")
  assert code == 1 and f"Error: {cut}: not a readable GGUF file" in output


def test_an_eval_state_or_reference_cache_cut_anywhere_is_named_with_the_remedy(tiny, tmp_path):
  out = tmp_path / "run"
  code, output = cli(*eval_args(tiny, "--output", out, "--save-reference-cache", tmp_path / "ref.npz"))
  assert code == 0, output
  state, cache = (out / "state.npz").read_bytes(), (tmp_path / "ref.npz").read_bytes()
  (out / "report.json").unlink()  # a resumable run again
  for at in cuts(len(state)):
    (out / "state.npz").write_bytes(state[:at])
    code, output = cli(*eval_args(tiny, "--output", out))
    assert code == 1 and "state.npz: unreadable evaluation state" in output and "delete it to start" in output
  for at in cuts(len(cache)):
    (tmp_path / "cut.npz").write_bytes(cache[:at])
    with pytest.raises(ValueError, match="cut.npz: unreadable tailjax reference cache"):
      evaluation.run(EvalConfig(candidates=[str(tiny / "tiny.gguf")], reference_cache=tmp_path / "cut.npz"))


def test_safetensors_and_checkpoints_cut_anywhere_are_named(tiny, tmp_path):
  hf = tmp_path / "hf"
  random_hf_model(transformers.LlamaConfig, hf)
  tokenizer_files(hf, 300)
  weights = hf / "model.safetensors"
  whole = weights.read_bytes()
  for at in cuts(len(whole)):
    weights.write_bytes(whole[:at])
    with pytest.raises(ValueError, match="model.safetensors"):
      models.load(hf)
  source = models.load(tiny / "tiny.gguf")
  saved = models.save_checkpoint(source, tmp_path / "ckpt")
  tokens = np.arange(12)[None] % 60
  want = np.asarray(source.hidden_states(tokens))
  files = sorted(p for p in (saved / "params").rglob("*") if p.is_file() and p.stat().st_size > 0)
  assert files
  for path in files:
    original = path.read_bytes()
    for at in (0, len(original) // 2):
      path.write_bytes(original[:at])
      try:
        again = models.load(saved)  # orbax keeps some files it does not need to read the arrays back
      except ValueError as err:
        assert "params: unreadable parameters" in str(err) or "tailjax_model.json" in str(err)
      else:  # then the numbers are the saved ones, never silently others
        np.testing.assert_array_equal(np.asarray(again.hidden_states(tokens)), want, err_msg=str(path))
      path.write_bytes(original)
  (saved / "tailjax_model.json").write_text('{"config": {"vocab')
  with pytest.raises(ValueError, match="tailjax_model.json: not a readable tailjax checkpoint description"):
    models.load(saved)


def test_a_damaged_checkpoint_is_one_line_on_the_command_line(tiny, tmp_path):
  """orbax abandons its other reads when one fails: each used to print a traceback ("Event loop is closed",
  "Task exception was never retrieved", pages of TensorStore specs) around the error. Now: one line naming the
  array, its file and the byte range, and the remedy."""
  saved = models.save_checkpoint(models.load(tiny / "tiny.gguf"), tmp_path / "ckpt")
  data = max((p for p in (saved / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  data.write_bytes(data.read_bytes()[:100])  # the arrays' data file, cut
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text('{"prompt": "the"}\n')
  for args in (["merge", str(saved), "--output", str(tmp_path / "merged")],
               ["generate", "--model", str(saved), "--prompts", str(prompts), "--output", str(tmp_path / "g.jsonl")]):
    done = subprocess.run([sys.executable, "-m", "tailjax.cli", "--no-compile-cache", *args], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1
    assert re.fullmatch(r"Error: \S+params: unreadable parameters \(.*OUT_OF_RANGE: Error reading \"\S+\" .* is not "
                        r"valid for value of size 100\)\): a damaged .*checkpoint before it\)\n", done.stderr), done.stderr


def test_a_damaged_teacher_cache_shard_or_metrics_log_is_named(tmp_path):
  meta = teacher_cache.CacheMeta("t", "fp", k=3, temperature=1.0, vocab_size=10, data="d", windows=4, seq_len=5,
                                 shard_size=4)
  shard = tmp_path / "cache" / "shard-00000"
  shard.mkdir(parents=True)
  (tmp_path / "cache" / teacher_cache.META_FILE).write_text(json.dumps(dataclasses.asdict(meta)))
  ids, logprobs = np.zeros((4, 5, 3), np.int32), np.full((4, 5, 3), -1.0, np.float32)
  np.save(shard / "logprobs.npy", logprobs)
  np.save(shard / "ids.npy", ids)
  assert teacher_cache.TeacherCache(tmp_path / "cache")[3][0].shape == (5, 3)
  whole = (shard / "ids.npy").read_bytes()
  for at in cuts(len(whole)):
    (shard / "ids.npy").write_bytes(whole[:at])
    with pytest.raises(ValueError, match="ids.npy: .*rerun cache-teacher"):
      teacher_cache.TeacherCache(tmp_path / "cache")[0]
  ids[2, 1, 0] = 99  # the right length, a wrong value
  np.save(shard / "ids.npy", ids)
  with pytest.raises(ValueError, match="window 2 holds token ids outside the vocabulary of 10"):
    teacher_cache.TeacherCache(tmp_path / "cache")[2]

  log = tmp_path / "metrics.jsonl"
  log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')  # killed mid-line
  distill.truncate_log(log, 2)
  assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
  log.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
  with pytest.raises(ValueError, match="metrics.jsonl:2: damaged log line"):
    distill.truncate_log(log, 3)


def test_paths_of_the_wrong_kind_are_refused_before_any_model_loads(tiny, tmp_path, monkeypatch):
  monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("a model was loaded before the paths were checked"))
  (tmp_path / "a_file").write_text("x")
  cases = [
      (("--corpus", tmp_path), "the corpus names a directory"),
      (("--output", tmp_path / "a_file"), "the output directory names a file"),
      (("--output", tmp_path / "a_file" / "run"), "cannot be created: .*a_file is a file"),
      (("--dump-tokens", tmp_path), "the token dump names a directory"),
      (("--dump-tokens", tmp_path / "missing" / "t.parquet"), "the token dump cannot be written: .*missing is missing"),
      (("--save-reference-cache", tmp_path), "the reference cache to save names a directory"),
  ]
  for extra, message in cases:
    args = eval_args(tiny)
    if extra[0] == "--corpus":
      args[args.index("--corpus") + 1] = extra[1]
      extra = ()
    code, output = cli(*args, *extra)
    assert code == 1 and message.split(".*")[0] in output, (extra, output)
  code, output = cli("eval", "--candidate", tiny / "tiny.gguf", "--reference-cache", tmp_path)
  assert code == 1 and "the reference cache names a directory" in output
  code, output = cli("report", tmp_path, "--output", tmp_path / "a_file")
  assert code == 1 and "the output directory names a file" in output
  (tmp_path / "t.csv").write_text("name,median\na,1\nb,2\n")
  code, output = cli("select", tmp_path / "t.csv", "--output", tmp_path / "a_file")
  assert code == 1 and "the output directory names a file" in output


@pytest.mark.parametrize("option, value, message", [
    ("--batch-size", "0", "batch size 0"), ("--batch-size", "-1", "batch size -1"),
    ("--spike-threshold", "0", "spike threshold 0.0"), ("--spike-threshold", "-1", "spike threshold -1.0"),
    ("--spike-threshold", "nan", "spike threshold nan"), ("--spike-threshold", "inf", "spike threshold inf"),
    ("--worst", "-1", "worst -1"), ("--mesh", "data=3", "needs 3 devices"),
])
def test_numbers_out_of_range_are_refused_before_any_model_loads(tiny, monkeypatch, option, value, message):
  monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("a model was loaded before the options were checked"))
  code, output = cli(*eval_args(tiny), option, value)
  assert code == 1 and message in output


def test_cache_k_zero_and_distill_fields_of_the_wrong_type_are_named(tiny, tmp_path):
  code, output = cli(*eval_args(tiny, "--save-reference-cache", tmp_path / "r.npz", "--cache-k", "0"))
  assert code == 1 and "cache K 0" in output and not (tmp_path / "r.npz").exists()
  for text, message in (("steps: three\n", "steps='three' must be a whole number"),
                        ("learning_rate: .nan\n", "learning_rate=nan must be a finite number"),
                        ("objective: ce\ntemperature: -1\n", "temperature=-1 must be finite and above 0"),
                        ("objective: ce\nkeep: 0\n", "keep=0 must be at least 1"),
                        ("objective: [ce]\n", "objective=['ce'] must be text"),
                        ("objective: ce\nt2_scaling: true\n", "t2_scaling multiplies a divergence"),
                        ("objective: ce\nlora: {alpha: .inf}\n", "alpha=inf must be a finite number"),
                        ("objective: ce\neval_task: {data: t.jsonl, samples: '4', decoding: sample}\n",
                         "samples='4' must be a whole number"),
                        ("objective: ce\nlora: {targets: 7}\n", "targets=7 must be a list"),
                        ("objective: ce\non_policy: {top_p: .nan}\n", "top_p=nan must be a finite number")):
    (tmp_path / "run.yaml").write_text(text)
    code, output = cli("distill", "--config", tmp_path / "run.yaml", "--output", tmp_path / "never")
    assert code == 1 and message in output, output
    assert not (tmp_path / "never").exists()


def test_a_string_where_a_list_is_expected_is_one_item():
  from tailjax.eval.config import EvalConfig
  from tailjax.models.lora import LoraConfig
  from tailjax.generate.tasks import TaskConfig

  assert TaskConfig.from_dict({"data": "t.jsonl", "stop": "END"}).stop == ("END",)  # not ('E', 'N', 'D')
  assert LoraConfig.from_dict({"targets": "gate"}).targets == ("gate",)
  assert LoraConfig.from_dict({"targets": "qkv"}).targets == ("qkv",)  # a name the model is then asked for
  assert LoraConfig.from_dict({"targets": ["q", "v"]}).targets == ("q", "v")
  assert EvalConfig(candidates="@int4").candidates == ("@int4",)


def test_distill_never_adopts_a_directory_that_is_not_its_run(tiny, tmp_path):
  hf = tmp_path / "hf"
  random_hf_model(transformers.LlamaConfig, hf)
  before = {p.name: p.read_bytes() for p in hf.iterdir()}
  (tmp_path / "run.yaml").write_text(f"objective: ce\ndata: {tiny / 'corpus.txt'}\ntokenizer: {tiny / 'tiny.gguf'}\n"
                                     "student: tinystories-34m\nsteps: 1\n")
  for force in ((), ("--force",)):
    code, output = cli("distill", "--config", tmp_path / "run.yaml", "--output", hf, *force)
    assert code == 1 and "not a tailjax distill run's" in output and "force does not change that" in output
  assert {p.name: p.read_bytes() for p in hf.iterdir()} == before
  evaluated = tmp_path / "evaluated"
  assert cli(*eval_args(tiny, "--output", evaluated))[0] == 0
  code, output = cli("distill", "--config", tmp_path / "run.yaml", "--output", evaluated)
  assert code == 1 and "is not empty and holds no tailjax distill run" in output


def test_a_run_that_never_saved_a_window_owns_nothing_and_the_first_batch_is_saved(tiny, tmp_path, monkeypatch):
  out = tmp_path / "run"
  broken = models.ModelConfig(**{**models.load_config(tiny / "tiny.gguf").to_dict(), "vocab_size": 72})
  other = tmp_path / "other.gguf"
  from flax import nnx

  write_tiny_gguf(other, models.Decoder(broken, rngs=nnx.Rngs(0)))
  code, output = cli("eval", "--reference", tiny / "tiny.gguf", "--candidate", other, "--corpus", tiny / "corpus.txt",
                     "--output", out, "--protocol", "ram", "--seq-len", "24", "--num-sequences", "10")
  assert code == 1 and "vocabulary" in output
  saves = []
  real_save = run_dir.save_state
  monkeypatch.setattr(run_dir, "save_state", lambda state, path: (saves.append(state.windows_done),
                                                                  real_save(state, path)))
  # the corrected command takes the directory
  result = evaluation.run(EvalConfig(str(tiny / "tiny.gguf"), ["@int4-g16"], str(tiny / "corpus.txt"),
                                     protocol=PROTOCOL, batch_size=3, save_every=1e9), out)
  assert saves[0] == 3 and saves[-1] == 10  # the first batch at once, not save_every seconds later
  assert result["run"]["windows_done"] == 10


def test_one_output_that_cannot_be_written_loses_none_of_the_others(tiny, tmp_path, monkeypatch):
  import pyarrow.parquet as pq

  def full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(pq, "write_table", full_disk)
  code, output = cli(*eval_args(tiny, "--output", tmp_path / "run", "--dump-tokens", tmp_path / "t.parquet",
                                "--save-reference-cache", tmp_path / "ref.npz"))
  assert code == 1 and "could not write the token dump (No space left on device); nothing of it was kept" in output
  assert "KLD mean" in output  # the table was still printed
  assert (tmp_path / "run" / "report.json").exists() and (tmp_path / "ref.npz").exists()
  assert not (tmp_path / "t.parquet").exists() and not list(tmp_path.glob(".*.tmp"))


def test_a_state_of_the_older_format_is_refused_by_name(tmp_path):
  """A state saved with one dense block per batch (format 1) is not read as if it held windows."""
  import json

  import numpy as np

  from tailjax.eval.state import EvalState, load_state, save_state

  save_state(EvalState(["ref", "cand"]), tmp_path / "state.npz")
  with np.load(tmp_path / "state.npz") as z:
    arrays = {k: z[k] for k in z.files}
  meta = json.loads(str(arrays.pop("meta")))
  del meta["format"]
  np.savez_compressed(tmp_path / "state.npz", meta=np.asarray(json.dumps(meta)), **arrays)
  with pytest.raises(ValueError, match="state.npz: evaluation state of format 1 .* delete it to start the run over"):
    load_state(tmp_path / "state.npz")


def test_one_window_report_is_strict_json_with_no_interval_and_says_why(tiny, tmp_path):
  code, output = cli(*eval_args(tiny, "--output", tmp_path / "run", "--spike-threshold", "0.25", "--num-sequences",
                                "1"))
  assert code == 0, output

  def refuse(constant):
    raise ValueError(f"{constant} in report.json")

  saved = json.loads((tmp_path / "run" / "report.json").read_text(), parse_constant=refuse)
  kld = saved["candidates"]["int4-g16-sym"]["kld"]
  assert kld["ci95"]["mean"] == [None, None] and "1 block (window) cannot be bootstrapped" in kld["ci95_note"]
  assert "cannot be bootstrapped" in " ".join(output.split())
  assert "spike>0.25" in output and "spike>0.25" in (tmp_path / "run" / "report.md").read_text()
  assert "spike>0.5" not in (tmp_path / "run" / "report.html").read_text()
  again_code, again = cli("report", tmp_path / "run")  # a re-read report (nulls) renders the same way
  assert again_code == 0 and "cannot be bootstrapped" in " ".join(again.split())
  assert math.isfinite(kld["mean"])


def test_nan_candidates_rank_last_in_a_real_run(tiny, tmp_path):
  broken = models.load(tiny / "tiny.gguf")
  kernel = broken.model.layers[0].blocks[0].mlp.down.kernel
  kernel.set_value(kernel.get_value().at[0, 0, 0].set(np.nan))
  models.save_checkpoint(broken, tmp_path / "nan")
  result = evaluation.run(EvalConfig(str(tiny / "tiny.gguf"),
                                     ["@int2-g16-asym", f"nan={tmp_path / 'nan'}", "@int8-g16"],
                                     str(tiny / "corpus.txt"), protocol=PROTOCOL, batch_size=5))
  comparison = result["comparison"]
  assert comparison["rank_by_mean"][-1] == comparison["rank_by_median"][-1] == "nan"
  assert comparison["nonfinite"] == {"nan": 230}
  assert sum(v.startswith("no verdict") and "nan has 230 non-finite of 230 values" in v
             for v in comparison["verdicts"]) == 2  # both pairs with nan
  assert any(v.startswith("int8-g16-sym dominates int2-g16-asym") for v in comparison["verdicts"])
  assert all(math.isnan(v) for v in result["candidates"]["nan"]["top_k"].values())  # n/a, never 0%
  assert result["candidates"]["nan"]["top1_agreement"] != result["candidates"]["nan"]["top1_agreement"]
  shutil.rmtree(tmp_path / "nan")


def test_a_candidate_equal_to_the_reference_but_on_nan_tokens_agrees_on_every_finite_one(tiny, tmp_path):
  """NaN in one token's embedding row: every later position of a window is NaN (attention mixes it in), every
  earlier one equals the reference. Overlaps and top-1 agreement describe the finite tokens (100%), the NaN ones
  are counted apart, as KLD's are."""
  partial = models.load(tiny / "tiny.gguf")
  ids = np.asarray(partial.tokenizer.encode((tiny / "corpus.txt").read_text()))
  token = int(np.argmin(np.abs(np.bincount(ids) / ids.size - 0.03)))  # in about half of the 24-token windows
  embedding = partial.model.embed.embedding
  embedding.set_value(embedding.get_value().at[token].set(np.nan))
  models.save_checkpoint(partial, tmp_path / "partial")
  result = evaluation.run(EvalConfig(str(tiny / "tiny.gguf"), [f"partial={tmp_path / 'partial'}"],
                                     str(tiny / "corpus.txt"), protocol=PROTOCOL, batch_size=5))
  cand = result["candidates"]["partial"]
  assert 0 < cand["kld"]["nonfinite"] < cand["kld"]["n"]
  assert cand["top_k"] == {"top5_overlap": 1.0, "top10_overlap": 1.0, "top1_in_top5": 1.0}
  assert cand["top1_agreement"] == 1.0 and cand["delta_p"]["mean"] == 0.0


@contextlib.contextmanager
def file_size_limit(size: int):
  """Every file this process writes stops at ``size`` bytes, as on a full disk (the kernel's RLIMIT_FSIZE: a write
  past it fails with EFBIG; SIGXFSZ ignored so the process lives on)."""
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)


def test_a_file_written_whole_or_not_at_all(tmp_path):
  target = tmp_path / "report.html"
  target.write_text("the old report")
  with file_size_limit(1000), pytest.raises(OSError, match=r"report.html: could not write the HTML report \(File "
                                                             r"too large\); nothing of it was kept"):
    files.write_atomic(target, "x" * 5000, "the HTML report")
  assert target.read_text() == "the old report" and sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
  files.write_atomic(target, "x" * 5000, "the HTML report")
  assert target.read_text() == "x" * 5000 and len(list(tmp_path.iterdir())) == 1


def test_a_full_disk_stops_an_eval_with_its_state_whole_and_it_resumes(tiny, tmp_path):
  out = tmp_path / "run"
  assert cli("--no-compile-cache", *eval_args(tiny, "--output", tmp_path / "clean"))[0] == 0
  with file_size_limit(2000):  # room for run.json, not for a state
    code, output = cli("--no-compile-cache", *eval_args(tiny, "--output", out))
  assert code == 1 and "could not write the evaluation state" in output
  assert "resumes from its last saved state" in output
  assert sorted(p.name for p in out.iterdir()) == ["run.json"]  # no temporary, no half file
  code, output = cli("--no-compile-cache", *eval_args(tiny, "--output", out))
  assert code == 0, output
  saved, clean = (json.loads((d / "report.json").read_text()) for d in (out, tmp_path / "clean"))
  assert saved["candidates"] == clean["candidates"]
  html = (out / "report.html").read_bytes()
  again = tmp_path / "again"
  with file_size_limit(len(html) // 2):  # the report re-rendered: the HTML cannot be written, no half file
    code, output = cli("--no-compile-cache", "report", out, "--output", again)
  assert code == 1 and "could not write the HTML report" in output
  assert not (again / "report.html").exists() and not list(again.glob(".*.tmp"))
  assert (out / "report.html").read_bytes() == html


def test_no_run_replaces_a_file_it_did_not_write(tiny, tmp_path, monkeypatch):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text('{"prompt": "the"}\n')
  code, output = cli("generate", "--model", tiny / "tiny.gguf", "--prompts", prompts, "--output", prompts)
  assert code == 1 and "would replace the input" in output and prompts.read_text() == '{"prompt": "the"}\n'
  monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("a model was loaded before the outputs were checked"))
  (tmp_path / "t.parquet").write_text("another run's dump")
  code, output = cli(*eval_args(tiny, "--dump-tokens", tmp_path / "t.parquet"))
  assert code == 1 and "the token dump exists; nothing was overwritten" in output
  assert (tmp_path / "t.parquet").read_text() == "another run's dump"
  (tmp_path / "merged").mkdir()
  (tmp_path / "merged" / "notes.txt").write_text("mine")
  code, output = cli("merge", tmp_path / "adapters", "--output", tmp_path / "merged")
  assert code == 1 and "the output directory is not empty; nothing was overwritten" in output
  assert [p.name for p in (tmp_path / "merged").iterdir()] == ["notes.txt"]


def test_an_empty_training_or_validation_file_is_named(tiny, tmp_path):
  empty, one = tmp_path / "empty.txt", tmp_path / "one.jsonl"
  empty.write_text("\n  \n")
  one.write_text(json.dumps({"text": "just one document"}) + "\n")
  base = dict(objective="ce", tokenizer=str(tiny / "tiny.gguf"), student="tinystories-34m", steps=1)
  for fields, message in ((dict(data=str(empty)), f"{empty}: holds no text to train on"),
                          (dict(data=str(empty), val_data=str(tiny / "corpus.txt")),
                           f"{empty}: holds no text to train"),
                          (dict(data=str(tiny / "corpus.txt"), val_data=str(empty)),
                           f"{empty}: holds no text to validate on"),
                          (dict(data=str(one)), f"{one}: 1 document(s): a validation split needs at least two")):
    with pytest.raises(ValueError, match=re.escape(message)):
      distill.prepare(distill.DistillConfig(**base, **fields))


def test_a_plan_that_does_not_fit_exits_1_and_says_what_it_planned_for(tiny):
  code, output = cli("--no-compile-cache", *eval_args(tiny, "--plan", "--device-memory", "0.00001"))
  assert code == 1 and "does NOT fit" in output and "batches of 3 windows x 24 tokens" in output
  assert "lower --batch-size (now 3) or --seq-len (now 24)" in output
  code, output = cli("--no-compile-cache", *eval_args(tiny, "--plan", "--device-memory", "10"))
  assert code == 0 and ": fits" in output


def test_tokenizers_that_encode_alike_are_the_same_whatever_their_unused_bos_id(tiny):
  tokenizer = models.load_tokenizer(tiny / "tiny.gguf")
  assert not tokenizer.add_bos
  other = dataclasses.replace(tokenizer, bos_id=3)  # declared, never added
  assert other.fingerprint() == tokenizer.fingerprint()
  vocab = sorted(tokenizer.backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
  written_before = files.fingerprint(json.dumps([vocab, False, 3]))  # caches stored the unused BOS id too
  assert other.same_as(tokenizer.fingerprint()) and other.same_as(written_before)
  added = dataclasses.replace(tokenizer, add_bos=True, bos_id=3)  # now every encoding starts with it
  assert added.fingerprint() != tokenizer.fingerprint() and not added.same_as(tokenizer.fingerprint())
