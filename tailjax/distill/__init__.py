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

from tailjax.distill.config import DTYPES, EVAL_FILE, OBJECTIVES, OPERATIONAL, DistillConfig
from tailjax.distill.loop import DistillResult, distill, truncate_log
from tailjax.distill.objectives import token_losses
from tailjax.distill.runs import evaluate_checkpoint, read_run, render
from tailjax.distill.setup import Setup, batches, cache_teacher, model_id, pack, prepare, read_examples
from tailjax.distill.step import TrainState, optimizer, train_step, validation_ce

__all__ = ["DTYPES", "EVAL_FILE", "OBJECTIVES", "OPERATIONAL", "DistillConfig", "DistillResult", "Setup", "TrainState",
           "batches", "cache_teacher", "distill", "evaluate_checkpoint", "model_id", "optimizer", "pack", "prepare",
           "read_examples", "read_run", "render", "token_losses", "train_step", "truncate_log", "validation_ce"]
