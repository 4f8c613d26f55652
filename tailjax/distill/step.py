"""One optimizer step (``train_step``: micro-batches, AdamW with warmup and cosine decay) and the validation CE
summary of a model on training windows (``validation_ce``)."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tailjax import data, head, mesh
from tailjax.distill.config import OptimizerConfig
from tailjax.distill.objectives import Objective
from tailjax.models import Decoder, lora
from tailjax.stats import LogHistogram, Summary, spec_for


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: nnx.State
  opt_state: optax.OptState


def optimizer(config: OptimizerConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup and cosine decay, after global-norm clipping; no decay on norms."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, min(config.warmup_steps, config.steps - 1),
                                                config.steps, config.learning_rate * config.min_lr_ratio)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(optax.clip_by_global_norm(config.clip_norm),
                   optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay,
                               mask=decay_mask))
  return tx, schedule


def student(graphdef, params: nnx.State, frozen: nnx.State | None = None) -> Decoder:
  """The student from its trained ``params`` and, under LoRA adapters, its ``frozen`` base."""
  return nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)


class StepConfig(NamedTuple):
  """What ``train_step`` is compiled for: the student's NNX ``graphdef`` (of its trained parameters), the
  ``teacher_graphdef`` (None with a teacher cache), ``tx`` and ``schedule`` from ``optimizer``, ``accum``
  micro-batches per step, the ``objective`` (``Objective``) and the run's ``seed`` (adapter dropout draws from
  ``fold_in(fold_in(key(seed), step), micro-batch)``)."""

  graphdef: Any
  teacher_graphdef: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  accum: int
  objective: Objective
  seed: int = 0


def train_step(state: TrainState, batch: dict[str, jax.Array], teacher_state: nnx.State | None,
               frozen: nnx.State | None = None, *, config: StepConfig) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step over ``config.accum`` micro-batches; the loss is the mean over the batch's targets that
  count (``scored``: every token of packed documents, the answer tokens of examples).

  ``state`` the student's trained parameters and their optimizer state, ``frozen`` the rest of the student (its
  base under LoRA adapters; None: nothing is frozen), ``batch`` the arrays of ``batches`` (``tokens, segments,
  scored: [B, T+1]``, ...), ``teacher_state`` the teacher's (None with a teacher cache). Returns the new state and
  the step's metrics (``loss``, ``grad_norm``, ``lr``); ``distill`` jits it with ``config`` bound."""
  teacher = None if config.teacher_graphdef is None else nnx.merge(config.teacher_graphdef, teacher_state)
  micro = jax.tree.map(lambda x: x.reshape(config.accum, x.shape[0] // config.accum, *x.shape[1:]), batch)
  step_key = jax.random.fold_in(jax.random.key(config.seed), state.step)

  def summed(params, mb, number):
    model = student(config.graphdef, params, frozen)
    lora.dropout_keys(model, jax.random.fold_in(step_key, number))
    values = config.objective.token_losses(model, mb, teacher)
    return jnp.sum(jnp.where(mb["scored"][:, 1:], values, 0.0)), values.size

  def accumulate(carry, inputs):
    (grads, total), (mb, number) = carry, inputs
    (loss, _), g = jax.value_and_grad(summed, has_aux=True)(state.params, mb, number)
    return (jax.tree.map(jnp.add, grads, g), total + loss), None

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  (grads, total), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32)),
                                   (micro, jnp.arange(config.accum)))
  tokens = jnp.maximum(jnp.sum(batch["scored"][:, 1:]), 1)
  grads = jax.tree.map(lambda g: g / tokens, grads)
  updates, opt_state = config.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": total / tokens, "grad_norm": optax.tree.norm(grads), "lr": config.schedule(state.step)}
  return TrainState(state.step + 1, params, opt_state), metrics


@functools.partial(jax.jit, static_argnames=("graphdef", "vocab_size", "block_size"))
def _add_val_ce(sketch: LogHistogram, params: nnx.State, frozen: nnx.State | None, batch: dict[str, jax.Array], *,
                graphdef, vocab_size: int, block_size: int) -> LogHistogram:
  """``batch``: ``tokens, segments, scored: [B, T + 1]`` and ``rows: [B]`` (False: padding)."""
  model = student(graphdef, params, frozen)
  tokens = batch["tokens"]
  hidden = model(tokens[:, :-1], batch["segments"][:, :-1])
  ce = head.cross_entropy(hidden, model.output_head(), tokens[:, 1:], vocab_size=vocab_size, block_size=block_size)
  return sketch.add(ce, batch["rows"][:, None] & batch["scored"][:, 1:])


def validation_ce(graphdef, params: nnx.State, windows: data.Packed, *, batch_size: int, vocab_size: int,
                  block_size: int = head.DEFAULT_BLOCK_SIZE, device_mesh=None, frozen: nnx.State | None = None
                  ) -> Summary:
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
    batch = {"tokens": pad(windows.tokens), "segments": pad(windows.segments), "scored": pad(windows.target_weights()),
             "rows": np.arange(batch_size) < count}
    sketch = _add_val_ce(sketch, params, frozen, {k: place(v) for k, v in batch.items()}, graphdef=graphdef,
                         vocab_size=vocab_size, block_size=block_size)
  return Summary.from_sketch(sketch)
