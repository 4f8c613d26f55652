"""Training a student decoder by token CE, full KL or top-K KL against a frozen teacher.

``tailjax distill`` reproduces the top-K distillation of ../shared/mission/001 (section 4):
the student's per-token loss is one of

- ``ce``: ``-log q(target)`` (no teacher; how the paper trains its teacher and controls),
- ``kl``: ``KL(p || q)`` over the whole vocabulary,
- ``topk``: the teacher's top-K probabilities renormalized to sum to one against the
  student's full softmax (``tailjax.losses.topk_kl_from_logprobs``, ``"full"``),

all computed blockwise from hidden states (``tailjax.head``): no ``[tokens, vocab]``
logits exist, forward or backward. The teacher runs in the same jitted step, or its
top-K comes from a cache written once by ``tailjax cache-teacher``.

With ``mesh`` set, parameters are placed by their logical axes and batches split over the
data axes (``tailjax.mesh``); on several hosts each process reads its own share of the data.

A run directory holds ``config.json`` (what the run computes), ``metrics.jsonl`` (loss,
learning rate, gradient norm, tokens/s), ``evals.jsonl``, ``tensorboard/`` (when tensorboardX
is installed) and ``checkpoints/<step>/``:
orbax items ``params`` / ``train`` (optimizer state) / ``data`` (grain iterator state per process),
next to ``tailjax_model.json`` + ``tokenizer.json`` (so every checkpoint is a model spec for
``tailjax eval``) and ``eval.json``: the validation CE summary (mean, median, every 5th
percentile, p99, band mass, sketch) that ``tailjax select`` reads.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tailjax import configs, data, files, head, mesh, spans, teacher_cache
from tailjax.losses import TopK
from tailjax.models import DTYPES as MODEL_DTYPES
from tailjax.models import checkpoint
from tailjax.models import PRESETS, Decoder, LoadedModel, ModelConfig, ModelSpec, Tokenizer, load, load_tokenizer
from tailjax.models.load import CHECKPOINT_FILE, write_checkpoint_meta
from tailjax.stats import LogHistogram, Summary, spec_for

OBJECTIVES = ("ce", "kl", "topk")
DTYPES = {name: MODEL_DTYPES[name] for name in ("float32", "bfloat16")}  # training: no float16
# May change when a run resumes: they decide when to log, evaluate and save, not what is computed.
OPERATIONAL = ("save_every", "keep", "eval_every", "log_every", "cache_batch_size", "mesh")
EVAL_FILE = "eval.json"


@dataclasses.dataclass
class DistillConfig:
  """Everything a run computes; YAML files (configs/, recipes/) and CLI flags fill it."""

  data: str = "pydoc"  # corpus spec (see tailjax.data.read_documents)
  text_field: str = "text"
  val_data: str | None = None  # held-out corpus; default: a val_fraction share of data's documents
  val_fraction: float = 0.05
  val_windows: int | None = 64  # at most this many validation windows per evaluation
  teacher: str | None = None  # model spec; needed by kl and topk unless teacher_cache is given
  teacher_cache: str | None = None  # directory written by cache-teacher (topk only)
  student: str | dict = "tinystories-34m"  # preset, ModelConfig file (.json/.yaml), model spec, or fields
  tokenizer: str | None = None  # no teacher: tokenizer.json, a model spec, or train-bpe:N (learned on data)
  objective: str = "topk"
  topk: int | None = None
  temperature: float = 1.0
  seq_len: int = 512
  batch_size: int = 32  # windows per optimizer step, split into grad_accum micro-batches
  grad_accum: int = 1
  steps: int = 1000
  learning_rate: float = 3e-4
  warmup_steps: int = 100
  min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  clip_norm: float = 1.0
  dtype: str = "float32"  # compute dtype; parameters and optimizer state stay float32
  seed: int = 0
  save_every: int = 500
  keep: int | None = None  # checkpoints kept (None: all)
  eval_every: int = 500
  log_every: int = 10
  block_size: int = head.DEFAULT_BLOCK_SIZE
  cache_batch_size: int = 8
  mesh: str | None = None  # device mesh (tailjax.mesh): data=8, data=4,model=2, auto; None: one device

  def __post_init__(self):
    problems = configs.type_problems(self)
    if problems:  # the range checks below would compare a string with a number
      raise ValueError("distill config: " + "; ".join(problems))
    for name, low, high in (("learning_rate", 0, None), ("temperature", 0, None), ("val_fraction", None, 1),
                            ("min_lr_ratio", None, None), ("weight_decay", None, None), ("b1", None, 1),
                            ("b2", None, 1), ("clip_norm", 0, None)):
      value = getattr(self, name)
      if not math.isfinite(value) or value < 0 or low is not None and value <= low or high is not None and \
          value >= high:
        bounds = f"above {low}" if low is not None else "at least 0"
        problems.append(f"{name}={value} must be finite and {bounds}{f' and below {high}' if high else ''}")
    for name in ("warmup_steps", "seed"):
      if getattr(self, name) < 0:
        problems.append(f"{name}={getattr(self, name)} must be 0 or more")
    for name in ("keep", "val_windows", "cache_batch_size", "block_size", "topk"):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        problems.append(f"{name}={getattr(self, name)} must be at least 1")
    if self.objective not in OBJECTIVES:
      problems.append(f"objective={self.objective!r}: choose one of {OBJECTIVES}")
    if self.objective == "topk" and (self.topk is None or self.topk < 1):
      problems.append("objective topk needs topk >= 1")
    if self.objective != "ce" and self.teacher is None and self.teacher_cache is None:
      problems.append(f"objective {self.objective} needs a teacher (or a teacher_cache)")
    if self.teacher_cache is not None and self.objective != "topk":
      problems.append(f"a teacher cache holds top-K only: objective {self.objective} needs the teacher online")
    if self.dtype not in DTYPES:
      problems.append(f"dtype={self.dtype!r}: choose one of {sorted(DTYPES)}")
    if self.batch_size % self.grad_accum:
      problems.append(f"batch_size={self.batch_size} is not a multiple of grad_accum={self.grad_accum}")
    for name in ("seq_len", "batch_size", "grad_accum", "steps", "save_every", "eval_every", "log_every"):
      if getattr(self, name) < 1:
        problems.append(f"{name}={getattr(self, name)} must be positive")
    if problems:
      raise ValueError("distill config: " + "; ".join(problems))

  @classmethod
  def from_file(cls, path: str | Path | None = None, **overrides) -> DistillConfig:
    """A YAML (or JSON) file of fields, then ``overrides`` (None values are ignored): ``configs.from_file``."""
    return configs.from_file(cls, path, **overrides)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: nnx.State
  opt_state: optax.OptState


# ---------------------------------------------------------------------------------------------
# The loss.


def token_losses(student: Decoder, batch: dict[str, jax.Array], *, objective: str, vocab_size: int,
                 topk: int | None = None, temperature: float = 1.0, teacher: Decoder | None = None,
                 block_size: int = head.DEFAULT_BLOCK_SIZE) -> jax.Array:
  """Per-token loss ``[B, T]`` of a batch of packed windows (``tokens``/``segments``: ``[B, T + 1]``).

  With ``topk_ids``/``topk_logprobs`` (``[B, T, k]``) in the batch, the teacher's top-K is
  read from them; otherwise ``teacher`` runs here, as a constant.
  """
  inputs, segments, targets = batch["tokens"][:, :-1], batch["segments"][:, :-1], batch["tokens"][:, 1:]
  hidden, unembedding = student(inputs, segments), student.output_head()
  if objective == "ce":
    return head.cross_entropy(hidden, unembedding, targets, vocab_size=vocab_size, block_size=block_size)
  if "topk_ids" in batch:
    top = TopK(batch["topk_ids"], batch["topk_logprobs"])
  else:
    teacher_hidden = jax.lax.stop_gradient(teacher(inputs, segments))
    teacher_unembedding = jax.lax.stop_gradient(teacher.output_head())
    if objective == "kl":
      return head.kl_divergence(ref_hidden=teacher_hidden, ref_unembedding=teacher_unembedding, cand_hidden=hidden,
                                cand_unembedding=unembedding, temperature=temperature,
                                vocab_size=vocab_size, block_size=block_size)
    top = head.teacher_topk(teacher_hidden, teacher_unembedding, topk, temperature=temperature,
                            vocab_size=vocab_size, block_size=block_size)
  return head.topk_kl_divergence(student_hidden=hidden, student_unembedding=unembedding, teacher=top,
                                 temperature=temperature, vocab_size=vocab_size,
                                 block_size=block_size)


def optimizer(config: DistillConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup and cosine decay, after global-norm clipping; no decay on norms."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, min(config.warmup_steps, config.steps - 1),
                                                config.steps, config.learning_rate * config.min_lr_ratio)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(optax.clip_by_global_norm(config.clip_norm),
                   optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay,
                               mask=decay_mask))
  return tx, schedule


def train_step(state: TrainState, batch: dict[str, jax.Array], teacher_state: nnx.State | None, *,
               graphdef, teacher_graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule,
               accum: int, loss_options: dict) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step over ``accum`` micro-batches; the loss is the mean over the batch's targets that count
  (``scored``: every token of packed documents, the answer tokens of examples).

  ``state`` the student's parameters and optimizer state (``graphdef``: its NNX graph), ``batch`` the arrays of
  ``batches`` (``tokens, segments, scored: [B, T+1]``, ...), ``teacher_state`` / ``teacher_graphdef`` the teacher (None with a
  teacher cache), ``tx`` / ``schedule`` from ``optimizer``, ``loss_options`` the keyword arguments of
  ``token_losses``. Returns the new state and the step's metrics (``loss``, ``grad_norm``, ``lr``); ``distill``
  jits it."""
  teacher = None if teacher_graphdef is None else nnx.merge(teacher_graphdef, teacher_state)
  micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

  def summed(params, mb):
    values = token_losses(nnx.merge(graphdef, params), mb, teacher=teacher, **loss_options)
    return jnp.sum(jnp.where(mb["scored"][:, 1:], values, 0.0)), values.size

  def accumulate(carry, mb):
    grads, total = carry
    (loss, _), g = jax.value_and_grad(summed, has_aux=True)(state.params, mb)
    return (jax.tree.map(jnp.add, grads, g), total + loss), None

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  (grads, total), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32)), micro)
  tokens = jnp.maximum(jnp.sum(batch["scored"][:, 1:]), 1)
  grads = jax.tree.map(lambda g: g / tokens, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": total / tokens, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
  return TrainState(state.step + 1, params, opt_state), metrics


@functools.partial(jax.jit, static_argnames=("graphdef", "vocab_size", "block_size"))
def _add_val_ce(sketch: LogHistogram, params: nnx.State, tokens: jax.Array, segments: jax.Array, scored: jax.Array,
                rows: jax.Array, *, graphdef, vocab_size: int, block_size: int) -> LogHistogram:
  model = nnx.merge(graphdef, params)
  hidden = model(tokens[:, :-1], segments[:, :-1])
  ce = head.cross_entropy(hidden, model.output_head(), tokens[:, 1:], vocab_size=vocab_size, block_size=block_size)
  return sketch.add(ce, rows[:, None] & scored[:, 1:])


def validation_ce(graphdef, params: nnx.State, windows: data.Packed, *, batch_size: int, vocab_size: int,
                  block_size: int = head.DEFAULT_BLOCK_SIZE, device_mesh=None) -> Summary:
  """Per-token CE of the model over the targets of ``windows`` that count (``Packed.target_weights``), as a
  ``Summary`` (only the sketch leaves the device).

  Every batch has ``batch_size`` rows (a short last one is padded with rows that count for
  nothing), so one compilation serves and any mesh splits it.
  """
  place = jnp.asarray if device_mesh is None else functools.partial(mesh.global_batch, mesh=device_mesh)
  sketch = LogHistogram.empty(spec_for())
  for start in range(0, len(windows), batch_size):
    count = min(batch_size, len(windows) - start)
    pad = lambda a: np.concatenate([a[start:start + count], np.zeros((batch_size - count, *a.shape[1:]), a.dtype)])
    sketch = _add_val_ce(sketch, params, place(pad(windows.tokens)), place(pad(windows.segments)),
                         place(pad(windows.target_weights())), place(np.arange(batch_size) < count), graphdef=graphdef, vocab_size=vocab_size,
                         block_size=block_size)
  return Summary.from_sketch(sketch)


# ---------------------------------------------------------------------------------------------
# Setting a run up: tokenizer, teacher, student, data.


@dataclasses.dataclass
class Setup:
  config: DistillConfig
  tokenizer: Tokenizer
  student: Decoder
  teacher: LoadedModel | None  # None with a teacher cache or the ce objective
  train: data.Packed
  val: data.Packed
  cache: teacher_cache.TeacherCache | None

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size


def _same_tokenizer(a: Tokenizer, a_name: str, b: Tokenizer, b_name: str) -> None:
  if a.fingerprint() != b.fingerprint():
    raise ValueError(f"tokenizer mismatch: {a_name} ({a.vocab_size} tokens) and {b_name} ({b.vocab_size} tokens) "
                     "tokenize differently; a student learns from a teacher of the same tokenizer")


def _student_fields(spec: str | dict) -> dict | None:
  """Preset name, config file or field mapping -> ``ModelConfig`` fields; None when ``spec`` names a model."""
  import yaml

  if isinstance(spec, str) and spec in PRESETS:
    return {"preset": spec}
  if isinstance(spec, str) and Path(spec).suffix in (".json", ".yaml", ".yml"):
    try:
      spec = yaml.safe_load(Path(spec).read_text())
    except (OSError, yaml.YAMLError) as err:
      raise ValueError(f"{spec}: unreadable student config ({err})") from err
  return dict(spec) if isinstance(spec, dict) else None


def _student_config(fields: dict, vocab_size: int) -> ModelConfig:
  fields = dict(fields)
  preset = fields.pop("preset", None)
  if preset is not None and preset not in PRESETS:
    raise ValueError(f"student preset {preset!r} is unknown (presets: {sorted(PRESETS)})")
  base = PRESETS[preset].to_dict() if preset else {}
  base["vocab_size"] = vocab_size  # a shape takes the tokenizer's vocabulary unless it names one
  return ModelConfig.from_dict({**base, **fields})


def teacher_id(spec: str) -> str:
  """How a teacher is named in a cache: its absolute path, and its quantization if any."""
  parsed = ModelSpec.parse(spec, labelled=False)
  return str(Path(parsed.path).absolute()) + (f"@{parsed.quantization}" if parsed.quantization else "")


def prepare(config: DistillConfig) -> Setup:
  """Loads what a run needs and checks that the pieces fit together, naming what does not."""
  teacher = None
  tokenizer, tokenizer_name = None, None
  device_mesh = None if config.mesh is None else mesh.parse(config.mesh)  # teacher and student load into it
  if config.teacher is not None:
    if config.teacher_cache is None:
      teacher = load(config.teacher, DTYPES[config.dtype], device_mesh=device_mesh)
      tokenizer = teacher.tokenizer
    else:
      tokenizer = load_tokenizer(config.teacher)
    tokenizer_name = f"teacher {config.teacher}"
    if tokenizer is None:
      raise ValueError(f"{config.teacher}: the teacher has no tokenizer")
  examples = spans.span_kind(config.data) is not None  # prompt/answer or chat records: supervised fine-tuning
  if not examples:
    documents = data.read_documents(config.data, config.text_field)
    if config.val_data is None:
      train_docs, val_docs = data.split_documents(documents, config.val_fraction, config.seed)
    else:
      train_docs, val_docs = documents, data.read_documents(config.val_data, config.text_field)
  if config.tokenizer is not None:
    if config.tokenizer.startswith("train-bpe:"):
      if examples:
        raise ValueError(f"{config.data}: prompt/answer or chat records are learned with a pretrained model's "
                         "tokenizer (and chat template), not one trained here (train-bpe)")
      own = data.train_bpe(train_docs, int(config.tokenizer.removeprefix("train-bpe:")))
    else:
      own = load_tokenizer(config.tokenizer)
    if tokenizer is not None:
      _same_tokenizer(tokenizer, tokenizer_name, own, f"tokenizer {config.tokenizer}")
    tokenizer, tokenizer_name = own, f"tokenizer {config.tokenizer}"

  dtype = DTYPES[config.dtype]
  fields = _student_fields(config.student)
  if fields is None:  # a model spec: the student starts from its weights
    pretrained = load(config.student, dtype, param_dtype=jnp.float32, device_mesh=device_mesh)  # master weights
    if pretrained.tokenizer is not None and tokenizer is not None:
      _same_tokenizer(tokenizer, tokenizer_name, pretrained.tokenizer, f"student {config.student}")
    tokenizer = tokenizer or pretrained.tokenizer
    student = pretrained.model
  elif tokenizer is None:
    raise ValueError("no tokenizer: give a teacher, a tokenizer, or a student model that has one")
  else:
    student = Decoder(_student_config(fields, tokenizer.vocab_size), dtype=dtype, param_dtype=jnp.float32,
                      rngs=nnx.Rngs(config.seed))
  if tokenizer is None:
    raise ValueError(f"{config.student}: the student has no tokenizer; give a teacher or a tokenizer")

  vocab = tokenizer.vocab_size
  for name, cfg in (("student", student.cfg), ("teacher", None if teacher is None else teacher.config)):
    if cfg is not None and cfg.vocab_size < vocab:
      raise ValueError(f"{name} has {cfg.vocab_size} vocabulary entries, fewer than the tokenizer's {vocab}")
  if config.topk is not None and config.objective == "topk" and config.topk > vocab:
    raise ValueError(f"topk={config.topk} is larger than the vocabulary ({vocab} tokens)")

  if examples:  # read now that the tokenizer (and its chat template) is known
    records = spans.read_records(config.data, tokenizer)
    if config.val_data is None:
      train_docs, val_docs = data.split_documents(records, config.val_fraction, config.seed)
    else:
      train_docs, val_docs = records, spans.read_records(config.val_data, tokenizer)
  train = pack(train_docs, tokenizer, config.seq_len, f"{config.data} (training split)")
  val = pack(val_docs, tokenizer, config.seq_len, f"{config.val_data or config.data} (validation)")
  if config.val_windows is not None:
    val = val.take(config.val_windows)
  if len(train) < config.batch_size:
    raise ValueError(f"{config.data}: {len(train)} training windows of {config.seq_len + 1} tokens, fewer than "
                     f"one batch of {config.batch_size}")

  cache = None
  if config.teacher_cache is not None:
    cache = teacher_cache.TeacherCache(config.teacher_cache)
    expected = dict(tokenizer=tokenizer.fingerprint(), temperature=float(config.temperature), vocab_size=vocab,
                    data=train.fingerprint, windows=len(train), seq_len=config.seq_len)
    if config.teacher is not None:
      expected["teacher"] = teacher_id(config.teacher)
    if cache.meta.k < config.topk:  # a larger K serves: the cached ids are sorted, most probable first
      expected["k"] = config.topk
    cache.meta.check(expected, cache.directory)
  return Setup(config, tokenizer, student, teacher, train, val, cache)


def pack(examples: list[str] | list[spans.Record], tokenizer, seq_len: int, source: str) -> data.Packed:
  """Training windows: documents packed end to end (``data.pack_documents``: every token a target), or prompt/answer
  and chat records packed whole with only their answer or assistant tokens as targets (``spans.pack_records``)."""
  if examples and isinstance(examples[0], spans.Record):
    return spans.pack_records(examples, tokenizer, seq_len, source)
  return data.pack_documents(examples, tokenizer, seq_len, source)


def read_examples(spec: str, tokenizer, text_field: str = "text") -> list[str] | list[spans.Record]:
  """A corpus's documents, or its records when it is a prompt/answer or chat JSONL (``spans.span_kind``)."""
  if spans.span_kind(spec) is not None:
    return spans.read_records(spec, tokenizer)
  return data.read_documents(spec, text_field)


def cache_teacher(config: DistillConfig, output: str | Path, *, logprob_dtype: str = "float32",
                  shard_size: int = 256, on_shard: Callable[[int, int], None] | None = None) -> teacher_cache.CacheMeta:
  """Writes the teacher top-K cache for ``config``'s training windows (resumable)."""
  if config.teacher is None or config.topk is None:
    raise ValueError("cache-teacher needs a teacher and topk")
  files.output_dir(output, "the teacher cache directory")  # before the teacher loads
  if not isinstance(shard_size, int) or shard_size < 1:
    raise ValueError(f"shard size {shard_size}: give a whole number of windows per shard, at least 1")
  setup = prepare(dataclasses.replace(config, teacher_cache=None, objective="topk"))
  return teacher_cache.write(setup.teacher, teacher_id(config.teacher), setup.train, config.topk, output,
                             vocab_size=setup.vocab_size,
                             temperature=config.temperature, batch_size=config.cache_batch_size,
                             shard_size=shard_size, logprob_dtype=logprob_dtype, on_shard=on_shard)


class _Records:
  """Training windows (and their cached teacher top-K) by index: a grain data source."""

  def __init__(self, packed: data.Packed, cache: teacher_cache.TeacherCache | None, k: int | None):
    self.packed, self.cache, self.k = packed, cache, k

  def __len__(self) -> int:
    return len(self.packed)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    record = {"tokens": self.packed.tokens[index], "segments": self.packed.segments[index],
              "scored": self.packed.target_weights()[index]}
    if self.cache is not None:
      ids, logprobs = self.cache[index]
      record["topk_ids"], record["topk_logprobs"] = ids[:, :self.k], logprobs[:, :self.k]
    return record


def batches(setup: Setup) -> grain.DatasetIterator:
  """Shuffled (reshuffled every epoch by ``seed``), endless batches of ``batch_size`` windows.

  On several hosts each process reads its own share of the windows (every ``process_count``-th)
  and yields its ``batch_size / process_count`` rows of each global batch.
  """
  config = setup.config
  processes = jax.process_count()
  if config.batch_size % processes:
    raise ValueError(f"batch_size={config.batch_size} does not split over {processes} processes")
  dataset = grain.MapDataset.source(_Records(setup.train, setup.cache, config.topk))[jax.process_index()::processes]
  dataset = dataset.shuffle(seed=config.seed).repeat(None)
  return iter(dataset.batch(config.batch_size // processes, drop_remainder=True).to_iter_dataset())


# ---------------------------------------------------------------------------------------------
# The run.


@dataclasses.dataclass
class DistillResult:
  output: Path
  config: DistillConfig
  losses: dict[int, float]  # step -> training loss, for the steps logged in this call
  evals: dict[int, dict[str, Any]]  # step -> validation CE summary
  checkpoints: list[int]


def _check_resume(output: Path, config: DistillConfig, force: bool) -> None:
  """A new run's directory, or this run's to resume. ``force`` accepts a changed run config, never a directory
  that is not a distill run (a model's ``config.json``, an eval output): those are refused, nothing written."""
  files.output_dir(output, "the run directory")
  path = output / "config.json"
  stored = None
  if path.exists():
    try:
      stored = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
      raise ValueError(f"{path}: unreadable run config ({err}); nothing was overwritten") from err
    if not isinstance(stored, dict) or not {"objective", "steps", "seq_len"} <= set(stored):
      raise ValueError(f"{output}: its config.json is not a tailjax distill run's (a model directory?); nothing was "
                       "overwritten, and force does not change that: choose another output")
  elif output.exists() and any(output.iterdir()):
    raise ValueError(f"{output} is not empty and holds no tailjax distill run; nothing was overwritten")
  saved = output / "checkpoints"
  if stored is not None and saved.is_dir() and any(p.name.isdigit() for p in saved.iterdir()):
    ours = config.to_dict()  # a run with no checkpoint owns nothing: another config may take its place
    changed = sorted(k for k in {*stored, *ours} - set(OPERATIONAL) if stored.get(k) != ours.get(k))
    if changed and not force:
      detail = "; ".join(f"{k}: {stored.get(k)!r} -> {ours.get(k)!r}" for k in changed)
      raise ValueError(f"{output}: holds a run with another config ({detail}); resuming would not reproduce it "
                       "(force to resume anyway, or choose another output)")


def truncate_log(path: Path, last_step: int) -> None:
  """Drops lines logged after ``last_step``: they will be computed again."""
  if not path.exists():
    return
  kept, lines = [], path.read_text(errors="replace").splitlines()
  for number, line in enumerate(lines, 1):
    try:
      step = json.loads(line)["step"] if line.strip() else None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
      if number == len(lines):
        break  # a line cut short by a kill: its step runs again
      raise ValueError(f"{path}:{number}: damaged log line ({err!r}); delete the line or the file (they are logs; "
                       "the checkpoints hold the run)") from err
    if step is not None and step <= last_step:
      kept.append(line)
  path.write_text("".join(line + "\n" for line in kept))


def _append(path: Path, record: dict[str, Any]) -> None:
  with path.open("a") as f:
    f.write(files.json_text(record, indent=None) + "\n")
    f.flush()


def _write_sidecars(step_dir: Path, setup: Setup, source: str, evaluation: dict[str, Any] | None) -> None:
  """Makes a checkpoint a model spec (``tailjax_model.json``, ``tokenizer.json``) and stores its eval summary."""
  write_checkpoint_meta(step_dir, setup.student.cfg, setup.tokenizer, source, "float32")
  if evaluation is not None:
    partial = step_dir / (EVAL_FILE + ".partial")
    partial.write_text(json.dumps(evaluation, indent=1))
    partial.rename(step_dir / EVAL_FILE)


def distill(config: DistillConfig, output: str | Path, *, force: bool = False, console=None,
            on_step: Callable[[int, dict[str, float]], None] | None = None) -> DistillResult:
  """Trains (or resumes training) into ``output``; the Python face of ``tailjax distill``."""
  import orbax.checkpoint as ocp

  output = Path(output).absolute()
  writer = mesh.is_writer()  # process 0 writes the run files; checkpoints are written by every process
  if writer:
    _check_resume(output, config, force)  # before any model loads: a wrong output costs nothing
  setup = prepare(config)
  if writer:
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
  device_mesh = None if config.mesh is None else mesh.parse(config.mesh)
  place = lambda batch: jax.tree.map(jnp.asarray, batch)
  if device_mesh is not None:
    for model in (setup.student, None if setup.teacher is None else setup.teacher.model):
      if model is not None:
        mesh.shard_model(model, device_mesh)
    place = lambda batch: jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        mesh.batch_sharding(device_mesh, x.ndim), x), batch)
  graphdef, params = nnx.split(setup.student, nnx.Param)
  tx, schedule = optimizer(config)
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  iterator = batches(setup)
  teacher_graphdef, teacher_state = (None, None) if setup.teacher is None else nnx.split(setup.teacher.model)
  loss_options = dict(objective=config.objective, vocab_size=setup.vocab_size, topk=config.topk,
                      temperature=config.temperature, block_size=config.block_size)
  step_fn = jax.jit(functools.partial(train_step, graphdef=graphdef, teacher_graphdef=teacher_graphdef, tx=tx,
                                      schedule=schedule, accum=config.grad_accum, loss_options=loss_options),
                    donate_argnums=0)

  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep, enable_async_checkpointing=False, create=True)
  handlers = {"params": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
              "data": grain.checkpoint.CheckpointHandler()}  # data: one iterator state file per process
  evals: dict[int, dict[str, Any]] = {}
  losses: dict[int, float] = {}
  log = (lambda name, record: _append(output / name, record)) if writer else (lambda name, record: None)
  with ocp.CheckpointManager(output / "checkpoints", options=options, item_handlers=handlers) as manager:
    start = manager.latest_step() or 0
    if start and checkpoint.is_per_layer(output / "checkpoints" / str(start) / "params"):
      raise ValueError(f"{output}: its checkpoints were written before layers were stacked; they still load (as "
                       f"models, converted), so continue from {output / 'checkpoints' / str(start)} as a new run's "
                       "student (the optimizer state starts afresh)")
    if start:
      restored = manager.restore(start, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(state.params),
          train=ocp.args.StandardRestore({"step": state.step, "opt_state": state.opt_state}),
          data=grain.checkpoint.CheckpointRestore(iterator)))
      state = TrainState(restored["train"]["step"], restored["params"], restored["train"]["opt_state"])
      if writer:
        _write_sidecars(output / "checkpoints" / str(start), setup, f"{output}@{start}", None)
    for name in ("metrics.jsonl", "evals.jsonl") if writer else ():
      truncate_log(output / name, start)

    def evaluate(step: int) -> dict[str, Any]:
      summary = validation_ce(graphdef, state.params, setup.val, batch_size=config.batch_size,
                              vocab_size=setup.vocab_size, block_size=config.block_size, device_mesh=device_mesh)
      evals[step] = {"step": step, "windows": len(setup.val), "fingerprint": setup.val.fingerprint,
                     "ce": summary.to_dict()}
      log("evals.jsonl", evals[step])
      return evals[step]

    tokens_per_step = config.batch_size * config.seq_len
    board = _tensorboard(output) if writer else None
    progress, task = _progress(console, config.steps, start)
    clock, clock_step = time.perf_counter(), start
    try:
      for step in range(start + 1, config.steps + 1):
        state, metrics = step_fn(state, place(next(iterator)), teacher_state)
        saving = step % config.save_every == 0 or step == config.steps
        if step % config.log_every == 0 or saving:
          values = {k: float(v) for k, v in metrics.items()}
          now = time.perf_counter()
          values["tokens_per_s"] = (step - clock_step) * tokens_per_step / (now - clock)
          clock, clock_step = now, step
          losses[step] = values["loss"]
          log("metrics.jsonl", {"step": step, **values})
          for name, value in values.items() if board is not None else ():
            board.add_scalar(f"train/{name}", value, step)
          if progress is not None:
            progress.update(task, completed=step, loss=values["loss"], speed=values["tokens_per_s"])
          if on_step is not None:
            on_step(step, values)
        evaluation = evaluate(step) if step % config.eval_every == 0 or saving else None
        for name in ("mean", "median", "p90", "p99") if board is not None and evaluation else ():
          board.add_scalar(f"val_ce/{name}", evaluation["ce"][name], step)
        if saving:
          manager.save(step, args=ocp.args.Composite(
              params=ocp.args.StandardSave(state.params),
              train=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
              data=grain.checkpoint.CheckpointSave(iterator)))
          manager.wait_until_finished()
          if writer:
            _write_sidecars(output / "checkpoints" / str(step), setup, f"{output}@{step}", evaluation)
    finally:
      if progress is not None:
        progress.stop()
      if board is not None:
        board.close()
    checkpoints = list(manager.all_steps())
  return DistillResult(output, config, losses, evals, sorted(checkpoints))


def _tensorboard(output: Path):
  """A TensorBoard writer into ``output/tensorboard`` when tensorboardX is installed, else None."""
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    return None
  return SummaryWriter(str(output / "tensorboard"))


def _progress(console, total: int, start: int):
  if console is None:
    return None, None
  from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

  progress = Progress(TextColumn("distill"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("loss {task.fields[loss]:.4f}  {task.fields[speed]:,.0f} tok/s"),
                      TimeRemainingColumn(), console=console)
  progress.start()
  return progress, progress.add_task("distill", total=total, completed=start, loss=float("nan"), speed=0.0)


def evaluate_checkpoint(step_dir: str | Path, corpus: str, *, text_field: str = "text", device_mesh=None,
                        dtype: str = "auto") -> dict[str, Any]:
  """The validation CE summary of a checkpoint on ``corpus``, windows shaped as its run's (or 64 x 512), with
  parameters in ``dtype`` (``"auto"``: ``tailjax.models.resolve_dtype``)."""
  step_dir = Path(step_dir)
  run_config = step_dir.parent.parent / "config.json"
  shape = json.loads(run_config.read_text()) if run_config.exists() else {}
  seq_len, count = shape.get("seq_len", 512), shape.get("val_windows") or 64
  loaded = load(step_dir, dtype, device_mesh=device_mesh)
  if loaded.tokenizer is None:
    raise ValueError(f"{step_dir}: the checkpoint has no tokenizer to read {corpus} with")
  windows = pack(read_examples(corpus, loaded.tokenizer, text_field), loaded.tokenizer, seq_len, corpus).take(count)
  graphdef, params = nnx.split(loaded.model, nnx.Param)
  summary = validation_ce(graphdef, params, windows, batch_size=shape.get("batch_size", 8),
                          vocab_size=loaded.tokenizer.vocab_size, device_mesh=device_mesh)
  return {"windows": len(windows), "fingerprint": windows.fingerprint, "corpus": corpus, "ce": summary.to_dict()}


def read_run(directory: str | Path, corpus: str | None = None, device_mesh=None,
             dtype: str = "auto") -> dict[str, dict[str, Any]]:
  """A distill run (or one checkpoint) -> ``{"<run>@<step>": CE summary}``, one entry per checkpoint.

  Summaries saved with the checkpoints are read; a checkpoint without one is evaluated on
  ``corpus`` when given.
  """
  directory = Path(directory)
  steps = [directory] if (directory / CHECKPOINT_FILE).exists() else sorted(
      (p for p in (directory / "checkpoints").glob("*") if p.name.isdigit()), key=lambda p: int(p.name))
  found = {}
  for step_dir in steps:
    name = f"{step_dir.parent.parent.name}@{step_dir.name}" if step_dir.parent.name == "checkpoints" else step_dir.name
    path = step_dir / EVAL_FILE
    if path.exists():
      found[name] = json.loads(path.read_text())
    elif corpus is not None:
      found[name] = evaluate_checkpoint(step_dir, corpus, device_mesh=device_mesh, dtype=dtype)
    else:
      raise FileNotFoundError(f"{path}: this checkpoint has no saved evaluation (give a corpus to evaluate it on)")
  if not found:
    raise FileNotFoundError(f"{directory}: not a tailjax distill run (no checkpoints/<step>/)")
  return found


def render(result: DistillResult, console) -> None:
  """Validation CE of every evaluated step: the table a user reads after a run."""
  from rich.table import Table

  table = Table(title=f"tailjax distill: {result.output}")
  for column in ("step", "CE mean", "median", "p90", "p99", "train loss"):
    table.add_column(column, justify="right")
  for step, evaluation in sorted(result.evals.items()):
    ce = evaluation["ce"]
    loss = result.losses.get(step)
    table.add_row(str(step), *(f"{ce[k]:.4f}" for k in ("mean", "median", "p90", "p99")),
                  "" if loss is None else f"{loss:.4f}")
  console.print(table)
  console.print(f"checkpoints: {', '.join(map(str, result.checkpoints))} in {result.output / 'checkpoints'}")
