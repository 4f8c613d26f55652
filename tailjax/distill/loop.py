"""The training loop (``distill``): resume, steps, logs, evaluations and checkpoints in a run directory."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import grain
import jax
import jax.numpy as jnp
from flax import nnx

from tailjax import files, generate, mesh
from tailjax.generate import tasks
from tailjax.distill import on_policy
from tailjax.distill.config import EVAL_FILE, OPERATIONAL, DistillConfig
from tailjax.distill.setup import Setup, batches, model_id, prepare
from tailjax.distill.step import StepConfig, TrainState, optimizer, student, train_step, validation_ce
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
  """Trains (or resumes training) into ``output``; the Python face of ``tailjax distill``. ``force`` resumes a run
  whose config changed; ``on_step(step, metrics)`` after every logged step; ``console`` shows progress."""
  output = Path(output).absolute()
  writer = mesh.is_writer()  # process 0 writes the run files; checkpoints are written by every process
  if writer:
    _check_resume(output, config, force)  # before any model loads: a wrong output costs nothing
  setup = prepare(config)
  if writer:
    output.mkdir(parents=True, exist_ok=True)
    files.write_atomic(output / "config.json", json.dumps(config.to_dict(), indent=1), "the run's config")
  run = _Run.start(setup, output, writer)
  iterator = batches(setup)
  with _checkpoints(output, config) as manager:
    start = _resume(run, manager, iterator)
    _train(run, manager, iterator, start, _Watch(console, on_step))
    checkpoints = sorted(manager.all_steps())
  return DistillResult(output, config, run.losses, run.evals, checkpoints)


@dataclasses.dataclass
class _Run:
  """One call of ``distill``: its ``setup``, where it writes (``output``; process 0 alone: ``writer``), the student
  split into its trained ``state`` and ``frozen`` rest (``graphdef``), the teacher's state, the compiled
  ``step_fn``, how batches are ``place``-d, and what it has logged (``losses``, ``evals``)."""

  setup: Setup
  output: Path
  writer: bool
  graphdef: Any
  frozen: Any
  state: TrainState
  teacher_state: Any
  step_fn: Callable
  place: Callable
  device_mesh: Any
  losses: dict[int, float] = dataclasses.field(default_factory=dict)
  evals: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)

  @classmethod
  def start(cls, setup: Setup, output: Path, writer: bool) -> _Run:
    """Models placed on the config's mesh, the student split (under LoRA only the adapters train: the base is
    passed to each step as a constant), the step compiled for the config's objective and optimizer."""
    config = setup.config
    device_mesh = None if config.mesh is None else mesh.parse(config.mesh)
    place = lambda batch: jax.tree.map(jnp.asarray, batch)
    if device_mesh is not None:
      for model in (setup.student, None if setup.teacher is None else setup.teacher.model):
        if model is not None:
          mesh.shard_model(model, device_mesh)
      place = lambda batch: jax.tree.map(lambda x: jax.make_array_from_process_local_data(
          mesh.batch_sharding(device_mesh, x.ndim), x), batch)
    graphdef, params, frozen = nnx.split(setup.student, nnx.LoRAParam if config.lora else nnx.Param, ...)
    tx, schedule = optimizer(config.optimizer_config())
    teacher_graphdef, teacher_state = (None, None) if setup.teacher is None else nnx.split(setup.teacher.model)
    step_config = StepConfig(graphdef, teacher_graphdef, tx, schedule, config.grad_accum,
                             config.training_objective(setup.vocab_size), config.seed)
    step_fn = jax.jit(functools.partial(train_step, config=step_config), donate_argnums=0)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    return cls(setup, output, writer, graphdef, frozen, state, teacher_state, step_fn, place, device_mesh)

  def student(self):
    return student(self.graphdef, self.state.params, self.frozen)

  def log(self, name: str, record: dict[str, Any]) -> None:
    if self.writer:
      _append(self.output / name, record)

  def evaluate(self, step: int) -> dict[str, Any]:
    """Validation CE at ``step`` (and the task accuracies, the first as ``task``), logged to ``evals.jsonl``."""
    setup, config = self.setup, self.setup.config
    summary = validation_ce(self.graphdef, self.state.params, setup.val, batch_size=config.batch_size,
                            vocab_size=setup.vocab_size, block_size=config.block_size, device_mesh=self.device_mesh,
                            frozen=self.frozen)
    self.evals[step] = {"step": step, "windows": len(setup.val), "fingerprint": setup.val.fingerprint,
                        "ce": summary.to_dict()}
    if setup.tasks:  # the model writes its answers: task accuracy beside the CE summary
      model = self.student()
      results = [tasks.evaluate(model, setup.tokenizer, t.items, t.config).to_dict(t.config) for t in setup.tasks]
      self.evals[step]["task"] = results[0]
      if len(results) > 1:
        self.evals[step]["tasks"] = results
    self.log("evals.jsonl", self.evals[step])
    return self.evals[step]


def _checkpoints(output: Path, config: DistillConfig):
  """The run's orbax checkpoint manager: items ``params``, ``train`` (step, optimizer state) and ``data`` (one
  grain iterator state file per process)."""
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep, enable_async_checkpointing=False, create=True)
  handlers = {"params": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
              "data": grain.checkpoint.CheckpointHandler()}
  return ocp.CheckpointManager(output / "checkpoints", options=options, item_handlers=handlers)


def _resume(run: _Run, manager, iterator) -> int:
  """The step the run goes on from: its latest checkpoint restored into ``run`` and ``iterator`` (0: none); the
  logs cut back to it, and what the checkpoint lacks (a run stopped while writing it) written again."""
  import orbax.checkpoint as ocp

  output, start = run.output, manager.latest_step() or 0
  if start and checkpoint.is_per_layer(output / "checkpoints" / str(start) / "params"):
    raise ValueError(f"{output}: its checkpoints were written before layers were stacked; they still load (as "
                     f"models, converted), so continue from {output / 'checkpoints' / str(start)} as a new run's "
                     "student (the optimizer state starts afresh)")
  if start:
    state = run.state
    try:
      restored = manager.restore(start, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(state.params),
          train=ocp.args.StandardRestore({"step": state.step, "opt_state": state.opt_state}),
          data=grain.checkpoint.CheckpointRestore(iterator)))
    except Exception as err:  # orbax, TensorStore and grain raise bare or JSON errors for damaged files
      where = output / "checkpoints" / str(start)
      raise ValueError(f"{where}: damaged checkpoint, it cannot resume the run ({files.reason(err)}); "
                       f"delete {where} to resume from the checkpoint before it") from err
    run.state = TrainState(restored["train"]["step"], restored["params"], restored["train"]["opt_state"])
  for name in ("metrics.jsonl", "evals.jsonl") if run.writer else ():
    truncate_log(output / name, start)
  if start and run.writer:  # a run stopped while writing them (a full disk): the checkpoint gets back what it lacks
    step_dir = output / "checkpoints" / str(start)
    _write_sidecars(step_dir, run.setup, f"{output}@{start}",
                    None if (step_dir / EVAL_FILE).exists() else logged_eval(output / "evals.jsonl", start))
  return start


class _Watch(NamedTuple):
  """Who watches a run: a ``console`` for its progress bar, ``on_step(step, metrics)``; either may be None."""

  console: Any
  on_step: Callable[[int, dict[str, float]], None] | None


def _train(run: _Run, manager, iterator, start: int, watch: _Watch) -> None:
  """Steps ``start + 1 .. steps``: a batch (or the student's own continuations, on-policy), the step, its log line,
  an evaluation and a checkpoint when due."""
  config = run.setup.config
  policy = None if config.on_policy is None else on_policy.OnPolicyConfig.from_dict(config.on_policy)
  if policy is not None and jax.process_count() > 1:
    raise ValueError("on_policy: the student's continuations are sampled in one process; a run over several "
                     "processes cannot use them yet")
  eos_ids = generate.default_eos(run.setup.tokenizer)
  board = _tensorboard(run.output) if run.writer else None
  progress, task = _progress(watch.console, config.steps, start)
  clock = (time.perf_counter(), start)
  sampled = {"on_policy_steps": 0, "sampled_tokens": 0}  # since the last log line
  try:
    for step in range(start + 1, config.steps + 1):
      batch = next(iterator)
      if policy is not None and on_policy.chosen(policy.fraction, config.seed, step):
        resampled = on_policy.resample(run.student(), batch, policy, on_policy.step_seed(config.seed, step), eos_ids)
        batch = resampled.batch if resampled.targets else batch  # nothing to rewrite: the corpus's
        sampled["on_policy_steps"] += 1
        sampled["sampled_tokens"] += resampled.targets
      run.state, metrics = run.step_fn(run.state, run.place(batch), run.teacher_state, run.frozen)
      saving = step % config.save_every == 0 or step == config.steps
      if step % config.log_every == 0 or saving:
        values = {k: float(v) for k, v in metrics.items()}
        now = time.perf_counter()
        values["tokens_per_s"] = (step - clock[1]) * config.batch_size * config.seq_len / (now - clock[0])
        clock = (now, step)
        if policy is not None:
          values.update(sampled)
          sampled = dict.fromkeys(sampled, 0)
        _log_step(run, step, values, board, watch)
        if progress is not None:
          progress.update(task, completed=step, loss=values["loss"], speed=values["tokens_per_s"])
      evaluation = run.evaluate(step) if step % config.eval_every == 0 or saving else None
      for name in ("mean", "median", "p90", "p99") if board is not None and evaluation else ():
        board.add_scalar(f"val_ce/{name}", evaluation["ce"][name], step)
      if saving:
        _save(run, manager, iterator, step, evaluation)
  finally:
    if progress is not None:
      progress.stop()
    if board is not None:
      board.close()


def _log_step(run: _Run, step: int, values: dict[str, float], board, watch: _Watch) -> None:
  run.losses[step] = values["loss"]
  run.log("metrics.jsonl", {"step": step, **values})
  for name, value in values.items() if board is not None else ():
    board.add_scalar(f"train/{name}", value, step)
  if watch.on_step is not None:
    watch.on_step(step, values)


def _save(run: _Run, manager, iterator, step: int, evaluation: dict[str, Any] | None) -> None:
  """A checkpoint of ``step`` (every process writes its part), then process 0 writes what makes it a model."""
  import orbax.checkpoint as ocp

  manager.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(run.state.params),
      train=ocp.args.StandardSave({"step": run.state.step, "opt_state": run.state.opt_state}),
      data=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  if run.writer:
    _write_sidecars(run.output / "checkpoints" / str(step), run.setup, f"{run.output}@{step}", evaluation)


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
