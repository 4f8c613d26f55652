"""What a distill run computes: ``DistillConfig`` (YAML files, recipes and CLI flags fill it)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, NamedTuple

from tailjax import configs, head
from tailjax.distill.objectives import OBJECTIVES, Objective
from tailjax.distill.on_policy import OnPolicyConfig
from tailjax.models import DTYPES as MODEL_DTYPES
from tailjax.models.lora import LoraConfig
from tailjax.generate.tasks import task_configs

DTYPES = {name: MODEL_DTYPES[name] for name in ("float32", "bfloat16")}  # training: no float16
# May change when a run resumes: they decide when to log, evaluate and save, not what is computed.
OPERATIONAL = ("save_every", "keep", "eval_every", "log_every", "cache_batch_size", "mesh")
EVAL_FILE = "eval.json"  # a checkpoint's validation CE summary, beside it


class OptimizerConfig(NamedTuple):
  """The optimizer's fields of a ``DistillConfig`` (``DistillConfig.optimizer_config``), grouped: AdamW (``b1``,
  ``b2``, ``weight_decay``) at ``learning_rate`` after ``warmup_steps`` of linear warmup, decaying along a cosine to
  ``learning_rate * min_lr_ratio`` at ``steps``, after clipping the gradients' global norm to ``clip_norm``."""

  learning_rate: float
  steps: int
  warmup_steps: int
  min_lr_ratio: float
  weight_decay: float
  b1: float
  b2: float
  clip_norm: float


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
  t2_scaling: bool = False  # multiply every objective but ce by temperature^2 (Hinton et al.)
  jsd_beta: float = 0.5  # beta of objective jsd, in (0, 1)
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
  lora: dict | None = None  # {rank, alpha, targets}: train low-rank adapters on a frozen pretrained student
  eval_task: dict | list | None = None  # tailjax.generate.tasks.TaskConfig fields (or a list): accuracy beside each val CE
  on_policy: dict | None = None  # OnPolicyConfig fields: a share of steps on the student's samples (GKD)

  def __post_init__(self):
    configs.check_types(self, "distill config")  # the range checks below would compare a string with a number
    problems = []
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
    if self.eval_task is not None:
      try:
        task_configs(self.eval_task)
      except (TypeError, ValueError) as err:
        problems.append(str(err))
    if self.lora is not None:
      try:
        LoraConfig.from_dict(self.lora)
      except (TypeError, ValueError) as err:
        problems.append(str(err))
    if self.on_policy is not None:
      try:
        OnPolicyConfig.from_dict(self.on_policy)
      except (TypeError, ValueError) as err:
        problems.append(str(err))
      if self.objective == "ce" or self.teacher_cache is not None:
        instead = "a teacher cache" if self.teacher_cache else "ce"
        problems.append("on_policy batches are the student's samples scored by a teacher: they need a teacher "
                        f"online and a distillation objective (not {instead})")
    if self.objective not in OBJECTIVES:
      problems.append(f"objective={self.objective!r}: choose one of {OBJECTIVES}")
    if self.t2_scaling and self.objective == "ce":
      problems.append("t2_scaling multiplies a divergence from the teacher by temperature^2: objective ce has none")
    if not 0 < self.jsd_beta < 1:
      problems.append(f"jsd_beta={self.jsd_beta} must lie strictly between 0 and 1")
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

  def optimizer_config(self) -> OptimizerConfig:
    """Its optimizer's fields, grouped (``OptimizerConfig``, for ``tailjax.distill.step.optimizer``)."""
    return OptimizerConfig(self.learning_rate, self.steps, self.warmup_steps, self.min_lr_ratio, self.weight_decay,
                           self.b1, self.b2, self.clip_norm)

  def training_objective(self, vocab_size: int) -> Objective:
    """The ``Objective`` this config trains on, over a ``vocab_size`` vocabulary."""
    return Objective(self.objective, vocab_size, self.topk, self.temperature, self.jsd_beta, self.t2_scaling,
                     self.block_size)

  @classmethod
  def from_file(cls, path: str | Path | None = None, **overrides) -> DistillConfig:
    """A YAML (or JSON) file of fields, then ``overrides`` (None values are ignored): ``configs.from_file``."""
    return configs.from_file(cls, path, **overrides)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

