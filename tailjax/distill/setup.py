"""Setting a run up: its tokenizer, teacher (or teacher cache), student, training and validation windows
(``prepare``), and the shuffled batches that feed it (``batches``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tailjax import data, files, mesh
from tailjax.data import spans
from tailjax.generate import tasks
from tailjax.distill import teacher_cache
from tailjax.distill.config import DTYPES, DistillConfig
from tailjax.models import lora
from tailjax.models import PRESETS, Decoder, LoadedModel, ModelConfig, ModelSpec, Tokenizer, load, load_tokenizer


@dataclasses.dataclass
class Setup:
  config: DistillConfig
  tokenizer: Tokenizer
  student: Decoder
  teacher: LoadedModel | None  # None with a teacher cache or the ce objective
  train: data.Packed
  val: data.Packed
  cache: teacher_cache.TeacherCache | None
  tasks: list[tasks.Task] = dataclasses.field(default_factory=list)  # eval_task: prompts and answers

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


def model_id(spec: str) -> str:
  """How a model is named where a run records it (a teacher cache, the base of adapters): its absolute path, and
  its quantization if any."""
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
    train_docs, val_docs = _train_and_val(config, lambda spec: data.read_documents(spec, config.text_field))
  if config.tokenizer is not None:
    own = _own_tokenizer(config, train_docs if not examples else None)
    if tokenizer is not None:
      _same_tokenizer(tokenizer, tokenizer_name, own, f"tokenizer {config.tokenizer}")
    tokenizer, tokenizer_name = own, f"tokenizer {config.tokenizer}"
  student, tokenizer = _student_model(config, tokenizer, tokenizer_name, device_mesh)

  vocab = tokenizer.vocab_size
  for name, cfg in (("student", student.cfg), ("teacher", None if teacher is None else teacher.config)):
    if cfg is not None and cfg.vocab_size < vocab:
      raise ValueError(f"{name} has {cfg.vocab_size} vocabulary entries, fewer than the tokenizer's {vocab}")
  if config.topk is not None and config.objective == "topk" and config.topk > vocab:
    raise ValueError(f"topk={config.topk} is larger than the vocabulary ({vocab} tokens)")

  if examples:  # read now that the tokenizer (and its chat template) is known
    train_docs, val_docs = _train_and_val(config, lambda spec: spans.read_records(spec, tokenizer))
  train = pack(train_docs, tokenizer, config.seq_len, f"{config.data} (training split)")
  val = pack(val_docs, tokenizer, config.seq_len, f"{config.val_data or config.data} (validation)")
  if config.val_windows is not None:
    val = val.take(config.val_windows)
  if len(train) < config.batch_size:
    raise ValueError(f"{config.data}: {len(train)} training windows of {config.seq_len + 1} tokens, fewer than "
                     f"one batch of {config.batch_size}")

  measured = [tasks.Task(task, tasks.read_task(task.data, tokenizer)) for task in tasks.task_configs(config.eval_task)]
  cache = None
  if config.teacher_cache is not None:
    cache = teacher_cache.TeacherCache(config.teacher_cache)
    stored = cache.meta.tokenizer
    expected = dict(tokenizer=stored if tokenizer.same_as(stored) else tokenizer.fingerprint(),
                    temperature=float(config.temperature), vocab_size=vocab,
                    data=train.fingerprint, windows=len(train), seq_len=config.seq_len)
    if config.teacher is not None:
      expected["teacher"] = model_id(config.teacher)
    if cache.meta.k < config.topk:  # a larger K serves: the cached ids are sorted, most probable first
      expected["k"] = config.topk
    cache.meta.check(expected, cache.directory)
  return Setup(config, tokenizer, student, teacher, train, val, cache, measured)


def _own_tokenizer(config: DistillConfig, documents: list[str] | None) -> Tokenizer:
  """``config.tokenizer``: a tokenizer file or model spec, or ``train-bpe:N`` learned from the training
  ``documents`` (None: the data are records, which need a pretrained tokenizer and its chat template)."""
  if not config.tokenizer.startswith("train-bpe:"):
    return load_tokenizer(config.tokenizer)
  if documents is None:
    raise ValueError(f"{config.data}: prompt/answer or chat records are learned with a pretrained model's "
                     "tokenizer (and chat template), not one trained here (train-bpe)")
  return data.train_bpe(documents, int(config.tokenizer.removeprefix("train-bpe:")))


def _student_model(config: DistillConfig, tokenizer: Tokenizer | None, tokenizer_name: str | None,
                   device_mesh) -> tuple[Decoder, Tokenizer]:
  """The student (a model spec's weights, or a new model of the given fields; LoRA adapters added) and the run's
  tokenizer (the one chosen so far, else the student's own), checked to agree."""
  dtype = DTYPES[config.dtype]
  fields = _student_fields(config.student)
  if fields is not None and config.lora is not None:
    raise ValueError(f"student {config.student!r}: LoRA adapts a pretrained model; give a model spec as the student")
  if fields is None:  # a model spec: the student starts from its weights
    # float32 master weights, or under LoRA adapters a frozen base kept in the compute dtype
    pretrained = load(config.student, dtype, param_dtype=dtype if config.lora else jnp.float32,
                      device_mesh=device_mesh)
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
  if config.lora is not None:
    lora.adapt(student, lora.LoraConfig.from_dict(config.lora), nnx.Rngs(config.seed))
  return student, tokenizer


def _train_and_val(config: DistillConfig, read: Callable[[str], list]) -> tuple[list, list]:
  """(training, validation) documents or records: ``read(data)`` split by ``val_fraction`` and ``seed``, or all of
  it and ``read(val_data)``."""
  def nonempty(spec: str) -> list:
    found = [x for x in read(spec) if not isinstance(x, str) or x.strip()]
    if not found:
      raise ValueError(f"{spec}: holds no text to {'validate' if spec == config.val_data else 'train'} on (no "
                       "non-blank document or record)")
    return found

  found = nonempty(config.data)
  if config.val_data is None:
    return data.split_documents(found, config.val_fraction, config.seed, config.data)
  return found, nonempty(config.val_data)


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
  settings = teacher_cache.CacheSettings(model_id(config.teacher), config.topk, setup.vocab_size, config.temperature,
                                         shard_size, logprob_dtype)
  return teacher_cache.write(setup.teacher, setup.train, output, settings, batch_size=config.cache_batch_size,
                             on_shard=on_shard)


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
