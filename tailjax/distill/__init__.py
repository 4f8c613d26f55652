"""Training a student decoder by token CE or a divergence from a frozen teacher; fine-tuning with LoRA.

``tailjax distill`` reproduces the top-K distillation of ../shared/mission/001 (section 4) and its
fine-tuning case (section 3): the student's per-token loss is an ``Objective``
(``ce``, ``kl``, ``topk``, ``reverse_kl``, ``jsd``), all computed blockwise from hidden states
(``tailjax.head``): no ``[tokens, vocab]`` logits exist, forward or backward. The teacher runs in
the same jitted step (``train_step``, compiled for a ``StepConfig``), or its top-K comes from a cache written
once by ``tailjax cache-teacher`` (``tailjax.distill.teacher_cache``).
Documents or prompt/answer records (``tailjax.data.spans``) feed it; adapters (``tailjax.models.lora``)
may train alone on a frozen base; on a share of steps the student's own continuations may replace
the corpus's targets (``tailjax.distill.on_policy``).

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

from tailjax.distill.config import DTYPES, EVAL_FILE, OBJECTIVES, OPERATIONAL, DistillConfig
from tailjax.distill.loop import DistillResult, distill, truncate_log
from tailjax.distill.objectives import Objective
from tailjax.distill.on_policy import OnPolicyConfig
from tailjax.distill.runs import evaluate_checkpoint, read_run, render
from tailjax.distill.setup import Setup, batches, cache_teacher, model_id, pack, prepare, read_examples
from tailjax.distill.step import OptimizerConfig, StepConfig, TrainState, optimizer, train_step, validation_ce

__all__ = ["DTYPES", "EVAL_FILE", "OBJECTIVES", "OPERATIONAL", "DistillConfig", "DistillResult", "Objective",
           "OnPolicyConfig", "OptimizerConfig", "Setup", "StepConfig", "TrainState", "batches", "cache_teacher", "distill",
           "evaluate_checkpoint", "model_id", "optimizer", "pack", "prepare", "read_examples", "read_run", "render",
           "train_step", "truncate_log", "validation_ce"]
