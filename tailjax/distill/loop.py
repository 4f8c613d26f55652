"""The training loop (``distill``): resume, steps, logs, evaluations and checkpoints in a run directory."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
from flax import nnx

from tailjax import files, generate, mesh, tasks
from tailjax.distill import on_policy
from tailjax.distill.config import EVAL_FILE, OPERATIONAL, DistillConfig
from tailjax.distill.setup import Setup, batches, model_id, prepare
from tailjax.distill.step import TrainState, optimizer, student, train_step, validation_ce
from tailjax.models import checkpoint, lora
from tailjax.models.load import write_checkpoint_meta


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
  files.write_atomic(path, "".join(line + "\n" for line in kept), "a log")


def logged_eval(path: Path, step: int) -> dict[str, Any] | None:
  """The evaluation ``evals.jsonl`` logged at ``step``, if any (a checkpoint's ``eval.json`` holds the same)."""
  if not path.exists():
    return None
  records = (json.loads(line) for line in path.read_text(errors="replace").splitlines() if line.strip())
  return next((r for r in records if r.get("step") == step), None)


def _append(path: Path, record: dict[str, Any]) -> None:
  with path.open("a") as f:
    f.write(files.json_text(record, indent=None) + "\n")
    f.flush()


def _write_sidecars(step_dir: Path, setup: Setup, source: str, evaluation: dict[str, Any] | None) -> None:
  """Makes a checkpoint a model spec (``tailjax_model.json``, ``tokenizer.json``) and stores its eval summary."""
  config = setup.config
  adapters = None if config.lora is None else {**lora.LoraConfig.from_dict(config.lora).to_dict(),
                                               "base": model_id(config.student)}
  write_checkpoint_meta(step_dir, setup.student.cfg, setup.tokenizer, source, "float32", lora=adapters)
  if evaluation is not None:
    files.write_atomic(step_dir / EVAL_FILE, json.dumps(evaluation, indent=1), "the checkpoint's evaluation")


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
    files.write_atomic(output / "config.json", json.dumps(config.to_dict(), indent=1), "the run's config")
  device_mesh = None if config.mesh is None else mesh.parse(config.mesh)
  place = lambda batch: jax.tree.map(jnp.asarray, batch)
  if device_mesh is not None:
    for model in (setup.student, None if setup.teacher is None else setup.teacher.model):
      if model is not None:
        mesh.shard_model(model, device_mesh)
    place = lambda batch: jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        mesh.batch_sharding(device_mesh, x.ndim), x), batch)
  # trained: every parameter, or only the adapters (the base frozen, passed to each step as a constant)
  graphdef, params, frozen = nnx.split(setup.student, nnx.LoRAParam if config.lora else nnx.Param, ...)
  tx, schedule = optimizer(config)
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  iterator = batches(setup)
  policy = None if config.on_policy is None else on_policy.OnPolicyConfig.from_dict(config.on_policy)
  if policy is not None and jax.process_count() > 1:
    raise ValueError("on_policy: the student's continuations are sampled in one process; a run over several "
                     "processes cannot use them yet")
  eos_ids = generate.default_eos(setup.tokenizer)
  teacher_graphdef, teacher_state = (None, None) if setup.teacher is None else nnx.split(setup.teacher.model)
  loss_options = dict(objective=config.objective, vocab_size=setup.vocab_size, topk=config.topk,
                      temperature=config.temperature, block_size=config.block_size, beta=config.jsd_beta,
                      t2_scaling=config.t2_scaling)
  step_fn = jax.jit(functools.partial(train_step, graphdef=graphdef, teacher_graphdef=teacher_graphdef, tx=tx,
                                      schedule=schedule, accum=config.grad_accum, loss_options=loss_options,
                                      seed=config.seed),
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
      try:
        restored = manager.restore(start, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(state.params),
            train=ocp.args.StandardRestore({"step": state.step, "opt_state": state.opt_state}),
            data=grain.checkpoint.CheckpointRestore(iterator)))
      except Exception as err:  # orbax, TensorStore and grain raise bare or JSON errors for damaged files
        where = output / "checkpoints" / str(start)
        raise ValueError(f"{where}: damaged checkpoint, it cannot resume the run ({files.reason(err)}); "
                         f"delete {where} to resume from the checkpoint before it") from err
      state = TrainState(restored["train"]["step"], restored["params"], restored["train"]["opt_state"])
    for name in ("metrics.jsonl", "evals.jsonl") if writer else ():
      truncate_log(output / name, start)
    if start and writer:  # a run stopped while writing them (a full disk): the checkpoint gets back what it lacks
      step_dir = output / "checkpoints" / str(start)
      _write_sidecars(step_dir, setup, f"{output}@{start}",
                      None if (step_dir / EVAL_FILE).exists() else logged_eval(output / "evals.jsonl", start))

    def evaluate(step: int) -> dict[str, Any]:
      summary = validation_ce(graphdef, state.params, setup.val, batch_size=config.batch_size,
                              vocab_size=setup.vocab_size, block_size=config.block_size, device_mesh=device_mesh,
                              frozen=frozen)
      evals[step] = {"step": step, "windows": len(setup.val), "fingerprint": setup.val.fingerprint,
                     "ce": summary.to_dict()}
      if setup.tasks:  # the model writes its answers: task accuracy beside the CE summary (the first: "task")
        model = student(graphdef, state.params, frozen)
        results = [tasks.evaluate(model, setup.tokenizer, t.items, t.config).to_dict(t.config) for t in setup.tasks]
        evals[step]["task"] = results[0]
        if len(results) > 1:
          evals[step]["tasks"] = results
      log("evals.jsonl", evals[step])
      return evals[step]

    def next_batch(step: int) -> tuple[dict[str, Any], on_policy.Resampled | None]:
      """The corpus's batch, or on a chosen step the student's continuations of its prompts."""
      batch = next(iterator)
      if policy is None or not on_policy.chosen(policy.fraction, config.seed, step):
        return batch, None
      resampled = on_policy.resample(student(graphdef, state.params, frozen), batch, policy,
                                     on_policy.step_seed(config.seed, step), eos_ids)
      return (resampled.batch if resampled.targets else batch), resampled  # nothing to rewrite: the corpus's

    tokens_per_step = config.batch_size * config.seq_len
    board = _tensorboard(output) if writer else None
    progress, task = _progress(console, config.steps, start)
    clock, clock_step = time.perf_counter(), start
    sampled = {"on_policy_steps": 0, "sampled_tokens": 0}  # since the last log line
    try:
      for step in range(start + 1, config.steps + 1):
        batch, resampled = next_batch(step)
        if resampled is not None:
          sampled["on_policy_steps"] += 1
          sampled["sampled_tokens"] += resampled.targets
        state, metrics = step_fn(state, place(batch), teacher_state, frozen)
        saving = step % config.save_every == 0 or step == config.steps
        if step % config.log_every == 0 or saving:
          values = {k: float(v) for k, v in metrics.items()}
          now = time.perf_counter()
          values["tokens_per_s"] = (step - clock_step) * tokens_per_step / (now - clock)
          clock, clock_step = now, step
          if policy is not None:
            values.update(sampled)
            sampled = dict.fromkeys(sampled, 0)
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
